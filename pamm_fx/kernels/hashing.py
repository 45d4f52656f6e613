"""The 32-bit counter hash behind every PAMM random draw (generator rows, rounding noise).

One definition for the generator draw (:mod:`pamm_fx.ops.compress`) and the residual's rounding noise
(:mod:`pamm_fx.kernels.residual`; its Triton twin mirrors it on uint32). No RNG state: a draw is a
pure function of (seed, salt, index), so it needs no host synchronisation and repeats exactly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HASH_MUL", "M32", "mix32"]

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
