"""Run a capture (``explain()``) without leaving a trace on the model or the random streams.

A Dynamo capture runs the model's forward for real: BatchNorm's running statistics and
``num_batches_tracked``, spectral norm's vectors, caches a forward stores on a module and the
global generators (dropout) all move. Called mid-training, that would perturb training, so
:func:`preserved` puts back every buffer and tensor attribute the forward touched and forks the
CPU and CUDA generators around it. Parameters are not copied (that could double a GPU model's
memory); one changed in place by the forward is named in the returned list instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["modules_of", "preserved"]


def modules_of(fn: Any) -> list[nn.Module]:
    """The modules ``fn`` runs: itself, the module of a bound method, or modules a closure holds."""
    fn = getattr(fn, "_orig_mod", fn)
    if isinstance(fn, nn.Module):
        return [fn]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    cells = getattr(fn, "__closure__", None) or ()
    found: list[nn.Module] = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        value = getattr(value, "_orig_mod", value)
        if isinstance(value, nn.Module):
            found.append(value)
    return found


@contextlib.contextmanager
def preserved(roots: list[nn.Module]) -> Iterator[list[str]]:
    """Restore the buffers and tensor attributes of ``roots`` (and their submodules) and the RNG on exit.

    Yields a list that receives the names of parameters the block modified in place (not restored).
    """
    modules = {id(m): (name, m) for root in roots for name, m in root.named_modules()}.values()
    buffers = [(m, name, t, t.detach().clone())
               for _, m in modules for name, t in m._buffers.items() if t is not None]
    attrs = [(m, name, value) for _, m in modules for name, value in vars(m).items()
             if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)]
    keys = [(m, set(vars(m))) for _, m in modules]
    params = [(f"{prefix}.{name}" if prefix else name, p, p._version)
              for prefix, m in modules for name, p in m._parameters.items() if p is not None]
    changed: list[str] = []
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield changed
    finally:
        with torch.no_grad():
            for m, name, t, copy in buffers:  # always copied back: batch_norm's stat update bumps no version
                m._buffers[name] = t
                t.copy_(copy)
        for m, name, value in attrs:
            object.__setattr__(m, name, value)
        for m, before in keys:  # tensors the forward cached on a module for the first time
            for name in [n for n, v in vars(m).items() if n not in before and isinstance(v, torch.Tensor)]:
                delattr(m, name)
        changed.extend(name for name, p, version in params if p._version != version)
