"""The weight gradient dW = dY^T X^ straight from a low-bit copy, without a b x n X^ in memory.

X^ is what the backward multiplies dY by when X was kept in the low-bit format
(:mod:`pamm_fx.kernels.lowbit`): ``X^ = alpha[:, None] * C[f] + deq(q)`` when the codes hold PAMM's
residual R = X - alpha * C_f (``pamm_sr``), or ``X^ = deq(q)`` when they hold X itself (no base:
``c``, ``f`` and ``alpha`` all None). Materialising X^ costs a transient b x n tensor per group, as
large as the X the estimator set out not to keep; here the reduction over the b token rows decodes
the codes as it goes, so no b x n temporary exists.

Precision, as the explicit ``dY^T.to(D) @ X^`` in the operand dtype D (C's dtype with a base, else
dY's): X^ rows are formed in lo's dtype (float32, float64 for float64), rounded to D, and the
products are summed in float32 (float64 for D = float64) over all b rows before one rounding to
``out_dtype`` (default D). For float32 that is the explicit GEMM up to summation order; for
bf16/fp16 it keeps the float32 sum that the explicit path rounds to D before casting to the
weight's dtype. A NaN row (lo = scale = NaN) makes every column of dW NaN, as plain's dY^T X.

:func:`reference` is the CPU path, :data:`~pamm_fx.kernels.device.ROW_CHUNK` rows at a time (up to
ROW_CHUNK rows with dW in D: the explicit GEMM itself, so that X^ = X gives plain's dW bit for bit);
:func:`aten` is the whole-tensor form for Inductor (the explicit decoding plus one GEMM, in D); the Triton
kernel (CUDA, float32/bf16/fp16 D) is :mod:`~pamm_fx.kernels.dequant_matmul_triton`. :data:`KERNELS`
declares them; the arguments are those of the op: ``(dy, q, lo, scale, c, f, alpha, bits, n, out_dtype)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pamm_fx.kernels import device, lowbit
from pamm_fx.kernels.device import Kernels, work_dtype

__all__ = ["KERNELS", "aten", "operand_dtype", "reference"]


def operand_dtype(dy: Tensor, c: Tensor | None) -> torch.dtype:
    """D, the dtype X^ is rounded to and dY is cast to: C's with a base (as the backward casts dY to
    C's dtype), else dY's."""
    return dy.dtype if c is None else c.dtype


def _check(dy: Tensor, q: Tensor, bits: int, c: Tensor | None, f: Tensor | None, alpha: Tensor | None) -> None:
    lowbit.check_bits(bits)
    lowbit.check_base(c, f, alpha)
    if dy.dim() != 2 or dy.shape[0] != q.shape[0]:
        raise ValueError(f"pamm: dy must be (b, m) with b = {q.shape[0]} rows of codes, not {tuple(dy.shape)}")


def _x_hat(q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None,
           bits: int, n: int, dtype: torch.dtype) -> Tensor:
    """X^ = X~ + deq(q) (deq(q) without a base) of these rows, in ``dtype``."""
    return lowbit.decode(q, lo, scale, n, bits, dtype, lowbit.base_rows(c, f, alpha, lo.dtype))


def reference(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
              alpha: Tensor | None, bits: int, n: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """dW = dY^T X^, (m, n) in ``out_dtype`` (default D), ROW_CHUNK rows of X^ at a time (one GEMM in D
    when that is one chunk and ``out_dtype`` is D).

    dy: (b, m); q: (b, ceil(n * bits / 8)) uint8; lo, scale: (b,); c: (k, n), f: (b,) int, alpha:
    (b,) for the PAMM base, or all None. Temporaries are ROW_CHUNK x n and the m x n accumulator.
    """
    _check(dy, q, bits, c, f, alpha)
    d = operand_dtype(dy, c)
    acc_dtype = work_dtype(d)
    b, m = dy.shape
    chunk = device.ROW_CHUNK
    if b <= chunk and (out_dtype or d) == d:
        # One chunk, dW in D: the explicit GEMM itself (whose products D's GEMM sums in float32), so that
        # X^ = X (pamm_sr at ratio 1) gives plain's dY^T X bit for bit in every dtype.
        return dy.to(d).t().mm(_x_hat(q, lo, scale, c, f, alpha, bits, n, d))
    acc = torch.zeros(m, n, dtype=acc_dtype, device=dy.device)
    for r0 in range(0, b, chunk):
        r1 = min(b, r0 + chunk)
        part = (None, None) if c is None else (f[r0:r1], alpha[r0:r1])
        x_hat = _x_hat(q[r0:r1], lo[r0:r1], scale[r0:r1], c, *part, bits, n, d)
        acc.addmm_(dy[r0:r1].to(d).t().to(acc_dtype), x_hat.to(acc_dtype))
    return acc.to(out_dtype or d)


def aten(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
         alpha: Tensor | None, bits: int, n: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """dY^T X^ in whole-tensor aten ops for Inductor: X^ (b, n) in D, then one GEMM in D (the product
    rounded to D before ``out_dtype``, as the explicit backward does)."""
    _check(dy, q, bits, c, f, alpha)
    d = operand_dtype(dy, c)
    return dy.to(d).t().mm(_x_hat(q, lo, scale, c, f, alpha, bits, n, d)).to(out_dtype or d)


def _triton() -> Callable[..., Tensor]:
    from pamm_fx.kernels import dequant_matmul_triton

    return dequant_matmul_triton.weight_grad


#: The weight gradient's implementations, decided by dY's device and the operand dtype D.
KERNELS = Kernels(reference, aten, _triton,
                  lambda dy, q, lo, scale, c, f, alpha, bits, n, out_dtype=None: (dy, operand_dtype(dy, c)))
