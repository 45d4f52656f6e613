"""Count the bytes autograd keeps for backward, independently of the backend.

A ``saved_tensors_hooks`` pack hook sees every tensor that any autograd node
(including a compiled graph's) saves. Tensors are deduplicated by storage, and
storages of the model's parameters and buffers are left out: what remains is
activation memory, the quantity PAMM reduces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SavedTensors", "saved_for_backward"]


@dataclasses.dataclass
class SavedTensors:
    """What one forward saved: total bytes and one (shape, dtype, bytes) entry per storage."""

    nbytes: int
    tensors: list[tuple[tuple[int, ...], torch.dtype, int]]
    output: Any = None

    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for shape, _, _ in self.tensors]


def _storage_key(t: Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def saved_for_backward(fn: Callable[[], Any], exclude: nn.Module | Iterable[Tensor] = ()) -> SavedTensors:
    """Run ``fn()`` (a forward) and measure what it saves for backward.

    exclude: a module whose parameters and buffers are not activations, or tensors.
    Returns the measurement with ``fn``'s return value in ``.output`` (so the
    caller can run the backward afterwards).
    """
    tensors = list(exclude.parameters()) + list(exclude.buffers()) if isinstance(exclude, nn.Module) else exclude
    skip = {_storage_key(t) for t in tensors}
    seen: dict[tuple[str, int], tuple[tuple[int, ...], torch.dtype, int]] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in skip and key not in seen:
            seen[key] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    entries = list(seen.values())
    return SavedTensors(sum(e[2] for e in entries), entries, out)
