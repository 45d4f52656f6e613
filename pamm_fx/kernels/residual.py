"""A tensor R kept at 2, 4 or 8 bits with stochastic rounding: PAMM's residual, or X itself.

PAMM replaces each row X_i by X~_i = alpha_i C_f(i), which is biased. Storing R = X - X~ at
``bits`` bits per element, with a per-row (lo, scale) and stochastic rounding, makes the weight
gradient ``B~^T C + dY^T deq(q(R))`` unbiased given C (``estimator="pamm_sr"``): E[deq(q(R))] = R,
with variance at most scale_i^2 / 4 per element. Without a PAMM base (c, f, alpha all None,
``estimator="sr"``) R is X itself and ``dY^T deq(q(X))`` is unbiased outright.

Format, per row i of R (n elements):

* ``lo_i = min_j R_ij``, ``scale_i = (max_j R_ij - lo_i) / (2^bits - 1)``;
* ``q_ij = floor(v) + [u_ij < v - floor(v)]`` with ``v = (R_ij - lo_i) / scale_i`` (clamped to
  ``2^bits - 1``) and ``u_ij`` in [0, 1) a counter-based hash of (seed, salt, i, j), so that
  P(q = ceil v) = frac(v) up to 2^-24;
* 8 // bits codes per byte, element j in byte j // (8 // bits) at bit (j % (8 // bits)) * bits,
  each row padded with zero bits to ``ceil(n * bits / 8)`` bytes;
* ``deq_ij = lo_i + q_ij * scale_i``; the backward uses X^ = alpha * C_f + deq(q), or deq(q) without a
  base (:func:`reconstruct_reference`), inside its GEMM (:mod:`~pamm_fx.kernels.dequant_matmul`).

Exactness: a row with scale 0 (R == 0, e.g. at ratio 1 where X~ = X, or any constant row)
stores q = 0 and dequantizes to lo exactly. A row holding NaN or Inf (or whose range overflows)
gets lo = scale = NaN, so it dequantizes to NaN, as plain's dW would carry it. float64 X keeps
the whole computation, lo and scale in float64; every other dtype works in float32.

The noise is a pure function of its inputs on X's device (no torch RNG, no host
synchronisation): a recomputation, or another kernel for the same format, draws the same bits.

:func:`quantize_reference` and :func:`reconstruct_reference` (X^ = X~ + deq(q), what the
backward multiplies dY by, a chunk of rows at a time in :mod:`~pamm_fx.kernels.dequant_matmul`) are the
CPU path, chunked over rows so that no b x n float32 temporary exists in full, and what
:mod:`~pamm_fx.kernels.residual_triton` must match; :func:`dequantize_reference` decodes the format
alone. :func:`quantize_aten` / :func:`reconstruct_aten` are the same code on the whole tensor, for
Inductor to fuse into one pass. :func:`quantize` (eager) and :func:`quantize_traceable` (what Inductor
compiles) are the dispatchers: the only places that choose Triton or torch for the quantization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pamm_fx.kernels.device import use_triton
from pamm_fx.kernels.hashing import M32 as _M32
from pamm_fx.kernels.hashing import key_of, rotation_phases, stream_key
from pamm_fx.kernels.hashing import mix32 as _mix32

__all__ = [
    "BITS",
    "ROW_CHUNK",
    "dequantize_reference",
    "noise_key",
    "packed_bytes",
    "payload_bytes_per_row",
    "quantize",
    "quantize_aten",
    "quantize_reference",
    "quantize_rotated",
    "quantize_traceable",
    "reconstruct_aten",
    "reconstruct_reference",
    "work_dtype",
]

#: The supported code widths (a whole number of codes per byte).
BITS = (2, 4, 8)
#: Rows per chunk of the CPU path: bounds its float32 and int64 temporaries to ROW_CHUNK x n.
ROW_CHUNK = 2048

#: Separates this noise stream from the generator draw, which hashes the same (seed, salt).
_DOMAIN = 0x7E51D0A1


def noise_key(seed: Tensor, salt: int, opaque: bool = True) -> Tensor:
    """The 32-bit stream key (an int64 0-dim tensor on ``seed``'s device) of (seed, salt): the generator
    draw's key of salt ^ _DOMAIN, through ``pamm::stream_key`` unless ``opaque`` is False (tensor ops, for
    a wrapper whose kernel reads the key from a buffer anyway)."""
    return stream_key(seed, salt ^ _DOMAIN) if opaque else key_of(seed, salt ^ _DOMAIN)


def packed_bytes(n: Any, bits: int) -> Any:
    """Bytes per row of ``n`` codes of ``bits`` bits: ceil(n * bits / 8)."""
    return (n * bits + 7) // 8


def payload_bytes_per_row(n: int, bits: int, dtype: torch.dtype) -> int:
    """Bytes kept per row of an X of ``dtype``: ceil(n * bits / 8) packed codes plus lo and scale."""
    return packed_bytes(n, bits) + 2 * work_dtype(dtype).itemsize


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the residual math, lo and scale: float64 for float64 X, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"pamm: residual bits must be one of {BITS}, not {bits!r}")


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.int32, device=device)


def _check_base(c: Tensor | None, f: Tensor | None, alpha: Tensor | None) -> None:
    if (c is None) != (f is None) or (c is None) != (alpha is None):
        raise ValueError("pamm: the residual's base C, f, alpha must be given all three or none")


def _projection(c: Tensor | None, f: Tensor | None, alpha: Tensor | None, wd: torch.dtype) -> Tensor | None:
    """X~ = alpha[:, None] * C[f] in ``wd`` (None without a base): one expression for the quantization and
    the reconstruction."""
    if c is None:
        return None
    return alpha.to(wd)[:, None] * c.index_select(0, f.long()).to(wd)


def _hashed_noise(key: Tensor, row0: int, b: Any, n: Any, device: torch.device) -> Tensor:
    """u_ij in [0, 1): a 32-bit hash of (key, row0 + i, j) per element (the format's own noise, which the
    Triton kernels reproduce bit for bit)."""
    rows = torch.arange(row0, row0 + b, dtype=torch.int64, device=device)
    cols = torch.arange(n, dtype=torch.int64, device=device)
    h = _mix32(_mix32((rows & _M32) ^ key.to(device))[:, None] ^ cols[None, :])
    return (h >> 8).to(torch.float32) * 2.0**-24


def _quantize_rows(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, key: Tensor | None,
                   row0: int, bits: int, noise: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, lo, scale of rows row0 .. row0 + len(x) of X (the row index feeds the noise). The rounding noise is
    the per-element hash of ``key``, or, given ``noise`` = (row phases (b,), column offsets (n,)),
    u_ij = frac(p_i + c_j) (:func:`rotated_noise`)."""
    b, n = x.shape
    wd = work_dtype(x.dtype)
    levels = (1 << bits) - 1
    base = _projection(c, f, alpha, wd)
    r = x.to(wd) if base is None else x.to(wd) - base
    if n == 0:
        zero = torch.zeros(b, dtype=wd, device=x.device)
        return torch.zeros(b, 0, dtype=torch.uint8, device=x.device), zero, zero.clone()
    lo = r.amin(dim=1)
    scale = (r.amax(dim=1) - lo) / levels
    bad = ~(torch.isfinite(lo) & torch.isfinite(scale))  # NaN/Inf in the row, or a range past the dtype's max
    lo = torch.where(bad, torch.nan, lo)
    scale = torch.where(bad, torch.nan, scale)
    v = (r - lo[:, None]) / scale[:, None]
    fl = v.floor()
    if noise is None:
        u = _hashed_noise(key, row0, b, n, x.device)
    else:
        t = noise[0][:, None] + noise[1][None, :]
        u = t - t.floor()
    q = (fl + (u.to(wd) < v - fl).to(wd)).clamp_max(levels)
    q = torch.where(scale[:, None] > 0, q, 0).to(torch.int32)  # scale 0 or NaN: code 0
    if bits == 8:  # one code per byte: no packing (a sum over a size-1 dim would cost Inductor a reduction)
        return q.to(torch.uint8), lo, scale
    per = 8 // bits
    width = packed_bytes(n, bits)
    q = torch.nn.functional.pad(q, (0, width * per - n)).view(b, width, per)
    packed = (q << _shifts(bits, x.device)).sum(dim=2).to(torch.uint8)
    return packed, lo, scale


