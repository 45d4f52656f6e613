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
    """A fresh int64 seed per call, drawn on the device the groups run on (no host round trip).

    ``seed=None`` draws from that device's global generator (``torch.manual_seed`` makes runs
    repeat); an int seeds a private generator on that device once.
    """

    def __init__(self, seed: int | None, device: torch.device) -> None:
        self._device = device
        self._gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        return torch.randint(0, 2**62, (), generator=self._gen, device=self._device)
