"""Triton kernels for the backward contraction B~_j = sum over rows i with f_i = j of alpha_i * dY_i.

Algorithm: counting sort, then balanced segmented sums. A stable sort of f gives
every generator j a contiguous segment of row indices. Each segment is cut into
chunks of at most CHUNK rows, and one program per (chunk, column tile) gathers its
rows of dY in BLOCK_R-row steps, scales them by alpha and sums them in float32 into
one row of a partial buffer. A second kernel adds the partial rows of each
generator in chunk order. So a skewed f (a padded batch puts most rows on the
generator of the padding) spreads over b / CHUNK programs instead of serialising
on one, every output element is still summed in a fixed order (bitwise
deterministic, no atomics), and dY is read exactly once (memory bound, as the cost
model wants). Rows with alpha = 0 (dropped by eps, all-zero rows) are read and multiplied like
the rest, so a NaN/Inf in their dY reaches B~ as it reaches plain's dY^T X.
The grid is sized from shapes only (cdiv(b, CHUNK) + k programs bound the number of
chunks), so nothing is synchronised with the host. Offsets are int64 throughout.

Why not a one-hot GEMM (P^T dY with P = one-hot(f) * alpha, tiled): it reads dY
k / BLOCK_K times and spends 2 * b * k * m FLOPs, and the tensor cores would round
alpha * dY to TF32/bf16, so it would not match the float32 reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["contract", "CHUNK"]


@triton.jit
def _partial_kernel(
    g_ptr,
    order_ptr,
    offsets_ptr,
    chunk_gen_ptr,
    chunk_ptr_ptr,
    alpha_ptr,
    part_ptr,
    k,
    m,
    stride_gb,
    stride_gm,
    stride_part,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    j = tl.load(chunk_gen_ptr + p)
    if j < k:
        cols = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = cols < m
        start = tl.load(offsets_ptr + j) + (p - tl.load(chunk_ptr_ptr + j)) * CHUNK
        end = tl.minimum(start + CHUNK, tl.load(offsets_ptr + j + 1))
        acc = tl.zeros((BLOCK_R, BLOCK_M), tl.float32)
        for r0 in range(0, CHUNK, BLOCK_R):
            r = start + r0 + tl.arange(0, BLOCK_R)
            row_ok = r < end
            i = tl.load(order_ptr + r, mask=row_ok, other=0)
            a = tl.load(alpha_ptr + i, mask=row_ok, other=0.0)
            g = tl.load(
                g_ptr + i[:, None] * stride_gb + cols[None, :] * stride_gm,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += g.to(tl.float32) * a[:, None]
        tl.store(part_ptr + p * stride_part + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _reduce_kernel(
    part_ptr,
    chunk_ptr_ptr,
    out_ptr,
    m,
    stride_part,
    stride_out,
    col0,
    BLOCK_M: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col_ok = cols < m
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for c in range(tl.load(chunk_ptr_ptr + j), tl.load(chunk_ptr_ptr + j + 1)):
        acc += tl.load(part_ptr + c * stride_part + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + j * stride_out + col0 + cols, acc, mask=col_ok)


#: Rows per program at most (a longer segment is split). 512 rows of a 128-column bf16 tile is
#: 128 KiB of dY per program: enough to hide the launch, small enough that one generator owning
#: every row still spreads over b / 512 programs.
CHUNK = 512
#: Rows gathered per step and columns per program. BLOCK_M = 128 keeps a row
#: chunk of dY one 256-byte (bf16) or 512-byte (fp32) contiguous read.
BLOCK_R = 32
BLOCK_M = 128


def contract(grads: Sequence[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """Triton twin of :func:`pamm_fx.kernels.contract.reference`; bitwise reproducible run to run.

    The kernels are launched through ``wrap_triton``, so that where the backward is traced (AOTAutograd
    functionalizes it) the graph holds torch ops plus the kernel wrappers and Inductor schedules around
    the launches; called eagerly it launches them at once. Only shapes steer Python here (no .item(), no
    host syncs).
    """
    flat = [g.reshape(-1, g.shape[-1]) for g in grads]
    width = sum(g.shape[1] for g in flat)
    b = f.shape[0]
    out = torch.zeros(k, width, dtype=torch.float32, device=f.device)
    if k == 0 or b == 0:
        return out
    sorted_f, order = torch.sort(f, stable=True)
    offsets = torch.searchsorted(sorted_f, torch.arange(k + 1, dtype=sorted_f.dtype, device=f.device))
    chunks = (offsets[1:] - offsets[:-1] + (CHUNK - 1)) // CHUNK
    chunk_ptr = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
    programs = (b + CHUNK - 1) // CHUNK + k  # bounds sum_j ceil(len_j / CHUNK); the rest exit at once
    chunk_gen = torch.searchsorted(chunk_ptr, torch.arange(programs, device=f.device), right=True) - 1
    alpha = alpha.contiguous()
    col0 = 0
    for g in flat:
        m = g.shape[1]
        if m:
            part = torch.empty(programs, m, dtype=torch.float32, device=f.device)
            tiles = triton.cdiv(m, BLOCK_M)
            wrap_triton(_partial_kernel)[(programs, tiles)](
                g, order, offsets, chunk_gen, chunk_ptr, alpha, part, k, m, g.stride(0), g.stride(1),
                part.stride(0), CHUNK=CHUNK, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
            )
            wrap_triton(_reduce_kernel)[(k, tiles)](
                part, chunk_ptr, out, m, part.stride(0), out.stride(0), col0, BLOCK_M=BLOCK_M
            )
        col0 += m
    return out
