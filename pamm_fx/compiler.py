"""The ``pamm`` TorchDynamo backend: plan -> apply -> Inductor.

``torch.compile(model, backend="pamm", options={...})`` finds this function
through the ``torch_dynamo_backends`` entry point, so users import nothing.
:func:`pamm_fx.plan.plan` decides what to rewrite (the same plan ``explain()``
prints), :func:`pamm_fx.plan.apply` rewrites a copy, Inductor compiles it. A graph
with no group goes to Inductor exactly as captured; any failure of ours falls back
to the captured graph with a warning: a compile never fails because of us.
``backend="pamm_aot_eager"`` does the same with ``aot_eager`` instead of Inductor.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import fx

from pamm_fx import _compat, seed
from pamm_fx import logs as _logs
from pamm_fx.config import PammConfig, resolve
from pamm_fx.names import BACKEND
from pamm_fx.ops.decompositions import DECOMPOSITIONS
from pamm_fx.plan import Plan, apply, plan
from pamm_fx.saved import SavedPartitioner, SavedPolicy

__all__ = [
    "PammBackend",
    "add_observer",
    "backend",
    "counters",
    "counters_by_compile",
    "decompositions",
    "pamm_aot_eager_backend",
    "pamm_backend",
    "remove_observer",
    "saved_partitioner",
]

log = logging.getLogger(__name__)

_COUNTER_KEYS = ("graphs", "groups_rewritten", "linears_skipped", "fallbacks")


class _Counters(Mapping[str, int]):
    """Process totals, kept in Dynamo's counter table under :data:`~pamm_fx.names.BACKEND`
    (:func:`pamm_fx._compat.dynamo_counters`: torch's counter dumps show them and Dynamo's reset clears them
    with its own): graphs compiled, groups rewritten, linears left exact, fallbacks to the captured graph."""

    @staticmethod
    def _store() -> collections.Counter:
        return _compat.dynamo_counters()[BACKEND]

    def __getitem__(self, key: str) -> int:
        if key not in _COUNTER_KEYS:
            raise KeyError(key)
        return self._store()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(_COUNTER_KEYS)

    def __len__(self) -> int:
        return len(_COUNTER_KEYS)

    def __repr__(self) -> str:
        return repr(dict(self))


counters = _Counters()
#: The same counts for each graph compiled, newest last (the last 1000 kept), with Dynamo's compile id
#: ("0/0", "1/0" after a graph break, as tlparse shows it; ids restart when Dynamo is reset).
counters_by_compile: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)

Observer = Callable[[Plan, "fx.GraphModule | None"], None]
_observers: list[Observer] = []


def add_observer(fn: Observer) -> None:
    """Call ``fn(plan, rewritten_or_None)`` for every graph the backend compiles."""
    _observers.append(fn)


def remove_observer(fn: Observer) -> None:
    _observers.remove(fn)


Inner = Callable[[fx.GraphModule, Sequence[Any], dict[str, Any]], Callable]


@functools.cache
def source_key() -> str:
    """A hash of every source file of the package, which joins Inductor's cache key (``_compat.source_keyed``)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def decompositions(patches: dict[str, Any] | None = None) -> dict[Any, Any]:
    """Inductor's decomposition table plus ours (:mod:`pamm_fx.ops.decompositions`): what every Inductor
    compile of the backend traces with, passed explicitly so that no earlier compile can drop ours."""
    return {**_compat.inductor_decompositions(patches or {}), **DECOMPOSITIONS}


def _inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any]) -> Callable:
    return _compat.inductor_compile(gm, list(example_inputs), _compat.source_keyed(patches, source_key()),
                                    decompositions(patches))


def _aot_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any]) -> Callable:
    """AOTAutograd without Inductor: our rewrite, then the joint graph run op by op (for bisecting)."""
    return _compat.aot_eager_compile(gm, list(example_inputs), patches)


def _bump(per_compile: dict[str, Any], key: str, n: int = 1) -> None:
    counters._store()[key] += n
    per_compile[key] += n


def _notify(p: Plan, new: fx.GraphModule | None) -> None:
    _logs.log_graphs(p.graph, new)
    for fn in list(_observers):
        fn(p, new)


