"""Kernel selection: one entry per PAMM primitive, dispatched by device and dtype.

The ops in :mod:`pamm_fx.ops` call only these functions, so a faster kernel for
a device plugs in here without touching the ops, the graph or user code.
CUDA tensors in float32, bfloat16 or float16 go to the Triton kernels when
:func:`has_triton` has proven that Triton compiles and launches on that device;
everything else runs the plain-torch reference. float64 always takes the
reference, which is exact in float64-accumulated torch ops where the Triton
kernels would accumulate in float32 (``tl.dot`` has no float64 tensor-core path).
The Triton modules are imported on first CUDA use only: ``@triton.jit`` reads
``TRITON_INTERPRET`` at import time, and CPU users should not pay for importing triton.
"""

from __future__ import annotations

import logging
import math
from functools import cache

import torch
from torch import Tensor

from pamm_fx import _compat
from pamm_fx.kernels import reference

__all__ = ["assign", "contract", "has_triton", "triton_dtype", "use_triton"]

log = logging.getLogger(__name__)

#: Dtypes the Triton kernels take (float32 accumulation); float64 stays on the exact reference.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` go to the Triton kernels (see the module docstring)."""
    return dtype in TRITON_DTYPES


@cache
def has_triton(device: str = "cuda") -> bool:
    """Whether Triton compiles and launches a kernel on ``device`` (proven once, by running one).

    Importing triton is not enough: a missing compiler, an unsupported GPU or a broken driver
    only shows at the first launch, which would otherwise be the first training step. The ops
    ask while torch.compile traces them, so the probe runs with the tracing modes (fake tensors,
    proxies) switched off. On failure the reason is logged once and every caller falls back to
    the reference kernels.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        return False
    try:
        from pamm_fx.kernels import triton_probe

        with _compat.outside_tracing():
            triton_probe.probe(device)
    except Exception as exc:  # any failure means: do not use Triton here
        log.warning("pamm: Triton is unusable on %s (%s: %s); using the torch reference kernels",
                    device, type(exc).__name__, exc)
        return False
    return True


def use_triton(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether a tensor on ``t``'s device holding ``dtype`` goes to the Triton kernels."""
    return t.is_cuda and triton_dtype(dtype) and has_triton()


def assign(x: Tensor, c: Tensor, eps: float = math.inf) -> tuple[Tensor, Tensor]:
    """f (b,) int32 and alpha (b,) float32; see :func:`pamm_fx.kernels.reference.assign`."""
    if use_triton(x, x.dtype):
        from pamm_fx.kernels import triton_assign

        return triton_assign.assign(x, c, eps)
    return reference.assign(x, c, eps)


def contract(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ (k, sum m_j) float32; see :func:`pamm_fx.kernels.reference.contract`."""
    if all(use_triton(f, g.dtype) for g in grads):
        from pamm_fx.kernels import triton_contract

        return triton_contract.contract(grads, f, alpha, k)
    return reference.contract(grads, f, alpha, k)
