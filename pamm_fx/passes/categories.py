"""Every category a linear left exact can carry, declared in one place, and the rejection that carries one.

A category is the stable key that logs, ``explain()``, ``Plan.rejections`` and tools see (the sentence
for people is the rejection's ``reason``). Most are the names of the named checks
(:mod:`pamm_fx.passes.checks`: each row of its tables declares its category here when it registers);
three are decided elsewhere and declared below: :data:`UNRECOGNISED` by the scan after normalization
(:mod:`pamm_fx.passes.unrecognised`), :data:`GRAPH_BREAK` and :data:`REWRITE_FAILED` by ``explain()``,
which knows the graph breaks only after the whole capture and tries the rewrite. ``pamm-fx checks`` lists
:data:`CATEGORIES`, in the order of :data:`STAGES`.
"""

from __future__ import annotations

import dataclasses

from torch import fx

__all__ = ["CATEGORIES", "GRAPH_BREAK", "REWRITE_FAILED", "STAGES", "UNRECOGNISED", "Category", "Rejection",
           "declare"]

#: Where a category is decided, in pipeline order, with the heading ``pamm-fx checks`` prints for it.
STAGES = {
    "projection": "per projection (category: what a linear needs to pass)",
    "group": "per group (category: what a linear needs to pass)",
    "scan": "found by the scan after normalization (category: what it means)",
    "explain": "decided by explain() (category: what it means)",
}


@dataclasses.dataclass(frozen=True)
class Category:
    """A category: its ``name`` (the stable key), the rule or meaning it stands for, the stage deciding it."""

    name: str
    doc: str
    stage: str


#: Every category by name, in declaration order.
CATEGORIES: dict[str, Category] = {}


def declare(name: str, doc: str, stage: str) -> Category:
    """Declare a category (once per name)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid stages are {list(STAGES)}")
    if name in CATEGORIES:
        raise ValueError(f"pamm category {name!r} is declared already")
    CATEGORIES[name] = category = Category(name, doc, stage)
    return category


UNRECOGNISED = declare(
    "unrecognised", "a product or opaque call reads a parameter in a form normalize does not rewrite to a linear "
    "(einsum, W @ x, a weight that is not 2-D, nn.LSTM/GRU/RNN, an nn.MultiheadAttention form not written out)",
    "scan")
GRAPH_BREAK = declare(
    "graph_break", "a graph break splits its group: X is an output of this graph, so the projections of X after "
    "the break are in another graph", "explain")
REWRITE_FAILED = declare(
    "rewrite_failed", "the rewrite of its group failed; the backend compiles this graph unchanged", "explain")


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A linear left exact, and why: ``category`` is one of :data:`CATEGORIES` (a stable key for tools),
    ``reason`` the sentence for people."""

    node: fx.Node
    reason: str
    category: str
    weight_name: str
