"""The report ``explain()`` returns: what the ``pamm`` backend will do to a model, as plain data.

Dataclasses with their JSON round trip (``to_json`` / ``from_json``; ``plan()`` is the part a CI check
pins): :class:`ExplainReport` of :class:`GraphReport` s, each with its :class:`GroupInfo` s (a group and
its :class:`~pamm_fx.plan.Estimate`), :class:`SkipInfo` s (a linear left exact, its category and reason)
and, under ``saved``, :class:`SavedInfo` s. Text, graph diffs and DOT are :mod:`pamm_fx.render`'s; plan
diffs and expected files :mod:`pamm_fx.snapshot`'s; building a report from a capture :mod:`pamm_fx.explain`'s.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from pamm_fx import render
from pamm_fx.config import DEFAULT_ESTIMATOR

__all__ = ["ExplainReport", "GraphBreak", "GraphReport", "GroupInfo", "ProjectionInfo", "SavedInfo", "SkipInfo"]

_FORMAT_VERSION = 1


@dataclasses.dataclass
class ProjectionInfo:
    """One projection of a group: the parameters as the user names them."""

    weight: str
    bias: str | None
    out_features: int


@dataclasses.dataclass
class GroupInfo:
    """A group the backend rewrites, with the estimated effect on backward memory and FLOPs."""

    x: str
    x_type: str
    b: int
    n: int
    projections: list[ProjectionInfo]
    ratio: str
    k: int
    k_formula: str
    saved_bytes_before: int
    saved_bytes_after: int
    wgrad_flops_before: int
    wgrad_flops_after: int
    site: str = "qkv"
    #: The group's estimator and its payload's bits (None under ``pamm``), as the plan resolved them.
    estimator: str = DEFAULT_ESTIMATOR
    bits: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        """Identity of a group across runs: the weights in it."""
        return ", ".join(p.weight for p in self.projections)


@dataclasses.dataclass
class SkipInfo:
    """A candidate linear left exact, and why."""

    weight: str
    category: str
    reason: str


@dataclasses.dataclass
class GraphBreak:
    """Where Dynamo split the model: the first line of its reason, the user frame, and the full text."""

    reason: str
    location: str
    detail: str = ""


@dataclasses.dataclass
class SavedInfo:
    """One tensor the partitioner keeps for the backward, under ``saved`` other than "exact": kept as it is
    (and why) or compressed, with its bytes before and after (a view of a compressed tensor counts 0: its
    root's bytes are counted once)."""

    name: str
    shape: str
    dtype: str
    compressed: bool
    bytes_before: int
    bytes_after: int
    why: str
    root: str = ""


@dataclasses.dataclass
class GraphReport:
    """One graph Dynamo captured: its groups, skipped linears, the graph before/after the rewrite, and under
    ``saved`` the partitioner's saved tensors with what happens to each."""

    index: int
    compile_id: str
    groups: list[GroupInfo]
    skipped: list[SkipInfo]
    before: str = ""
    after: str = ""
    error: str = ""
    dot: str = ""
    saved: list[SavedInfo] = dataclasses.field(default_factory=list)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Dataclass from its ``asdict`` form, recursing into the known nested lists."""
    nested = {"projections": ProjectionInfo, "groups": GroupInfo, "skipped": SkipInfo, "graphs": GraphReport,
              "graph_breaks": GraphBreak}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        if key in nested and isinstance(value, list):
            value = [_from_dict(nested[key], v) for v in value]
        kwargs[key] = value
    return cls(**kwargs)


@dataclasses.dataclass
class ExplainReport:
    """What ``torch.compile(model, backend="pamm", options=...)`` will do, graph by graph."""

    options: dict[str, Any]
    graphs: list[GraphReport]
    graph_breaks: list[GraphBreak]
    torch_version: str = torch.__version__
    #: What the report cannot show in its graphs: why nothing was captured, a parameter the capture changed.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def groups(self) -> list[GroupInfo]:
        return [g for graph in self.graphs for g in graph.groups]

    @property
    def skipped(self) -> list[SkipInfo]:
        return [s for graph in self.graphs for s in graph.skipped]

    def to_dict(self, graphs: bool = True) -> dict[str, Any]:
        """Plain data; ``graphs=False`` drops the graph text (what expected files keep)."""
        data = dataclasses.asdict(self)
        data["format"] = _FORMAT_VERSION
        if not graphs:
            for g in data["graphs"]:
                g.pop("before"), g.pop("after"), g.pop("dot")
        return data

    def to_json(self, graphs: bool = True) -> str:
        return json.dumps(self.to_dict(graphs), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplainReport:
        if data.get("format", _FORMAT_VERSION) != _FORMAT_VERSION:
            raise ValueError(f"pamm explain report format {data.get('format')!r} is not {_FORMAT_VERSION}")
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> ExplainReport:
        return cls.from_dict(json.loads(text))

    def plan(self) -> dict[str, Any]:
        """The rewrite plan: what a CI check pins (no graph text, no torch version)."""
        data = self.to_dict(graphs=False)
        data.pop("torch_version")
        data.pop("format")
        for g in data["graphs"]:
            g.pop("compile_id")
        for b in data["graph_breaks"]:
            b.pop("location"), b.pop("detail")
        if not data["notes"]:
            data.pop("notes")
        return data

    def graph_text(self, mode: str = "diff") -> str:
        """Each graph's code ``before``/``after`` the rewrite, as a unified ``diff``, or ``side`` by side."""
        return render.graph_text(self.graphs, mode)

    def to_dot(self) -> str:
        """One Graphviz digraph; each group is a cluster with its X, projections and their neighbours."""
        return render.dot(self.graphs)

    def __str__(self) -> str:
        return render.text(self)
