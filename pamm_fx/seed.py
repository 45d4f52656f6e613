"""The per-call seed: one owner for the extra graph input that makes each step draw new rows.

The rewrite appends one placeholder, :data:`PLACEHOLDER`, after the graph's own inputs
(:func:`add_placeholder`); it is an int64 scalar tensor on the device the groups run on
(:func:`device_of`: no host round trip), whose example value is :func:`example`. The backend
compiles the rewritten graph with that example appended to the user's inputs and, on every call,
feeds the next value of a :class:`Source`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat

__all__ = ["PLACEHOLDER", "Source", "add_placeholder", "device_of", "example"]

PLACEHOLDER = "pamm_seed"


def device_of(xs: Iterable[Any]) -> torch.device:
    """Where the seed lives: the device of the first tensor among the groups' X values, else CPU."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def example(fake_mode: Any, device: torch.device) -> torch.Tensor:
    """The seed input's example value: an int64 scalar on ``device`` (fake when the graph is)."""
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        return torch.zeros((), dtype=torch.int64, device=device)


def add_placeholder(graph: fx.Graph, fake_mode: Any, device: torch.device) -> fx.Node:
    """Append the seed placeholder after the graph's last input, with its example value."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        seed = graph.placeholder(PLACEHOLDER)
    seed.meta["example_value"] = example(fake_mode, device)
    return seed


class Source:
    """A fresh int64 seed per call for one compiled graph, on the device its groups run on.

    The stream is a counter on that device, started from hash(root, stream id) and advanced in place
    each call: it never draws from (so never consumes or shifts) any torch generator, needs no host
    round trip after the first call, and is a pure function of (root, stream id, calls since the start),
    so seeded runs repeat across processes. ``root`` is ``config.seed``, or with ``seed=None`` the default
    generator's ``torch.initial_seed()``, read on the host each call (it reads no random state).

    Restarts (``seed=None``), as torch's own generators restart: every ``torch.manual_seed`` call, with a new
    value or the same one, restarts the stream from its start (counted by :func:`pamm_fx._compat.manual_seed_count`:
    a generator re-seeded with its value may be in the very state it was in, so the call itself is what
    counts), and so does any other change of ``torch.initial_seed()`` (``torch.seed()``). A program that
    re-seeds and repeats its steps thus repeats PAMM's rows and ``sr`` noise, as it repeats its dropout
    masks. An int ``seed`` is a stream of its own that torch's seeding never restarts. The restart is an
    in-place fill of the device counter (no host sync, no CPU tensor). ``stream`` tells apart the graphs
    of one program.
    """

    def __init__(self, seed: int | None, device: torch.device, stream: int) -> None:
        self._device = device
        self._fixed = seed
        self._stream = stream
        self._root: int | None = None
        self._seedings = _compat.manual_seed_count()
        self._counter: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        follows_torch = self._fixed is None
        root = torch.initial_seed() if follows_torch else self._fixed
        seedings = _compat.manual_seed_count() if follows_torch else self._seedings
        if self._counter is None or root != self._root or seedings != self._seedings:
            self._root, self._seedings = root, seedings
            start = int(_mix64(root, self._stream))
            if self._counter is None:
                self._counter = torch.tensor(start, dtype=torch.int64, device=self._device)
            else:
                self._counter.fill_(start)
        self._counter.add_(1)
        # A copy: the graph (or a recomputation in its backward) may still hold last call's seed.
        return self._counter.clone()


def _mix64(root: int, stream: int) -> int:
    """A 62-bit start value from the root seed and the stream id (splitmix64 finaliser, host ints)."""
    z = (root * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) >> 2
