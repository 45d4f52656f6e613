"""The assignment's shared math, stated once for the reference, the aten form and the Triton kernel.

* Precision: similarities are computed in float32, or float64 for float64 X
  (:func:`pamm_fx.kernels.device.work_dtype`).
* Zero-norm generators: their inverse norm is 0, so they score 0 (never win over a non-zero
  one) and give alpha = 0; an all-zero row scores 0 everywhere and gets f = 0, alpha = 0.
* Non-finite rows: a row whose similarity to any generator is NaN/Inf gets alpha = NaN
  (:func:`poison_non_finite`), whatever eps says, so it reaches dW as under plain.
* The eps rule: a row whose projection error ||X_i - X~_i||^2 = ||X_i||^2 - <X_i, C_f/||C_f||>^2
  exceeds eps^2 ||X_i||^2 gets alpha = 0, and the kept rows are rescaled by
  beta = b / (b - dropped) (1 when no row or every row is dropped), computed on the device
  so that no host synchronisation happens.

The Triton kernel (:mod:`pamm_fx.kernels.assign_triton`) cannot call torch functions, so it
evaluates :func:`keep` and :func:`poison_non_finite` in-kernel with the same formulas (float32
only: float64 never goes to Triton); the norms and beta it takes from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["inverse_norms", "keep", "poison_non_finite", "rescale"]


def inverse_norms(c: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """1 / ||C_j|| in ``dtype``, and 0 for a zero-norm generator."""
    norms = torch.linalg.vector_norm(c.to(dtype), dim=1)
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def poison_non_finite(alpha: Tensor, finite: Tensor) -> Tensor:
    """alpha (float32) = NaN for rows whose similarity to some generator is not finite.

    Such a row holds a NaN/Inf, or a generator does (and a generator is a row of X): plain's
    dW = dY^T X is then not finite either, so the row must carry the NaN into B~ and dW (a
    ``top > best`` scan would otherwise skip it and report a finite gradient to a NaN check or a
    GradScaler). Only a finite row whose dot product overflows float32 is poisoned needlessly.
    """
    return torch.where(finite, alpha, torch.full_like(alpha, math.nan)).to(torch.float32)


def keep(row_sq: Tensor, signed: Tensor, eps: float) -> Tensor:
    """Rows within ``eps`` relative projection error; ``signed`` is <X_i, C_f / ||C_f||>."""
    return (row_sq - signed * signed).clamp_min(0) <= (eps * eps) * row_sq


def rescale(alpha: Tensor, dropped: Tensor, b: int) -> Tensor:
    """alpha of the kept rows times beta = b / (b - dropped) (in alpha's dtype); beta = 1 if none or all
    were dropped."""
    beta = torch.where((dropped > 0) & (dropped < b), b / (b - dropped).double(), 1.0)
    return alpha * beta.to(alpha.dtype)
