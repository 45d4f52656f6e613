"""The low-bit format: rows of a tensor at 2, 4 or 8 bits per element with stochastic rounding.

One format for every tensor pamm-fx keeps at low precision: X itself (``estimator="sr"``), PAMM's
residual R = X - X~ (``"pamm_sr"``, where the codes are relative to the *base* X~ = alpha C_f), and the
tensors the partitioner keeps for the backward (``saved``, :mod:`pamm_fx.saved`). Every kernel of the
low-bit path (:mod:`~pamm_fx.kernels.quantize`, :mod:`~pamm_fx.kernels.dequant_matmul` and their Triton
twins) takes its constants and its checks from here, so nothing of the format is written twice.

Per row i (n elements, in :func:`~pamm_fx.kernels.device.work_dtype`: float32, float64 for float64):

* ``lo_i = min_j R_ij``, ``scale_i = (max_j R_ij - lo_i) / (2^bits - 1)``;
* ``q_ij = floor(v) + [u_ij < v - floor(v)]`` with ``v = (R_ij - lo_i) / scale_i`` (clamped to
  ``2^bits - 1``), so P(q = ceil v) = frac(v) up to 2^-24 and E[deq] = R: every gradient linear in the
  tensor is unbiased (variance at most scale_i^2 / 4 per element);
* 8 // bits codes per byte, element j in byte j // (8 // bits) at bit (j % (8 // bits)) * bits, each row
  padded with zero bits to ``ceil(n * bits / 8)`` bytes (8 bits: one code per byte, no packing);
* ``deq_ij = lo_i + q_ij * scale_i`` (plus the base's row when there is one).

A row with scale 0 (R == 0, e.g. ``pamm_sr`` at ratio 1 where X~ = X, or any constant row) stores q = 0
and decodes to lo exactly. A row holding NaN or Inf (or whose range overflows) gets lo = scale = NaN and
decodes to NaN, as plain's gradients would carry it.

The rounding noise u is a pure function of (seed, salt, row, column) on the tensor's device, from the
counter hash of :mod:`~pamm_fx.kernels.hashing` (no RNG state, no host synchronisation, a recomputation
draws the same bits), in one of two kinds:

* hashed (:func:`hashed_noise`): a 32-bit hash per element, which the Triton kernels reproduce bit for
  bit; the estimators use it;
* rotated (:func:`rotated_noise`): u_ij = frac(p_i + c_j) from a hash per row and per column (computed
  once per call by ``pamm::rotation_phases``), three float operations per element instead of a hash;
  still uniform per element, rows independent; what ``saved`` uses.

Both are keyed by the stream (seed, salt ^ :data:`NOISE_DOMAIN`), which separates them from the generator
draw that hashes the same (seed, salt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pamm_fx.kernels.device import work_dtype
from pamm_fx.kernels.hashing import M32, key_of, mix32

__all__ = [
    "BITS",
    "COLUMN_DOMAIN",
    "NOISE_DOMAIN",
    "LowBit",
    "base_rows",
    "bytes_per_row",
    "check_base",
    "check_bits",
    "decode",
    "encode",
    "hashed_noise",
    "noise_key",
    "packed_bytes",
    "rotation_phases",
    "rotated_noise",
]

#: The supported code widths (a whole number of codes per byte).
BITS = (2, 4, 8)
#: Separates the rounding noise's stream from the generator draw, which hashes the same (seed, salt).
NOISE_DOMAIN = 0x7E51D0A1
#: Separates the rotated noise's column offsets from its row phases.
COLUMN_DOMAIN = 0x5BD1E995


def check_bits(bits: Any) -> None:
    """Raise unless ``bits`` is one of :data:`BITS`: the one check every low-bit kernel and op runs."""
    if type(bits) is not int or bits not in BITS:
        raise ValueError(f"pamm: bits per element must be one of {BITS}, not {bits!r}")


def packed_bytes(n: Any, bits: int) -> Any:
    """Bytes per row of ``n`` codes of ``bits`` bits: ceil(n * bits / 8)."""
    return (n * bits + 7) // 8


def bytes_per_row(n: int, bits: int, dtype: torch.dtype) -> int:
    """Bytes kept per row of ``n`` elements of ``dtype``: the packed codes plus lo and scale."""
    return packed_bytes(n, bits) + 2 * work_dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LowBit:
    """The format at ``bits`` per element: what an estimator's payload or a saved tensor is kept in."""

    bits: int

    def __post_init__(self) -> None:
        check_bits(self.bits)

    def bytes_per_row(self, n: int, dtype: torch.dtype) -> int:
        """Bytes per row of ``n`` elements of ``dtype`` (:func:`bytes_per_row`)."""
        return bytes_per_row(n, self.bits, dtype)


def check_base(c: Tensor | None, f: Tensor | None, alpha: Tensor | None) -> None:
    """A base is C, f and alpha together, or none of them."""
    if (c is None) != (f is None) or (c is None) != (alpha is None):
        raise ValueError("pamm: the base C, f, alpha of low-bit codes must be given all three or none")


