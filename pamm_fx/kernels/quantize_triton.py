"""Triton kernels of the low-bit format (:mod:`pamm_fx.kernels.lowbit`): quantize, and decode.

Quantize (:func:`quantize`, the Triton twin of :func:`pamm_fx.kernels.quantize.reference`): one program
owns BLOCK_R rows. Pass 1 walks the row in BLOCK_N-column tiles, gathering C_f(i) by f and forming
R = X - alpha * C_f in float32 (R = X when ``HAS_BASE`` is false: ``estimator="sr"``, no C, f or alpha is
read), for the row's min, max and a non-finite flag; pass 2 forms each tile again (a second read of X that
L2 mostly serves; when the row fits one tile it stays in registers and X is read once), draws the hashed
noise, rounds and packs 8 // bits codes per byte, then stores whole bytes. Decode (:func:`decode`, the twin
of :func:`pamm_fx.kernels.lowbit.decode`: the explicit X^ that ``benchmarks/gpu_check.py`` measures the
fused weight gradient against): one program per (BLOCK_R rows, BLOCK_N columns) tile unpacks and scales,
adds alpha * C_f gathered by f when there is a base, and stores in the requested dtype.

Agreement with the reference: the noise, lo, the scale and v = (R - lo) / scale use the same float32
operations (the division is ``div_rn``, IEEE like torch's, not Triton's approximate ``/``), so q is
bitwise the reference's wherever R is; the compiler may fuse X - alpha * C into an FMA, which moves R (and
thus a code whose noise sits within rounding of v's fraction) by one rounding. float64 never comes here
(:func:`pamm_fx.kernels.device.use_triton`). Offsets are int64. Both launch at once (no op of their own):
``pamm::quantize`` calls :func:`quantize` on CUDA, and Inductor keeps that op whole there.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from pamm_fx.kernels import lowbit
from pamm_fx.kernels.triton_util import check_dtype, decode_tile, mix32

__all__ = ["decode", "quantize"]


@triton.jit
def _residual_tile(x_ptr, c_ptr, rows, gen, a, row_ok, n0, n, stride_xb, stride_xn, stride_cb, stride_cn,
                   HAS_BASE: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of R = X - alpha * C_f (of X alone without a base) in float32, with its columns and mask."""
    cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = row_ok[:, None] & (cols < n)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xn, mask=ok, other=0.0).to(tl.float32)
    if HAS_BASE:
        c = tl.load(c_ptr + gen[:, None] * stride_cb + cols[None, :] * stride_cn, mask=ok, other=0.0)
        x = x - a[:, None] * c.to(tl.float32)
    return x, cols, ok


@triton.jit
def _tile_range(r, ok, lo, hi, bad):
    """Fold one tile into the running row min, max and non-finite flag (min/max alone may drop a NaN)."""
    lo = tl.minimum(lo, tl.min(tl.where(ok, r, float("inf")), axis=1))
    hi = tl.maximum(hi, tl.max(tl.where(ok, r, float("-inf")), axis=1))
    return lo, hi, tl.maximum(bad, tl.max(tl.where(ok & ((r != r) | (tl.abs(r) == float("inf"))), 1, 0), axis=1))


@triton.jit
def _row_scale(lo, hi, bad, BITS: tl.constexpr):
    """lo and scale = (hi - lo) / (2^bits - 1); NaN both for a non-finite row or an overflowing range."""
    scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, (1 << BITS) - 1, tl.float32))
    bad = (bad > 0) | (tl.abs(scale) == float("inf"))
    return tl.where(bad, float("nan"), lo), tl.where(bad, float("nan"), scale)


