"""The ``pamm`` TorchDynamo backend: normalize -> match -> rewrite -> Inductor.

``torch.compile(model, backend="pamm", options={...})`` finds this function
through the ``torch_dynamo_backends`` entry point, so users import nothing.
Graphs that need no gradient (inference, ``torch.no_grad``) or contain no group
go to Inductor exactly as with ``backend="inductor"``. A group we cannot rewrite
is left as it was and the log says why: a compile never fails because of us.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from pamm_fx import logs as _logs
from pamm_fx.config import PammConfig
from pamm_fx.passes.match import MatchResult, find_groups
from pamm_fx.passes.normalize import normalize_linears
from pamm_fx.passes.rewrite import copy_graph_module, rewrite_groups

__all__ = [
    "pamm_backend",
    "backend",
    "PammBackend",
    "counters",
    "counters_by_compile",
    "add_observer",
    "remove_observer",
]

log = logging.getLogger(__name__)

#: Always-on totals over this process: graphs compiled, groups rewritten, linears skipped.
counters: dict[str, int] = {"graphs": 0, "groups_rewritten": 0, "linears_skipped": 0, "fallbacks": 0}
#: The same counts for each graph compiled, newest last (the last 1000 kept), with Dynamo's compile id
#: ("0/0", "1/0" after a graph break, as tlparse shows it; ids restart after ``torch._dynamo.reset()``).
counters_by_compile: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)

Observer = Callable[[fx.GraphModule, MatchResult, "fx.GraphModule | None"], None]
_observers: list[Observer] = []


def add_observer(fn: Observer) -> None:
    """Call ``fn(original, match_result, rewritten_or_None)`` for every graph the backend sees."""
    _observers.append(fn)


def remove_observer(fn: Observer) -> None:
    _observers.remove(fn)


class _SeedSource:
    """A fresh int64 seed per call: from torch's global RNG, or from a private generator."""

    def __init__(self, seed: int | None) -> None:
        self._gen = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        return torch.randint(0, 2**62, (), generator=self._gen)


def _inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any]) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=patches or None)


def _aot_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any]) -> Callable:
    """AOTAutograd without Inductor: our rewrite, then the joint graph run op by op (for bisecting)."""
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, list(example_inputs))


def _seed_example(example_inputs: Sequence[Any]) -> torch.Tensor:
    example = torch.zeros((), dtype=torch.int64)
    fake_mode = torch._guards.detect_fake_mode(list(example_inputs))
    return fake_mode.from_tensor(example) if fake_mode is not None else example


def _salt_base() -> int:
    """Tell apart the graphs of one program (graph breaks, recompiles) so that, with a fixed ``seed``,
    their groups still sample different rows. Dynamo's compile id is stable from run to run and
    across processes (and restarts at ``torch._dynamo.reset()``), unlike a process-wide counter."""
    cid = torch._guards.CompileContext.current_compile_id()
    if cid is None:
        return 0
    return ((cid.frame_id or 0) << 24 | (cid.frame_compile_id or 0) << 16) & ((1 << 62) - 1)


def _bump(per_compile: dict[str, Any], key: str, n: int = 1) -> None:
    counters[key] += n
    per_compile[key] += n


def _compile_counters() -> dict[str, Any]:
    ctx = torch._guards.CompileContext.try_get()
    compile_id = str(ctx.compile_id) if ctx is not None and ctx.compile_id is not None else None
    mine = {"compile_id": compile_id, "groups_rewritten": 0, "linears_skipped": 0, "fallbacks": 0}
    counters_by_compile.append(mine)
    return mine


def _notify(gm: fx.GraphModule, result: MatchResult, new: fx.GraphModule | None) -> None:
    _logs.log_graphs(gm, new)
    for fn in list(_observers):
        fn(gm, result, new)


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: PammConfig,
    mode: str | None,
    inner: Callable[[fx.GraphModule, Sequence[Any], dict[str, Any]], Callable] = _inductor,
) -> Callable:
    _inductor = inner
    patches = torch._inductor.list_mode_options(mode) if mode else {}
    counters["graphs"] += 1
    mine = _compile_counters()
    if not torch.is_grad_enabled():
        log.info("pamm: gradients are disabled for this graph; handing it to Inductor unchanged")
        _notify(gm, MatchResult([], []), None)
        return _inductor(gm, example_inputs, patches)
    try:
        # Normalize a copy: a graph with nothing to rewrite reaches Inductor exactly as Dynamo captured it.
        work, _ = copy_graph_module(gm)
        normalize_linears(work)
        result = find_groups(work, config)
    except Exception:
        log.warning("pamm: matching failed; compiling the graph untouched", exc_info=True)
        _bump(mine, "fallbacks")
        return _inductor(gm, example_inputs, patches)
    _bump(mine, "linears_skipped", len(result.rejections))
    if not result.groups:
        log.info("pamm: no projection group in this graph; handing it to Inductor unchanged")
        _notify(work, result, None)
        return _inductor(gm, example_inputs, patches)
    try:
        new = rewrite_groups(work, result.groups, config, salt_base=_salt_base())
    except Exception:
        log.warning("pamm: rewrite failed; compiling the original graph untouched", exc_info=True)
        _bump(mine, "fallbacks")
        _notify(work, result, None)
        return _inductor(gm, example_inputs, patches)
    _notify(work, result, new)
    try:
        compiled = _inductor(new, [*example_inputs, _seed_example(example_inputs)], patches)
    except torch._dynamo.exc.TorchDynamoException:
        raise  # Dynamo's own control flow (e.g. RestartAnalysis from Inductor's scalar pass), not a failure
    except Exception:
        # Not our graph's fault as far as we know, but never fail a compile Inductor could do without us.
        log.warning("pamm: Inductor failed on the rewritten graph; compiling the original untouched", exc_info=True)
        _bump(mine, "fallbacks")
        _notify(work, result, None)
        return _inductor(gm, example_inputs, patches)
    _bump(mine, "groups_rewritten", len(result.groups))
    seeds = _SeedSource(config.seed)

    def run(*args: Any) -> Any:
        return compiled(*args, seeds())

    return run


class PammBackend:
    """A backend callable with a fixed, validated config (``pamm_fx.backend(...)`` returns one)."""

    def __init__(self, config: PammConfig, mode: str | None = None) -> None:
        self.config = config
        self.mode = mode

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return _compile(gm, example_inputs, self.config, self.mode)

    def __repr__(self) -> str:
        return f"PammBackend({self.config!r})"


def backend(config: PammConfig | None = None, *, mode: str | None = None, **options: Any) -> PammBackend:
    """``torch.compile(model, backend=pamm_fx.backend(ratio=1/128))``; options are validated here."""
    if config is not None and options:
        raise ValueError("pass either a PammConfig or keyword options to pamm_fx.backend, not both")
    return PammBackend(config if config is not None else PammConfig.from_options(options), mode)


def pamm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """Entry point for ``torch.compile(model, backend="pamm", mode=..., options={...})``."""
    return _compile(gm, example_inputs, PammConfig.from_options(options), mode)


def pamm_aot_eager_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None
) -> Callable:
    """``backend="pamm_aot_eager"``: the same plan and rewrite, then ``aot_eager`` instead of Inductor.

    For bisecting: if a model is wrong with ``pamm`` but right here, the fault is in Inductor's lowering
    of the rewritten graph; if it is wrong here too, it is in our rewrite or ops.
    """
    return _compile(gm, example_inputs, PammConfig.from_options(options), None, _aot_eager)
