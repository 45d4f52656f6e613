"""The 32-bit counter hash behind every PAMM random draw (generator rows, rounding noise).

One definition for the generator draw (:mod:`pamm_fx.ops.compress`) and the low-bit format's rounding
noise (:mod:`pamm_fx.kernels.lowbit`); the Triton kernels' twin (:func:`pamm_fx.kernels.triton_util.mix32`)
takes :data:`HASH_MUL` from here. No RNG state: a draw is a pure function of (seed, salt, index), so it
needs no host synchronisation and repeats exactly. The opaque ops that hash a seed once per call
(``pamm::stream_key``, ``pamm::rotation_phases``) are declared in :mod:`pamm_fx.ops.noise`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HASH_MUL", "M32", "key_of", "mix32"]

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
