"""Kernel selection: one entry per PAMM primitive, dispatched by device.

The ops in :mod:`pamm_fx.ops` call only these functions, so a faster kernel for
a device plugs in here without touching the ops, the graph or user code.
CUDA tensors go to the Triton kernels when triton is installed; everything else
(CPU above all) runs the plain-torch reference. The Triton modules are imported
on first CUDA use only: ``@triton.jit`` reads ``TRITON_INTERPRET`` at import time,
and CPU users should not pay for importing triton.
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache

from torch import Tensor

from pamm_fx.kernels import reference

__all__ = ["assign", "contract", "has_triton"]


@cache
def has_triton() -> bool:
    """Whether the triton package can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def assign(x: Tensor, c: Tensor, eps: float = math.inf) -> tuple[Tensor, Tensor]:
    """f (b,) int32 and alpha (b,) float32; see :func:`pamm_fx.kernels.reference.assign`."""
    if x.is_cuda and has_triton():
        from pamm_fx.kernels import triton_assign

        return triton_assign.assign(x, c, eps)
    return reference.assign(x, c, eps)


def contract(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ (k, sum m_j) float32; see :func:`pamm_fx.kernels.reference.contract`."""
    if f.is_cuda and has_triton():
        from pamm_fx.kernels import triton_contract

        return triton_contract.contract(grads, f, alpha, k)
    return reference.contract(grads, f, alpha, k)
