"""The two opaque ops that hash a per-call seed once: ``pamm::stream_key`` and ``pamm::rotation_phases``.

Every random draw of pamm-fx is a counter hash of (seed, salt, index) (:mod:`pamm_fx.kernels.hashing`).
Hashing the seed itself takes three nested ``mix32`` rounds; inlined into a per-row or per-element hash
that reads it, they multiply that expression's size by 2^9 (``x ^ (x >> 16)`` reads x twice), and compiling
one rounding-noise kernel took minutes. So the seed's hashes are ops of their own, with no decomposition:
Inductor computes each once per call into a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pamm_fx.kernels import lowbit
from pamm_fx.kernels.hashing import key_of

__all__ = ["rotation_phases", "stream_key"]


@torch.library.custom_op("pamm::stream_key", mutates_args=())
def stream_key(seed: Tensor, salt: int) -> Tensor:
    """The 32-bit key (an int64 0-dim tensor on ``seed``'s device) of the stream (seed, salt)
    (:func:`~pamm_fx.kernels.hashing.key_of`): the generator draw's, and the rounding noise's with
    ``salt ^ NOISE_DOMAIN``. (A Triton kernel reads it from this op's buffer.)"""
    return key_of(seed, salt)


@stream_key.register_fake
def _(seed: Tensor, salt: int) -> Tensor:
    return seed.new_empty((), dtype=torch.int64)


@torch.library.custom_op("pamm::rotation_phases", mutates_args=())
def rotation_phases(seed: Tensor, salt: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """Per-row phases p (rows,) and per-column offsets c (cols,) in [0, 1), float32, hashed from (seed, salt):
    the low-bit format's rotated rounding noise u_ij = frac(p_i + c_j)
    (:func:`~pamm_fx.kernels.lowbit.rotation_phases`), computed once per row and column."""
    return lowbit.rotation_phases(key_of(seed, salt), rows, cols)


@rotation_phases.register_fake
def _(seed: Tensor, salt: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    return seed.new_empty(rows, dtype=torch.float32), seed.new_empty(cols, dtype=torch.float32)
