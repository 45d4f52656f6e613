"""Which implementation a tensor gets: the Triton kernels or the plain-torch reference.

CUDA tensors in float32, bfloat16 or float16 go to the Triton kernels when :func:`has_triton`
has proven that Triton compiles and launches on that device; everything else runs the
reference. float64 always takes the reference, which is exact in float64-accumulated torch ops
where the Triton kernels would accumulate in float32 (``tl.dot`` has no float64 tensor-core
path). Each primitive's dispatcher (:mod:`~pamm_fx.kernels.assign`,
:mod:`~pamm_fx.kernels.contract`) asks :func:`use_triton` and is the only place that imports
its Triton module, on first CUDA use: ``@triton.jit`` reads ``TRITON_INTERPRET`` at import
time, and CPU users should not pay for importing triton.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
from torch import Tensor

from pamm_fx import _compat

__all__ = ["TRITON_DTYPES", "has_triton", "triton_dtype", "use_triton"]

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
        from pamm_fx.kernels import probe

        with _compat.outside_tracing():
            probe.probe(device)
    except Exception as exc:  # any failure means: do not use Triton here
        log.warning("pamm: Triton is unusable on %s (%s: %s); using the torch reference kernels",
                    device, type(exc).__name__, exc)
        return False
    return True


def use_triton(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether a tensor on ``t``'s device holding ``dtype`` goes to the Triton kernels."""
    return t.is_cuda and triton_dtype(dtype) and has_triton()
