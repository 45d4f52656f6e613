"""The assignment's shared math, stated once for the reference, the aten form and the Triton kernel.

* Zero-norm generators: their inverse norm is 0, so they score 0 (never win over a non-zero
  one) and give alpha = 0; an all-zero row scores 0 everywhere and gets f = 0, alpha = 0.
* The eps rule: a row whose projection error ||X_i - X~_i||^2 = ||X_i||^2 - <X_i, C_f/||C_f||>^2
  exceeds eps^2 ||X_i||^2 gets alpha = 0, and the kept rows are rescaled by
  beta = b / (b - dropped) (1 when no row or every row is dropped), computed on the device
  so that no host synchronisation happens.

The Triton kernel (:mod:`pamm_fx.kernels.assign_triton`) cannot call torch functions, so it
evaluates :func:`keep` in-kernel with the same formula; the norms and beta it takes from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inverse_norms", "keep", "rescale"]


def inverse_norms(c: Tensor) -> Tensor:
    """1 / ||C_j|| in float32, and 0 for a zero-norm generator."""
    norms = torch.linalg.vector_norm(c.float(), dim=1)
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def keep(row_sq: Tensor, signed: Tensor, eps: float) -> Tensor:
    """Rows within ``eps`` relative projection error; ``signed`` is <X_i, C_f / ||C_f||>."""
    return (row_sq - signed * signed).clamp_min(0) <= (eps * eps) * row_sq


def rescale(alpha: Tensor, dropped: Tensor, b: int) -> Tensor:
    """alpha of the kept rows times beta = b / (b - dropped); beta = 1 if none or all were dropped."""
    beta = torch.where((dropped > 0) & (dropped < b), b / (b - dropped).double(), 1.0)
    return alpha * beta.float()