@triton.jit
def _pack_tile(q_ptr, r, cols, ok, rows, row_ok, rowkey, lo, scale, n0, width, stride_qb,
               BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Round one tile of R stochastically and store its packed bytes."""
    per: tl.constexpr = 8 // BITS
    levels: tl.constexpr = (1 << BITS) - 1
    v = tl.math.div_rn(r - lo[:, None], scale[:, None])
    fl = tl.floor(v)
    h = mix32(rowkey[:, None] ^ cols.to(tl.uint32)[None, :])
    u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    q = fl + tl.where(u < v - fl, 1.0, 0.0)
    q = tl.minimum(q, levels)
    q = tl.where(ok & (scale > 0)[:, None], q, 0.0).to(tl.int32)  # scale 0 or NaN, padding: code 0
    if per == 1:
        packed = q
    else:
        shifts = tl.arange(0, per) * BITS
        packed = tl.sum(tl.reshape(q, (BLOCK_R, BLOCK_N // per, per)) << shifts[None, None, :], axis=2)
    bcols = (n0 // per + tl.arange(0, BLOCK_N // per)).to(tl.int64)
    tl.store(q_ptr + rows[:, None] * stride_qb + bcols[None, :], packed.to(tl.uint8),
             mask=row_ok[:, None] & (bcols < width)[None, :])


@triton.jit
def _quantize_kernel(
    x_ptr,
    c_ptr,
    f_ptr,
    alpha_ptr,
    key_ptr,
    q_ptr,
    lo_ptr,
    scale_ptr,
    b,
    n,
    width,
    stride_xb,
    stride_xn,
    stride_cb,
    stride_cn,
    stride_qb,
    BITS: tl.constexpr,
    HAS_BASE: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < b
    if HAS_BASE:
        gen = tl.load(f_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        a = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
    else:  # C, f and alpha are placeholders, never read
        gen = rows
        a = tl.zeros((BLOCK_R,), tl.float32)
    rowkey = mix32(rows.to(tl.uint32) ^ tl.load(key_ptr).to(tl.uint32))
    lo = tl.full((BLOCK_R,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    bad = tl.zeros((BLOCK_R,), tl.int32)
    if ONE_TILE:  # the row stays in registers: X and C_f are read once
        r, cols, ok = _residual_tile(x_ptr, c_ptr, rows, gen, a, row_ok, 0, n, stride_xb, stride_xn, stride_cb,
                                     stride_cn, HAS_BASE, BLOCK_N)
        lo, hi, bad = _tile_range(r, ok, lo, hi, bad)
        lo, scale = _row_scale(lo, hi, bad, BITS)
        _pack_tile(q_ptr, r, cols, ok, rows, row_ok, rowkey, lo, scale, 0, width, stride_qb, BITS, BLOCK_R, BLOCK_N)
    else:
        for n0 in range(0, n, BLOCK_N):
            r, cols, ok = _residual_tile(x_ptr, c_ptr, rows, gen, a, row_ok, n0, n, stride_xb, stride_xn,
                                         stride_cb, stride_cn, HAS_BASE, BLOCK_N)
            lo, hi, bad = _tile_range(r, ok, lo, hi, bad)
        lo, scale = _row_scale(lo, hi, bad, BITS)
        for n0 in range(0, n, BLOCK_N):
            r, cols, ok = _residual_tile(x_ptr, c_ptr, rows, gen, a, row_ok, n0, n, stride_xb, stride_xn,
                                         stride_cb, stride_cn, HAS_BASE, BLOCK_N)
            _pack_tile(q_ptr, r, cols, ok, rows, row_ok, rowkey, lo, scale, n0, width, stride_qb, BITS, BLOCK_R,
                       BLOCK_N)
    tl.store(lo_ptr + rows, lo, mask=row_ok)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _decode_kernel(q_ptr, lo_ptr, scale_ptr, c_ptr, f_ptr, alpha_ptr, out_ptr, b, n, stride_qb, stride_cb, stride_cn,
                   stride_ob, BITS: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """deq(q) (plus alpha * C_f, gathered by f, with a base) for this program's (BLOCK_R, BLOCK_N) tile."""
    per: tl.constexpr = 8 // BITS
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < b
    ok = row_ok[:, None] & (cols < n)[None, :]
    out = decode_tile(q_ptr, lo_ptr, scale_ptr, c_ptr, f_ptr, alpha_ptr, rows, cols, cols // per,
                      ((cols % per) * BITS).to(tl.int32), row_ok, ok, stride_qb, stride_cb, stride_cn, BITS, HAS_BASE)
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


#: Columns per tile at most. A row of up to MAX_TILE columns stays in registers between the passes.
MAX_TILE = 2048
#: Elements per (BLOCK_R x BLOCK_N) tile: 16 fp32 registers a thread at 4 warps, 8 at 8.
TILE_ELEMS = 2048


def _blocks(n: Any) -> tuple[int, int, bool]:
    """(BLOCK_R, BLOCK_N, ONE_TILE) for rows of n columns; a symbolic n takes the widest tile, looping."""
    if isinstance(n, torch.SymInt):
        return 1, MAX_TILE, False
    block_n = min(MAX_TILE, max(16, triton.next_power_of_2(n)))
    return max(1, TILE_ELEMS // block_n), block_n, n <= block_n


def quantize(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, key: Tensor,
             bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, lo, scale of R = X - alpha * C[f] (R = X without C, f, alpha), as the reference computes them; the
    body reads no tensor value on the host."""
    lowbit.check_bits(bits)
    check_dtype(x.dtype, "quantization")
    lowbit.check_base(c, f, alpha)
    b, n = x.shape
    width = lowbit.packed_bytes(n, bits)
    q = torch.zeros(b, width, dtype=torch.uint8, device=x.device)
    lo = torch.zeros(b, dtype=torch.float32, device=x.device)
    scale = torch.zeros(b, dtype=torch.float32, device=x.device)
    if b == 0 or n == 0:
        return q, lo, scale
    key = key.to(x.device).reshape(1)
    block_r, block_n, one_tile = _blocks(n)
    has_base = c is not None
    # Without a base the kernel reads none of C, f, alpha: X and the key (inputs, never written) stand in.
    c, f, alpha = (c, f, alpha.float()) if has_base else (x, key, key)
    _quantize_kernel[(triton.cdiv(b, block_r),)](
        x, c, f, alpha, key, q, lo, scale, b, n, width,
        x.stride(0), x.stride(1), c.stride(0), c.stride(1), q.stride(0),
        BITS=bits, HAS_BASE=has_base, ONE_TILE=one_tile, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )
    return q, lo, scale


def decode(q: Tensor, lo: Tensor, scale: Tensor, n: int, bits: int, dtype: torch.dtype, c: Tensor | None = None,
           f: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
    """X^ = deq(q) (+ alpha * C[f] with a base), (b, n) of ``dtype``: the twin of
    :func:`pamm_fx.kernels.lowbit.decode` with ``base=lowbit.base_rows(c, f, alpha, ...)``."""
    lowbit.check_bits(bits)
    check_dtype(dtype, "decoding")
    lowbit.check_base(c, f, alpha)
    b = q.shape[0]
    out = torch.empty(b, n, dtype=dtype, device=q.device)
    if b == 0 or n == 0:
        return out
    block_r, block_n, _ = _blocks(n)
    q = q.contiguous()
    has_base = c is not None
    c, f, alpha = (c, f, alpha.float()) if has_base else (out, q, lo)  # never read without a base
    _decode_kernel[(triton.cdiv(b, block_r), triton.cdiv(n, block_n))](
        q, lo.float(), scale.float(), c, f, alpha, out, b, n, q.stride(0), c.stride(0), c.stride(1),
        out.stride(0), BITS=bits, HAS_BASE=has_base, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )
    return out
