"""The 32-bit counter hash behind every PAMM random draw (generator rows, rounding noise).

One definition for the generator draw (:mod:`pamm_fx.ops.compress`) and the residual's rounding noise
(:mod:`pamm_fx.kernels.residual`; its Triton twin mirrors it on uint32). No RNG state: a draw is a
pure function of (seed, salt, index), so it needs no host synchronisation and repeats exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HASH_MUL", "M32", "key_of", "mix32", "rotation_phases", "stream_key"]

M32 = (1 << 32) - 1
#: Odd 27-bit multiplier of a 32-bit integer hash (x ^= x >> 16; x *= H; ...): a 32-bit value times it
#: stays below 2^59, so int64 arithmetic never overflows on any device or compiler.
HASH_MUL = 0x45D9F3B


def mix32(x: Any) -> Any:
    """A 32-bit integer hash on int64 values in [0, 2^32) (tensors or Python ints alike)."""
    x = x ^ (x >> 16)
    x = (x * HASH_MUL) & M32
    x = x ^ (x >> 16)
    x = (x * HASH_MUL) & M32
    return x ^ (x >> 16)


def key_of(seed: Tensor, salt: int) -> Tensor:
    """The 32-bit key (an int64 0-dim tensor on ``seed``'s device) of the stream (seed, salt), in tensor ops."""
    s = seed.to(torch.int64)
    lo = mix32((s & M32) ^ mix32(salt & M32))
    return mix32(((s >> 32) & M32) ^ mix32(lo ^ ((salt >> 32) & M32)))


@torch.library.custom_op("pamm::stream_key", mutates_args=())
def stream_key(seed: Tensor, salt: int) -> Tensor:
    """:func:`key_of` as an op of its own, with no decomposition, so that Inductor computes the key once into
    a buffer. Inlined into the per-row or per-element hash that reads it, its three nested ``mix32`` rounds
    multiply that expression's size by 2^9 (``x ^ (x >> 16)`` reads x twice), and compiling one
    rounding-noise kernel took minutes. (A Triton wrapper, whose kernel reads the key from a buffer anyway,
    uses :func:`key_of`.)
    """
    return key_of(seed, salt)


@stream_key.register_fake
def _(seed: Tensor, salt: int) -> Tensor:
    return seed.new_empty((), dtype=torch.int64)


@torch.library.custom_op("pamm::rotation_phases", mutates_args=())
def rotation_phases(seed: Tensor, salt: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """Per-row phases p (rows,) and per-column offsets c (cols,) in [0, 1), float32, hashed from (seed, salt):
    the rotated rounding noise u_ij = frac(p_i + c_j). Its own op, like :func:`stream_key`, so that Inductor
    computes the hashes once per row and column instead of inlining them into every element."""
    key = key_of(seed, salt)
    r = torch.arange(rows, dtype=torch.int64, device=seed.device)
    c = torch.arange(cols, dtype=torch.int64, device=seed.device)
    p = (mix32((r & M32) ^ key) >> 8).to(torch.float32) * 2.0**-24
    off = (mix32(mix32(c & M32) ^ key ^ 0x5BD1E995) >> 8).to(torch.float32) * 2.0**-24
    return p, off


@rotation_phases.register_fake
def _(seed: Tensor, salt: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    return seed.new_empty(rows, dtype=torch.float32), seed.new_empty(cols, dtype=torch.float32)