def base_rows(c: Tensor | None, f: Tensor | None, alpha: Tensor | None, wd: torch.dtype) -> Tensor | None:
    """The base X~ = alpha[:, None] * C[f] in ``wd`` (None without one): one expression for the encoding
    of R = X - X~ and the decoding X^ = X~ + deq(q)."""
    if c is None:
        return None
    return alpha.to(wd)[:, None] * c.index_select(0, f.long()).to(wd)


def noise_key(seed: Tensor, salt: int) -> Tensor:
    """The noise stream's 32-bit key (an int64 0-dim tensor) in plain tensor ops: what ``pamm::stream_key``
    computes opaquely for the ops (a kernel reads it from a buffer; tests call this)."""
    return key_of(seed, salt ^ NOISE_DOMAIN)


def hashed_noise(key: Tensor, row0: Any, b: Any, n: Any, device: torch.device) -> Tensor:
    """u_ij in [0, 1) for rows row0 .. row0 + b: a 32-bit hash of (key, row, column) per element."""
    rows = torch.arange(row0, row0 + b, dtype=torch.int64, device=device)
    cols = torch.arange(n, dtype=torch.int64, device=device)
    h = mix32(mix32((rows & M32) ^ key.to(device))[:, None] ^ cols[None, :])
    return (h >> 8).to(torch.float32) * 2.0**-24


def rotation_phases(key: Tensor, rows: Any, cols: Any) -> tuple[Tensor, Tensor]:
    """Row phases p (rows,) and column offsets c (cols,) in [0, 1), float32, of the rotated noise."""
    r = torch.arange(rows, dtype=torch.int64, device=key.device)
    c = torch.arange(cols, dtype=torch.int64, device=key.device)
    p = (mix32((r & M32) ^ key) >> 8).to(torch.float32) * 2.0**-24
    off = (mix32(mix32(c & M32) ^ key ^ COLUMN_DOMAIN) >> 8).to(torch.float32) * 2.0**-24
    return p, off


def rotated_noise(phases: tuple[Tensor, Tensor]) -> Tensor:
    """u_ij = frac(p_i + c_j) from :func:`rotation_phases`."""
    t = phases[0][:, None] + phases[1][None, :]
    return t - t.floor()


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.int32, device=device)


def encode(r: Tensor, noise: Callable[[], Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (b, ceil(n * bits / 8)) uint8, lo (b,), scale (b,) of the rows of ``r`` (b, n, in its work dtype),
    rounded with the noise u (b, n) that ``noise()`` draws (:func:`hashed_noise` or :func:`rotated_noise`;
    drawn where the rounding needs it, so a traced graph keeps one order of ops)."""
    b, n = r.shape
    wd = r.dtype
    levels = (1 << bits) - 1
    if n == 0:
        zero = torch.zeros(b, dtype=wd, device=r.device)
        return torch.zeros(b, 0, dtype=torch.uint8, device=r.device), zero, zero.clone()
    lo = r.amin(dim=1)
    scale = (r.amax(dim=1) - lo) / levels
    bad = ~(torch.isfinite(lo) & torch.isfinite(scale))  # NaN/Inf in the row, or a range past the dtype's max
    lo = torch.where(bad, torch.nan, lo)
    scale = torch.where(bad, torch.nan, scale)
    v = (r - lo[:, None]) / scale[:, None]
    fl = v.floor()
    u = noise()
    q = (fl + (u.to(wd) < v - fl).to(wd)).clamp_max(levels)
    q = torch.where(scale[:, None] > 0, q, 0).to(torch.int32)  # scale 0 or NaN: code 0
    if bits == 8:  # one code per byte: no packing (a sum over a size-1 dim would cost Inductor a reduction)
        return q.to(torch.uint8), lo, scale
    per = 8 // bits
    width = packed_bytes(n, bits)
    q = torch.nn.functional.pad(q, (0, width * per - n)).view(b, width, per)
    packed = (q << _shifts(bits, r.device)).sum(dim=2).to(torch.uint8)
    return packed, lo, scale


def decode(q: Tensor, lo: Tensor, scale: Tensor, n: int, bits: int, dtype: torch.dtype,
           base: Tensor | None = None) -> Tensor:
    """deq(q) rows (plus ``base``, X~ in lo's dtype, when given) as a (b, n) tensor of ``dtype``."""
    b = q.shape[0]
    levels = (1 << bits) - 1
    if bits == 8:
        codes = q[:, :n]
    else:
        codes = (q.to(torch.int32)[:, :, None] >> _shifts(bits, q.device)) & levels
        codes = codes.reshape(b, q.shape[1] * (8 // bits))[:, :n]  # not -1: ambiguous for b = 0
    deq = lo[:, None] + codes.to(lo.dtype) * scale[:, None]
    return (deq if base is None else base + deq).to(dtype)
