"""Triton kernel for dW = dY^T X^ read from the low-bit codes (:mod:`pamm_fx.kernels.dequant_matmul`).

One program per (BLOCK_M x BLOCK_N) tile of dW (and per row slice when the reduction is split)
walks its rows of the batch in BLOCK_K steps: it loads dY's (BLOCK_K x BLOCK_M) tile transposed,
the code bytes of the (BLOCK_K x BLOCK_N) tile of X^ (a byte serves 8 // bits neighbouring
columns), unpacks them by shift and mask, applies each row's lo and scale in float32, adds
alpha * C_f gathered by f when the codes hold PAMM's residual, rounds the tile to the operand
dtype D and feeds ``tl.dot`` with a float32 accumulator. X^ lives only as one tile in registers
(and shared memory for the dot): per step the kernel reads BLOCK_K * BLOCK_N * bits / 8 bytes of
codes where the explicit path writes and reads back a D tile.

Precision: bf16/fp16 D goes to the tensor cores as it is (under the interpreter, whose ``tl.dot``
has no bf16, both tiles are upcast after the rounding to D, which gives the same exact products; that
rounding is toward zero there, to nearest on the GPU, so tests bound the error by one D ulp per X^);
float32 D uses TF32 only when torch allows it for matmuls (:func:`pamm_fx.kernels.triton_util.dot_precision`),
else ``ieee``, which matches the reference up to summation order. Masked rows and columns load 0,
so padding adds nothing; a NaN lo/scale row (the format's non-finite row) makes its X^ row NaN,
and with it every column of dW, as plain's. float64 never comes here. Offsets are int64.

Small dW, long reduction (e.g. 512 x 512 from 16k tokens: 16 tiles for 132 SMs): the rows are split
into slices, each program writes a float32 partial and one torch sum adds them in slice order, so
the result is deterministic. Everything is sized from shapes (no host synchronisation). dY and C
are passed with unit column strides (``.contiguous()``, a no-op for the backward's tensors): a
strided column index cost registers enough to spill. It launches at once (no op of its own):
``pamm::dequant_weight_grad`` calls :func:`weight_grad` on CUDA, and Inductor keeps that op whole there.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from pamm_fx.kernels import lowbit
from pamm_fx.kernels.triton_util import INTERPRETED, check_dtype, decode_tile, dot_precision

__all__ = ["weight_grad"]


@triton.jit
def _weight_grad_kernel(
    dy_ptr,
    q_ptr,
    lo_ptr,
    scale_ptr,
    c_ptr,
    f_ptr,
    alpha_ptr,
    out_ptr,
    b,
    m,
    n,
    rows_per_split,
    stride_db,
    stride_qb,
    stride_cb,
    stride_os,
    stride_om,
    BITS: tl.constexpr,
    HAS_BASE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    per: tl.constexpr = 8 // BITS
    mcols = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ncols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = mcols < m
    n_ok = ncols < n
    byte_col = ncols // per
    shift = ((ncols % per) * BITS).to(tl.int32)
    start = tl.program_id(2).to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, b)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(start, end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end
        dyt = tl.load(dy_ptr + rows[None, :] * stride_db + mcols[:, None],
                      mask=m_ok[:, None] & row_ok[None, :], other=0.0)
        ok = row_ok[:, None] & n_ok[None, :]
        x_hat = decode_tile(q_ptr, lo_ptr, scale_ptr, c_ptr, f_ptr, alpha_ptr, rows, ncols, byte_col, shift, row_ok,
                            ok, stride_qb, stride_cb, 1, BITS, HAS_BASE)
        x_hat = x_hat.to(dy_ptr.dtype.element_ty)
        if UPCAST:
            acc = tl.dot(dyt.to(tl.float32), x_hat.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dyt, x_hat, acc)
    out = out_ptr + tl.program_id(2).to(tl.int64) * stride_os + mcols[:, None] * stride_om + ncols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


#: Programs to aim for before splitting the rows: two per SM of a 132-SM H100.
TARGET_PROGRAMS = 264
#: Rows per slice at least, so a split never trades a partial write of m x n for a few rows of work.
MIN_SPLIT_ROWS = 1024


def _blocks(m: Any, n: Any, dtype: torch.dtype, precision: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): tiles that compile without spilling on sm_80 and sm_90
    in every layout, aligned or not (``benchmarks/kernel_registers.py``).

    bf16/fp16: 128 x 64 with 32-row steps at 8 warps (128 x 128 spilled 4-36 bytes unaligned), down
    to 64 x 32 at 4 warps for a small dW (ptxas spilled 4-24 bytes at 32 x 64 and 128 x 32 with 4
    warps, 64 x 64 with 8, on sm_80). TF32: 128 x 64, 16-row steps. IEEE float32, whose ``tl.dot``
    runs on the FMA units with both tiles in registers: 64 x 64. float32 takes 8 warps from 2048 tile
    elements (64 x 32 spilled at 4 on sm_90). A symbolic size (dynamic shapes) takes the widest tile.
    """
    if dtype != torch.float32:
        (m_lo, m_hi), (n_lo, n_hi), block_k = (64, 128), (32, 64), 32
    else:
        (m_lo, m_hi), (n_lo, n_hi), block_k = (16, 128 if precision == "tf32" else 64), (16, 64), 16

    def block(size: Any, lo: int, hi: int) -> int:
        return hi if isinstance(size, torch.SymInt) else min(hi, max(lo, triton.next_power_of_2(size)))

    block_m, block_n = block(m, m_lo, m_hi), block(n, n_lo, n_hi)
    wide = block_m == 128 if dtype != torch.float32 else block_m * block_n >= 2048
    return block_m, block_n, block_k, 8 if wide else 4


