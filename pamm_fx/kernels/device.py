"""Which implementation a tensor gets, and the one helper that chooses for every primitive.

Each primitive (the compression's assignment, the backward contraction, the low-bit quantization, the
weight gradient from low-bit codes) has three implementations of one contract, declared once as a
:class:`Kernels` in its kernel module:

* ``reference``: plain torch, chunked over :data:`ROW_CHUNK` rows so that no large temporary exists; the
  CPU path of the eager op and what every other implementation must match;
* ``aten``: the same in whole-tensor aten ops, for Inductor to fuse (what the op's decomposition traces
  on CPU);
* a Triton launcher (CUDA), imported on first CUDA use.

CUDA tensors in float32, bfloat16 or float16 go to the Triton kernels when :func:`has_triton` has proven
that Triton compiles and launches on that device; everything else runs the reference. float64 always
takes the reference, which is exact in float64-accumulated torch ops where the Triton kernels would
accumulate in float32 (``tl.dot`` has no float64 tensor-core path). Only a primitive's kernel module
imports its Triton module, lazily: ``@triton.jit`` reads ``TRITON_INTERPRET`` at import time, and CPU
users should not pay for importing triton.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import Tensor

from pamm_fx import _compat

__all__ = ["ROW_CHUNK", "TRITON_DTYPES", "Kernels", "has_triton", "rows_of", "triton_dtype", "use_triton",
           "work_dtype"]

log = logging.getLogger(__name__)

#: Dtypes the Triton kernels take (float32 accumulation); float64 stays on the exact reference.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Rows per chunk of every reference (CPU) path: bounds its float32 temporaries to ROW_CHUNK x n (the
#: assignment's similarity block to ROW_CHUNK x its generator chunk).
ROW_CHUNK = 2048


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the reference paths compute for tensors of ``dtype`` (similarities, the low-bit format's lo and
    scale): float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_of(x: Tensor) -> Tensor:
    """X (..., n) as its (b, n) rows."""
    return x.reshape(-1, x.shape[-1])


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


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One primitive's implementations (same arguments, same results up to rounding) and the rule choosing.

    ``decides(*args)`` names the tensor whose device and the dtype that decide (:func:`use_triton`);
    ``triton()`` imports and returns the Triton launcher; ``aten`` is None for a primitive that Inductor
    keeps opaque on CPU.
    """

    reference: Callable[..., Any]
    aten: Callable[..., Any] | None
    triton: Callable[[], Callable[..., Any]]
    decides: Callable[..., tuple[Tensor, torch.dtype]]

    def uses_triton(self, *args: Any) -> bool:
        """Whether these arguments go to the Triton kernel."""
        return use_triton(*self.decides(*args))

    def eager(self, *args: Any) -> Any:
        """The result, computed now: the Triton kernel on CUDA, else the reference (an op's eager body)."""
        return self.triton()(*args) if self.uses_triton(*args) else self.reference(*args)

    def traced(self, *args: Any) -> Any:
        """What an op's Inductor decomposition traces: the aten form where the reference would run; on the
        Triton kernel's devices NotImplemented, so that the op stays one node whose eager body launches it."""
        return NotImplemented if self.aten is None or self.uses_triton(*args) else self.aten(*args)
