"""Triton kernel for the backward contraction B~_j = sum over rows i with f_i = j of alpha_i * dY_i.

Algorithm: counting sort, then segmented sums. A stable sort of f gives every
generator j a contiguous segment of row indices; one program per (j, column tile)
walks its segment in BLOCK_R-row chunks, gathers those rows of dY, scales them by
alpha and accumulates in a float32 register tile that is reduced once at the end.
Every output element is written by exactly one program in a fixed order, so the
result is bitwise deterministic without atomics, and dY is read exactly once
(a memory-bound pass, as the cost model wants).

Why not a one-hot GEMM (P^T dY with P = one-hot(f) * alpha, tiled): it reads dY
k / BLOCK_K times and spends 2 * b * k * m FLOPs, and the tensor cores would round
alpha * dY to TF32/bf16, so it would not match the float32 reference. Its only
advantage, balance when one generator owns most rows, is rare (sizes of segments
average b / k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["contract", "contract_triton"]


@triton.jit
def _contract_kernel(
    g_ptr,
    order_ptr,
    offsets_ptr,
    alpha_ptr,
    out_ptr,
    m,
    stride_gb,
    stride_gm,
    stride_out,
    col0,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < m
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    acc = tl.zeros((BLOCK_R, BLOCK_M), tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < end
        i = tl.load(order_ptr + r, mask=row_ok, other=0)
        a = tl.load(alpha_ptr + i, mask=row_ok, other=0.0)
        g = tl.load(
            g_ptr + i[:, None] * stride_gb + cols[None, :] * stride_gm,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += g.to(tl.float32) * a[:, None]
    tl.store(out_ptr + j.to(tl.int64) * stride_out + col0 + cols, tl.sum(acc, axis=0), mask=col_ok)


#: Rows gathered per step and columns per program. BLOCK_M = 128 keeps a row
#: chunk of dY one 256-byte (bf16) or 512-byte (fp32) contiguous read.
BLOCK_R = 32
BLOCK_M = 128


@torch.library.triton_op("pamm::contract_triton", mutates_args=())
def contract_triton(grads: Sequence[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """The contraction as an op whose body torch.compile can trace: AOTAutograd decomposes it
    into torch ops plus the wrapped kernel, so Inductor schedules around the launch instead of
    treating it as an opaque call. Only shapes steer Python here (no .item(), no host syncs).
    """
    flat = [g.reshape(-1, g.shape[-1]) for g in grads]
    width = sum(g.shape[1] for g in flat)
    out = torch.zeros(k, width, dtype=torch.float32, device=f.device)
    if k == 0 or f.shape[0] == 0:
        return out
    sorted_f, order = torch.sort(f, stable=True)
    bounds = torch.arange(k + 1, dtype=sorted_f.dtype, device=f.device)
    offsets = torch.searchsorted(sorted_f, bounds)
    alpha = alpha.contiguous()
    col0 = 0
    for g in flat:
        m = g.shape[1]
        if m:
            grid = (k, triton.cdiv(m, BLOCK_M))
            wrap_triton(_contract_kernel)[grid](
                g,
                order,
                offsets,
                alpha,
                out,
                m,
                g.stride(0),
                g.stride(1),
                out.stride(0),
                col0,
                BLOCK_R=BLOCK_R,
                BLOCK_M=BLOCK_M,
            )
        col0 += m
    return out


def contract(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """Triton twin of :func:`pamm_fx.kernels.reference.contract`; bitwise reproducible run to run.

    It calls the op: on real tensors triton_op runs the body with the tracing wrapper
    switched off, so the kernel launches directly, and the code exists once.
    """
    return contract_triton(grads, f, alpha, k)
