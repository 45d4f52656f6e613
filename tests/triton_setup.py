"""Shared set-up of the Triton kernel tests (test_triton_kernels, test_residual_kernels, test_dequant_matmul).

Import this module first: without a GPU it sets ``TRITON_INTERPRET=1`` before triton is imported (``@triton.jit``
reads the variable when a kernel module is imported, and :mod:`pamm_fx.kernels` imports its Triton modules
lazily), so the kernels run on CPU tensors under triton's interpreter. With a GPU the variable is left alone (it
would slow every other Triton kernel in the process) and the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip(
    "triton",
    reason="triton is not installed: `pip install 'triton>=3.7.1'` (CPU runs use its interpreter, TRITON_INTERPRET=1)",
)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

__all__ = ["InterpretedFunction", "TraceableInterpreted", "kernel_device", "triton"]


def kernel_device(kernel: object) -> tuple[bool, str]:
    """(interpreted, device) of the tests of ``kernel``; skips the calling module when they cannot run."""
    interpreted = isinstance(kernel, InterpretedFunction)
    if not interpreted and not torch.cuda.is_available():
        pytest.skip(
            "no GPU and the Triton kernels were imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1",
            allow_module_level=True,
        )
    if interpreted and tuple(map(int, re.findall(r"\d+", triton.__version__)[:3])) < (3, 7, 1):
        pytest.skip(
            f"triton {triton.__version__}'s interpreter calls int() on 1-element numpy arrays, which numpy >= 2.4 "
            "rejects: `pip install 'triton>=3.7.1'` for the CPU interpreter tests",
            allow_module_level=True,
        )
    return interpreted, "cpu" if interpreted else "cuda"


class TraceableInterpreted(JITFunction):
    """A JITFunction, so ``wrap_triton`` traces it into a graph, that launches through the interpreter.

    Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an ``InterpretedFunction`` and ``wrap_triton`` hands
    that back unwrapped (torch/_library/triton.py), so tracing the op with fake tensors runs the interpreter on
    them, which reads their (nonexistent) storage: opcheck's test_faketensor and test_aot_dispatch_dynamic fail
    on that, not on the op. This twin restores the GPU tracing path (the kernel-wrapper HOP) on CPU tensors; a
    call from inside a running kernel goes to the interpreted function.
    """

    def __init__(self, interpreted: InterpretedFunction) -> None:
        super().__init__(interpreted.fn)
        self._interpreted = interpreted

    def run(self, *args: object, grid: object, warmup: bool, **kwargs: object) -> object:
        return self._interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._interpreted(*args, **kwargs)
