"""Run a capture (``explain()``) without leaving a trace on the model, the random streams or Dynamo.

A Dynamo capture runs the model's forward for real: BatchNorm's running statistics and
``num_batches_tracked``, spectral norm's vectors, caches a forward stores on a module, counters it
bumps and the global generators (dropout) all move. Called mid-training, that would perturb training,
so :func:`preserved` puts back every module's Python attributes (and the contents of the dicts, lists
and sets they hold), every buffer's values, and forks the CPU and CUDA generators around it. Parameters
are not copied (that could double a GPU model's memory); one changed in place by the forward is named
in the returned list instead, as is a tensor attribute changed in place.

It also compiles: every frame Dynamo compiles gets a cache entry on its code object, which counts towards
that code's ``recompile_limit``, so repeated captures would switch the user's own compiled model to eager
(:func:`dynamo_untouched`).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pamm_fx import _compat

__all__ = ["dynamo_untouched", "modules_of", "preserved"]

#: Containers whose contents are restored in place (their subclasses too: OrderedDict, defaultdict, Counter).
_CONTAINERS = (dict, list, set, collections.deque)


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


def _containers(values: Iterable[Any], seen: dict[int, tuple[Any, Any]]) -> None:
    """Record a shallow copy of every container reachable from ``values`` through containers and tuples
    (not through modules, tensors or other objects), keyed by id."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, tuple):
            stack.extend(value)
        elif isinstance(value, _CONTAINERS) and id(value) not in seen:
            copy = dict(value) if isinstance(value, dict) else list(value)
            seen[id(value)] = (value, copy)
            stack.extend(value.values() if isinstance(value, dict) else value)


def _restore_container(value: Any, copy: Any) -> None:
    if isinstance(value, dict):
        value.clear()
        value.update(copy)
    elif isinstance(value, list):
        value[:] = copy
    else:  # set, deque
        value.clear()
        value.update(copy) if isinstance(value, set) else value.extend(copy)


@contextlib.contextmanager
def preserved(roots: list[nn.Module]) -> Iterator[list[str]]:
    """Restore the Python state and buffers of ``roots`` (and their submodules) and the RNG on exit.

    Python state: each module's attributes are rebound to what they were (attributes the block added are
    deleted), and every dict, list, set or deque reachable from them through containers gets its old
    contents back, so a counter the forward bumps and a tensor it caches in a dict are as they were. The
    state of other objects the modules hold (an attribute's own attributes) is not copied. Yields a list
    that receives "parameter <name>" / "tensor attribute <name>" for each one the block modified in place
    (not restored).
    """
    modules = list({id(m): (name, m) for root in roots for name, m in root.named_modules()}.values())
    attributes = [(m, dict(vars(m))) for _, m in modules]
    containers: dict[int, tuple[Any, Any]] = {}
    _containers((v for _, attrs in attributes for v in attrs.values()), containers)
    buffers = [(t, t.detach().clone()) for _, m in modules for t in m._buffers.values() if t is not None]
    tensors = [(f"{prefix}.{name}" if prefix else name, t, t._version) for prefix, m in modules
               for name, t in vars(m).items() if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    params = [(f"{prefix}.{name}" if prefix else name, p, p._version)
              for prefix, m in modules for name, p in m._parameters.items() if p is not None]
    changed: list[str] = []
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield changed
    finally:
        for m, attrs in attributes:
            for name in [n for n in vars(m) if n not in attrs]:
                object.__delattr__(m, name)
            for name, value in attrs.items():
                object.__setattr__(m, name, value)
        for value, copy in containers.values():
            _restore_container(value, copy)
        with torch.no_grad():
            for t, copy in buffers:  # always copied back: batch_norm's stat update bumps no version
                t.copy_(copy)
        changed.extend(f"parameter {name}" for name, p, version in params if p._version != version)
        changed.extend(f"tensor attribute {name}" for name, t, version in tensors if t._version != version)


def _clone(code: types.CodeType) -> types.CodeType:
    """An equal code object of its own identity, nested code objects (inner functions) cloned too."""
    consts = tuple(_clone(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_consts=consts)


@contextlib.contextmanager
def dynamo_untouched() -> Iterator[list[str]]:
    """Leave Dynamo's per-code state as it was, however many captures run inside the block.

    Dynamo keeps, on each code object it compiles (a forward, the resume functions after its graph breaks,
    a nested frame compiled on its own), a list of cache entries, frame state (frame ids, sizes seen) and
    skip marks; torch has no way to remove one entry. So no capture entry goes on a code object that already
    has entries (the user's compiled model): every function whose code has some runs a clone of its code
    during the block (:func:`_clone`, swapped back after), and Dynamo's resume functions then derive from
    the clones. Every code object Dynamo saw for the first time in the block (the clones, their resume
    functions, frames the user never compiled), and any that had no entry before and has one now, is reset
    on exit, and the frame counters and the
    backends Dynamo keeps alive are put back, so later compiles get the ids (and our salts) they would have
    had. Yields a list that receives a description of each code object whose entries changed anyway.
    Another thread calling one of those functions during the block runs its clone (the same bytecode).
    """
    before = {id(code): (code, _compat.cache_entry_count(code)) for code in _compat.dynamo_seen_codes()}
    compiled = [code for code, count in before.values() if count]
    wanted = {id(code) for code in compiled}
    owners = [f for f in gc.get_referrers(*compiled) if isinstance(f, types.FunctionType) and id(f.__code__) in wanted]
    originals = [(f, f.__code__) for f in owners]
    clones = {id(code): _clone(code) for code in compiled}
    state = _compat.dynamo_compile_state()
    changed: list[str] = []
    try:
        for f, code in originals:
            f.__code__ = clones[id(code)]
        yield changed
    finally:
        for f, code in originals:
            f.__code__ = code
        for code in _compat.dynamo_seen_codes():
            old = before.get(id(code))
            count = _compat.cache_entry_count(code)
            if old is None or (old[1] == 0 and count):  # all its state is the block's (entries, marks, ids)
                _compat.forget_code(code)
            elif count != old[1]:
                changed.append(f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})")
        _compat.restore_dynamo_compile_state(state)