def _dequantize_rows(q: Tensor, lo: Tensor, scale: Tensor, n: int, bits: int, dtype: torch.dtype,
                     base: Tensor | None = None) -> Tensor:
    """deq(q) rows (plus ``base``, X~ in lo's dtype, when given) in ``dtype``."""
    b = q.shape[0]
    levels = (1 << bits) - 1
    if bits == 8:
        codes = q[:, :n]
    else:
        codes = (q.to(torch.int32)[:, :, None] >> _shifts(bits, q.device)) & levels
        codes = codes.reshape(b, q.shape[1] * (8 // bits))[:, :n]  # not -1: ambiguous for b = 0
    deq = lo[:, None] + codes.to(lo.dtype) * scale[:, None]
    return (deq if base is None else base + deq).to(dtype)


def quantize_reference(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, seed: Tensor,
                       salt: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize R = X - alpha[:, None] * C[f], or X itself without a base (the module docstring's format),
    ROW_CHUNK rows at a time.

    x: (b, n), c: (k, n), f: (b,) int32, alpha: (b,) float32 (or all three None), seed: int64 scalar tensor.
    Returns q (b, ceil(n * bits / 8)) uint8, lo (b,) and scale (b,) in :func:`work_dtype`.
    """
    _check_bits(bits)
    _check_base(c, f, alpha)
    b, n = x.shape
    wd = work_dtype(x.dtype)
    q = torch.empty(b, packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    lo = torch.empty(b, dtype=wd, device=x.device)
    scale = torch.empty(b, dtype=wd, device=x.device)
    key = noise_key(seed.to(x.device), salt)
    for r0 in range(0, b, ROW_CHUNK):
        r1 = min(b, r0 + ROW_CHUNK)
        part = (None, None) if c is None else (f[r0:r1], alpha[r0:r1])
        q[r0:r1], lo[r0:r1], scale[r0:r1] = _quantize_rows(x[r0:r1], c, *part, key, r0, bits)
    return q, lo, scale


def dequantize_reference(q: Tensor, lo: Tensor, scale: Tensor, n: int, bits: int, dtype: torch.dtype) -> Tensor:
    """deq(q) = lo + q * scale as a (b, n) tensor of ``dtype``, ROW_CHUNK rows at a time."""
    _check_bits(bits)
    b = q.shape[0]
    out = torch.empty(b, n, dtype=dtype, device=q.device)
    for r0 in range(0, b, ROW_CHUNK):
        r1 = min(b, r0 + ROW_CHUNK)
        out[r0:r1] = _dequantize_rows(q[r0:r1], lo[r0:r1], scale[r0:r1], n, bits, dtype)
    return out


def reconstruct_reference(q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
                          alpha: Tensor | None, bits: int, n: int, dtype: torch.dtype) -> Tensor:
    """X^ = alpha[:, None] * C[f] + deq(q) (deq(q) without a base), (b, n) of ``dtype``, ROW_CHUNK rows at a time.

    What the backward multiplies dY by: under ``pamm_sr`` dY^T X^ = B~^T C + dY^T deq(q) in one GEMM (at
    ratio 1, C = X, f = identity, alpha = 1, R = 0, X^ is X bit for bit); under ``sr`` dY^T deq(q(X)).
    """
    _check_bits(bits)
    _check_base(c, f, alpha)
    b = q.shape[0]
    out = torch.empty(b, n, dtype=dtype, device=q.device)
    for r0 in range(0, b, ROW_CHUNK):
        r1 = min(b, r0 + ROW_CHUNK)
        base = None if c is None else _projection(c, f[r0:r1], alpha[r0:r1], lo.dtype)
        out[r0:r1] = _dequantize_rows(q[r0:r1], lo[r0:r1], scale[r0:r1], n, bits, dtype, base)
    return out


def quantize_aten(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, seed: Tensor, salt: int,
                  bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize_reference` in whole-tensor aten ops (bitwise the same), for Inductor to fuse."""
    _check_bits(bits)
    _check_base(c, f, alpha)
    return _quantize_rows(x, c, f, alpha, noise_key(seed.to(x.device), salt), 0, bits)


def quantize_rotated(x: Tensor, seed: Tensor, salt: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize_aten` of X (no base) in the same format, with the cheaper rotated noise: u_ij =
    frac(p_i + c_j), p a hash per row, c a hash per column, both from (seed, salt) and computed once
    (:func:`~pamm_fx.kernels.hashing.rotation_phases`, opaque so that Inductor does not hash per element).

    For every element u_ij is uniform on [0, 1) (p_i is), so E[deq(q)] = X still; rows are independent
    of each other, and within a row the offsets are one random rotation of the call's column offsets. It
    costs three float operations per element instead of a 32-bit hash (about halving the quantization's
    time on a CPU). What ``saved`` compresses uses it; the estimators keep the hashed noise their Triton
    kernels reproduce.
    """
    _check_bits(bits)
    b, n = x.shape
    phases = rotation_phases(seed.to(x.device), salt ^ _DOMAIN, b, n)
    return _quantize_rows(x, None, None, None, None, 0, bits, phases)


def reconstruct_aten(q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
                     alpha: Tensor | None, bits: int, n: int, dtype: torch.dtype) -> Tensor:
    """:func:`reconstruct_reference` in whole-tensor aten ops, for Inductor to fuse."""
    _check_bits(bits)
    _check_base(c, f, alpha)
    return _dequantize_rows(q, lo, scale, n, bits, dtype, _projection(c, f, alpha, lo.dtype))


def quantize(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, seed: Tensor, salt: int,
             bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, lo, scale, eagerly: the Triton kernel on CUDA, else :func:`quantize_reference`."""
    if use_triton(x, x.dtype):
        from pamm_fx.kernels import residual_triton

        return residual_triton.quantize_residual(x, c, f, alpha, seed, salt, bits)
    return quantize_reference(x, c, f, alpha, seed, salt, bits)


def quantize_traceable(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, seed: Tensor,
                       salt: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """The quantization Inductor can see: the Triton op on CUDA, whole-tensor aten ops elsewhere."""
    if use_triton(x, x.dtype):
        from pamm_fx.kernels import residual_triton

        return residual_triton.quantize_residual_triton(x, c, f, alpha, seed, salt, bits)
    return quantize_aten(x, c, f, alpha, seed, salt, bits)

