"""What the Triton kernels share: the interpreter flag, the float32 dot precision, the counter hash's twin,
the low-bit format's decode of one tile.

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

__all__ = ["INTERPRETED", "check_dtype", "decode_tile", "dot_precision", "mix32"]

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


@triton.jit
def decode_tile(q_ptr, lo_ptr, scale_ptr, c_ptr, f_ptr, alpha_ptr, rows, cols, byte_col, shift, row_ok, ok,
                stride_qb, stride_cb, stride_cn, BITS: tl.constexpr, HAS_BASE: tl.constexpr):
    """X^'s (rows x cols) tile in float32 from the low-bit codes (:func:`pamm_fx.kernels.lowbit.decode`'s twin):
    lo + code * scale per row, plus alpha * C_f gathered by f with a base. ``byte_col`` (cols // (8 // BITS))
    and ``shift`` (each column's bit offset in its byte, int32) come from the caller, which may hoist them."""
    levels: tl.constexpr = (1 << BITS) - 1
    byte = tl.load(q_ptr + rows[:, None] * stride_qb + byte_col[None, :], mask=ok, other=0).to(tl.int32)
    code = byte if BITS == 8 else (byte >> shift[None, :]) & levels
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    x_hat = lo[:, None] + code.to(tl.float32) * scale[:, None]
    if HAS_BASE:
        gen = tl.load(f_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        a = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
        cf = tl.load(c_ptr + gen[:, None] * stride_cb + cols[None, :] * stride_cn, mask=ok, other=0.0)
        x_hat = a[:, None] * cf.to(tl.float32) + x_hat
    return x_hat
