"""The weight gradient dW = dY^T X^ straight from a low-bit copy, without a b x n X^ in memory.

X^ is what the backward multiplies dY by when X was kept in the format of
:mod:`pamm_fx.kernels.residual`: ``X^ = alpha[:, None] * C[f] + deq(q)`` when the codes hold PAMM's
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

:func:`weight_grad_reference` is the CPU path, ROW_CHUNK rows at a time (up to ROW_CHUNK rows with dW
in D: the explicit GEMM itself, so that X^ = X gives plain's dW bit for bit); :func:`weight_grad_aten`
is the whole-tensor form for Inductor (the explicit reconstruction plus one GEMM, in D);
:func:`weight_grad` (eager) and :func:`weight_grad_traceable` (what Inductor compiles) are the
dispatchers, the only places that choose the Triton kernel of
:mod:`~pamm_fx.kernels.dequant_matmul_triton` (CUDA, float32/bf16/fp16) or torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pamm_fx.kernels import residual
from pamm_fx.kernels.device import use_triton

__all__ = ["operand_dtype", "weight_grad", "weight_grad_aten", "weight_grad_reference", "weight_grad_traceable"]


def operand_dtype(dy: Tensor, c: Tensor | None) -> torch.dtype:
    """D, the dtype X^ is rounded to and dY is cast to: C's with a base (as the backward casts dY to
    C's dtype), else dY's."""
    return dy.dtype if c is None else c.dtype


def _check(dy: Tensor, q: Tensor, bits: int, c: Tensor | None, f: Tensor | None, alpha: Tensor | None) -> None:
    if bits not in residual.BITS:
        raise ValueError(f"pamm: residual bits must be one of {residual.BITS}, not {bits!r}")
    if (c is None) != (f is None) or (c is None) != (alpha is None):
        raise ValueError("pamm: the PAMM base takes c, f and alpha together (all or none)")
    if dy.dim() != 2 or dy.shape[0] != q.shape[0]:
        raise ValueError(f"pamm: dy must be (b, m) with b = {q.shape[0]} rows of codes, not {tuple(dy.shape)}")


def weight_grad_reference(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, bits: int, n: int,
                          c: Tensor | None = None, f: Tensor | None = None, alpha: Tensor | None = None,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """dW = dY^T X^, (m, n) in ``out_dtype`` (default D), ROW_CHUNK rows of X^ at a time (one GEMM in D
    when that is one chunk and ``out_dtype`` is D).

    dy: (b, m); q: (b, ceil(n * bits / 8)) uint8; lo, scale: (b,); c: (k, n), f: (b,) int, alpha:
    (b,) for the PAMM base, or all None. Temporaries are ROW_CHUNK x n and the m x n accumulator.
    """
    _check(dy, q, bits, c, f, alpha)
    d = operand_dtype(dy, c)
    acc_dtype = residual.work_dtype(d)
    b, m = dy.shape
    if b <= residual.ROW_CHUNK and (out_dtype or d) == d:
        # One chunk, dW in D: the explicit GEMM itself (whose products D's GEMM sums in float32), so that
        # X^ = X (pamm_sr at ratio 1) gives plain's dY^T X bit for bit in every dtype.
        x_hat = residual.reconstruct_reference(q, lo, scale, c, f, alpha, bits, n, d)
        return dy.to(d).t().mm(x_hat)
    acc = torch.zeros(m, n, dtype=acc_dtype, device=dy.device)
    for r0 in range(0, b, residual.ROW_CHUNK):
        r1 = min(b, r0 + residual.ROW_CHUNK)
        part = (None, None) if c is None else (f[r0:r1], alpha[r0:r1])
        x_hat = residual.reconstruct_reference(q[r0:r1], lo[r0:r1], scale[r0:r1], c, *part, bits, n, d)
        acc.addmm_(dy[r0:r1].to(d).t().to(acc_dtype), x_hat.to(acc_dtype))
    return acc.to(out_dtype or d)


def weight_grad_aten(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, bits: int, n: int,
                     c: Tensor | None = None, f: Tensor | None = None, alpha: Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """dY^T X^ in whole-tensor aten ops for Inductor: X^ (b, n) in D, then one GEMM in D (the product
    rounded to D before ``out_dtype``, as the explicit backward does)."""
    _check(dy, q, bits, c, f, alpha)
    d = operand_dtype(dy, c)
    x_hat = residual.reconstruct_aten(q, lo, scale, c, f, alpha, bits, n, d)
    return dy.to(d).t().mm(x_hat).to(out_dtype or d)


def weight_grad(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, bits: int, n: int,
                c: Tensor | None = None, f: Tensor | None = None, alpha: Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """dW eagerly: the Triton kernel on CUDA (float32/bf16/fp16 D), else :func:`weight_grad_reference`."""
    if use_triton(dy, operand_dtype(dy, c)):
        from pamm_fx.kernels import dequant_matmul_triton

        return dequant_matmul_triton.weight_grad(dy, q, lo, scale, bits, n, c, f, alpha, out_dtype)
    return weight_grad_reference(dy, q, lo, scale, bits, n, c, f, alpha, out_dtype)


def weight_grad_traceable(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, bits: int, n: int,
                          c: Tensor | None = None, f: Tensor | None = None, alpha: Tensor | None = None,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """The weight gradient Inductor can see: the Triton op on CUDA, whole-tensor aten ops elsewhere."""
    if use_triton(dy, operand_dtype(dy, c)):
        from pamm_fx.kernels import dequant_matmul_triton

        return dequant_matmul_triton.weight_grad_triton(dy, q, lo, scale, c, f, alpha, bits, n,
                                                        out_dtype or operand_dtype(dy, c))
    return weight_grad_aten(dy, q, lo, scale, bits, n, c, f, alpha, out_dtype)
