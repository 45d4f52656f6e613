"""Quantization into the low-bit format (:mod:`~pamm_fx.kernels.lowbit`): X, or X minus a base.

``estimator="sr"`` keeps X itself (no base: c, f, alpha all None); ``"pamm_sr"`` keeps PAMM's residual
R = X - alpha C_f, whose base the decoding adds back. The rounding noise is the format's hashed noise,
keyed by ``key`` (the noise stream's key, :func:`pamm_fx.kernels.lowbit.noise_key`; the op reads it from
``pamm::stream_key``), so that the reference, the aten form and the Triton kernel
(:mod:`~pamm_fx.kernels.quantize_triton`) draw the same bits.

:func:`reference` is the CPU path, :data:`~pamm_fx.kernels.device.ROW_CHUNK` rows at a time so that no
b x n float32 temporary exists in full; :func:`aten` is the same code on the whole tensor (bitwise the
same: the row index feeds the noise), for Inductor to fuse into one pass; :data:`KERNELS` declares them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pamm_fx.kernels import device, lowbit
from pamm_fx.kernels.device import Kernels, work_dtype

__all__ = ["KERNELS", "aten", "reference"]

Quantized = tuple[Tensor, Tensor, Tensor]


def _rows(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, key: Tensor, row0: int,
          bits: int) -> Quantized:
    """q, lo, scale of rows row0 .. row0 + len(x) of X (the row index feeds the noise)."""
    b, n = x.shape
    wd = work_dtype(x.dtype)
    base = lowbit.base_rows(c, f, alpha, wd)
    r = x.to(wd) if base is None else x.to(wd) - base
    return lowbit.encode(r, lambda: lowbit.hashed_noise(key, row0, b, n, x.device), bits)


def reference(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, key: Tensor,
              bits: int) -> Quantized:
    """Quantize R = X - alpha[:, None] * C[f], or X itself without a base, a chunk of rows at a time.

    x: (b, n), c: (k, n), f: (b,) int32, alpha: (b,) float32 (or all three None), key: the noise key.
    Returns q (b, ceil(n * bits / 8)) uint8, lo (b,) and scale (b,) in the work dtype.
    """
    lowbit.check_bits(bits)
    lowbit.check_base(c, f, alpha)
    b, n = x.shape
    wd = work_dtype(x.dtype)
    q = torch.empty(b, lowbit.packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    lo = torch.empty(b, dtype=wd, device=x.device)
    scale = torch.empty(b, dtype=wd, device=x.device)
    key = key.to(x.device)
    chunk = device.ROW_CHUNK
    for r0 in range(0, b, chunk):
        r1 = min(b, r0 + chunk)
        part = (None, None) if c is None else (f[r0:r1], alpha[r0:r1])
        q[r0:r1], lo[r0:r1], scale[r0:r1] = _rows(x[r0:r1], c, *part, key, r0, bits)
    return q, lo, scale


def aten(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, key: Tensor, bits: int) -> Quantized:
    """:func:`reference` in whole-tensor aten ops (bitwise the same), for Inductor to fuse."""
    lowbit.check_bits(bits)
    lowbit.check_base(c, f, alpha)
    return _rows(x, c, f, alpha, key.to(x.device), 0, bits)


def _triton() -> Callable[..., Quantized]:
    from pamm_fx.kernels import quantize_triton

    return quantize_triton.quantize


#: The quantization's implementations: ``(x, c, f, alpha, key, bits) -> (q, lo, scale)``, decided by X.
KERNELS = Kernels(reference, aten, _triton, lambda x, c, f, alpha, key, bits: (x, x.dtype))
