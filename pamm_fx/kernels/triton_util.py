"""What the Triton kernels share: the interpreter flag, the float32 dot precision, the counter hash's twin.

Imported by the Triton modules only (so, like them, on first CUDA use or by the kernel tests), never by a
CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from pamm_fx.kernels.device import triton_dtype
from pamm_fx.kernels.hashing import HASH_MUL

__all__ = ["INTERPRETED", "check_dtype", "dot_precision", "mix32"]

_HASH_MUL: tl.constexpr = tl.constexpr(HASH_MUL)


@triton.jit
def mix32(x):
    """:func:`pamm_fx.kernels.hashing.mix32` on uint32 (wrapping products = the reference's masked int64 ones)."""
    x = x ^ (x >> 16)
    x = x * _HASH_MUL
    x = x ^ (x >> 16)
    x = x * _HASH_MUL
    return x ^ (x >> 16)


#: True under TRITON_INTERPRET=1 (read once, as ``@triton.jit`` does), whose tl.dot multiplies bf16 bit
#: patterns as integers (numpy has no bf16).
INTERPRETED = isinstance(mix32, InterpretedFunction)


def dot_precision() -> str:
    """``tl.dot`` precision for float32 tiles: TF32 exactly when torch allows TF32 for CUDA matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def check_dtype(dtype: torch.dtype, what: str) -> None:
    """Raise unless the Triton kernels take ``dtype`` (float64 never comes here: device.use_triton)."""
    if not triton_dtype(dtype):
        raise TypeError(f"pamm: the Triton {what} takes float32/bfloat16/float16, not {dtype}")