def _split(b: Any, tiles: Any) -> int:
    """Row slices: enough programs to fill the GPU, each slice at least MIN_SPLIT_ROWS rows; one for
    symbolic sizes (a guard on b would recompile per batch size)."""
    if isinstance(b, torch.SymInt) or isinstance(tiles, torch.SymInt):
        return 1
    return max(1, min(TARGET_PROGRAMS // max(1, tiles), b // MIN_SPLIT_ROWS))


def weight_grad(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
                alpha: Tensor | None, bits: int, n: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """dW = dY^T (alpha * C[f] + deq(q)) (no base: c, f, alpha None), (m, n) in ``out_dtype`` (default D):
    the Triton twin of :func:`pamm_fx.kernels.dequant_matmul.reference`; reads no tensor value on the host."""
    lowbit.check_bits(bits)
    lowbit.check_base(c, f, alpha)
    d = dy.dtype if c is None else c.dtype  # the operand dtype D (dequant_matmul.operand_dtype)
    check_dtype(d, "weight-gradient kernel")
    out_dtype = out_dtype or d
    b, m = dy.shape
    if b == 0 or m == 0 or n == 0:
        return torch.zeros(m, n, dtype=out_dtype, device=dy.device)
    dy, q = dy.to(d).contiguous(), q.contiguous()  # the kernel takes unit column strides
    has_base = c is not None
    # Without a base the kernel never reads c, f, alpha: any pointers of the right kind will do.
    c, f, alpha = (c.contiguous(), f, alpha.float()) if has_base else (dy, q, lo)
    precision = dot_precision() if d == torch.float32 else "ieee"
    block_m, block_n, block_k, num_warps = _blocks(m, n, d, precision)
    tiles_m, tiles_n = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    split = _split(b, tiles_m * tiles_n)
    rows_per_split = triton.cdiv(b, split)
    out = torch.empty(m, n, dtype=out_dtype, device=dy.device) if split == 1 else \
        torch.empty(split, m, n, dtype=torch.float32, device=dy.device)
    _weight_grad_kernel[(tiles_m, tiles_n, split)](
        dy, q, lo.float(), scale.float(), c, f, alpha, out, b, m, n, rows_per_split,
        dy.stride(0), q.stride(0), c.stride(0), out.stride(0) if split > 1 else 0,
        out.stride(-2), BITS=bits, HAS_BASE=has_base,
        UPCAST=d == torch.float32 or INTERPRETED,
        PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out if split == 1 else out.sum(0).to(out_dtype)