def _compile(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: PammConfig, mode: str | None, inner: Inner
) -> Callable:
    patches = _compat.inductor_mode_options(mode) if mode else {}
    counters._store()["graphs"] += 1
    mine = {"compile_id": _compat.compile_id_text(), "groups_rewritten": 0, "linears_skipped": 0, "fallbacks": 0}
    counters_by_compile.append(mine)
    p = plan(gm, example_inputs, config)
    if p.error is not None:
        _bump(mine, "fallbacks")
    _bump(mine, "linears_skipped", len(p.rejections))
    if not p.needs_seed:
        checkpointed = [r for r in p.rejections if r.category == "checkpointed"]
        if checkpointed and len(checkpointed) == len(p.rejections):
            log.info("pamm: all %d projections of this graph are inside activation-checkpoint regions and stay "
                     "exact (X is recomputed, not saved); use activation_memory_budget to stack with PAMM "
                     "(docs/checkpointing.md)", len(checkpointed))
        log.info("pamm: no projection group in this graph; handing it to %s unchanged",
                 "Inductor" if inner is _inductor else "aot_eager")
        _notify(p, None)
        return inner(gm, example_inputs, patches)
    try:
        new = apply(p)
    except Exception:
        log.warning("pamm: rewrite failed; compiling the captured graph untouched", exc_info=True)
        _bump(mine, "fallbacks")
        _notify(p, None)
        return inner(gm, example_inputs, patches)
    fake_mode = _compat.detect_fake_mode(example_inputs)
    try:
        compiled = inner(new, [*example_inputs, seed.example(fake_mode, p.seed_device)], _saved_patches(p, patches))
    except _compat.DynamoException:
        raise  # Dynamo's own control flow (e.g. RestartAnalysis from Inductor's scalar pass), not a failure
    except Exception:
        # Not our graph's fault as far as we know, but never fail a compile Inductor could do without us.
        log.warning("pamm: compiling the rewritten graph failed; compiling the captured graph untouched",
                    exc_info=True)
        _bump(mine, "fallbacks")
        _notify(p, None)
        return inner(gm, example_inputs, patches)
    _notify(p, new)
    _bump(mine, "groups_rewritten", len(p.groups))
    seeds = seed.Source(config.seed, p.seed_device, p.salt_base)

    def run(*args: Any) -> Any:
        return compiled(*args, seeds())

    return run


def saved_partitioner(p: Plan, patches: dict[str, Any]) -> SavedPartitioner | None:
    """The partition function that compresses the partitioner's saved tensors under ``p``'s ``saved``
    (:mod:`pamm_fx.saved`), chaining the ``custom_partitioner_fn`` of ``patches`` or Inductor's config;
    None under ``saved="exact"``. The backend and ``explain()`` both take it from here."""
    cfg = p.config
    if cfg.saved == "exact":
        return None
    n = len(p.original.graph.find_nodes(op="placeholder"))  # the seed comes right after these
    return SavedPartitioner(SavedPolicy(cfg.saved, cfg.saved_bits), f"primals_{n + 1}", p.salt_base,
                            p.weight_grad_inputs, n + 1, source_key(), decompositions,
                            _compat.user_partitioner(patches))


def _saved_patches(p: Plan, patches: dict[str, Any]) -> dict[str, Any]:
    part = saved_partitioner(p, patches)
    return patches if part is None else {**patches, "custom_partitioner_fn": part}


class PammBackend:
    """A backend callable with a fixed, validated config (``pamm_fx.backend(...)`` returns one)."""

    def __init__(self, config: PammConfig, mode: str | None = None, inner: Inner = _inductor) -> None:
        self.config = config
        self.mode = mode
        self._inner = inner

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return _compile(gm, example_inputs, self.config, self.mode, self._inner)

    def __repr__(self) -> str:
        return f"PammBackend({self.config!r})"


def backend(config: PammConfig | None = None, *, mode: str | None = None, **options: Any) -> PammBackend:
    """``torch.compile(model, backend=pamm_fx.backend(ratio=1/128))``; options are validated here."""
    if config is not None and options:
        raise ValueError("pass either a PammConfig or keyword options to pamm_fx.backend, not both")
    return PammBackend(resolve(config if config is not None else options), mode)


def pamm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """Entry point for ``torch.compile(model, backend="pamm", mode=..., options={...})``.

    Options not given here come from ``pamm_fx.config.defaults`` and ``PAMM_<OPTION>`` variables
    (:func:`pamm_fx.config.resolve`), read per compiled graph: trainers that pass only a backend name
    (torchtitan, accelerate) are configured that way.
    """
    return _compile(gm, example_inputs, resolve(options), mode, _inductor)


def pamm_aot_eager_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None
) -> Callable:
    """``backend="pamm_aot_eager"``: the same plan and rewrite, then ``aot_eager`` instead of Inductor.

    For bisecting: if a model is wrong with ``pamm`` but right here, the fault is in Inductor's lowering
    of the rewritten graph; if it is wrong here too, it is in our plan, rewrite or ops.
    """
    return _compile(gm, example_inputs, resolve(options), None, _aot_eager)
