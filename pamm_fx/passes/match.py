"""Find groups of trainable projections that read the same activation X.

Works on Dynamo's torch-level graph (before AOTAutograd), after
:func:`pamm_fx.passes.normalize.normalize_linears`. Why that IR: there a
projection is one ``linear`` node whose weight is a graph input or attribute that
we can tell is trainable, its consumers (views, splits, RoPE, attention) are
still the user's torch calls, and replacing it by an op with a registered
backward makes AOTAutograd save exactly what that backward needs. In the ATen
graph the same projection is already split into ``t``/``mm``/``addmm`` in the
forward and a separate ``mm`` in the backward, which a rewrite would have to
find and change consistently in both.

Matching never mutates the graph. It is purely structural (data flow), never by
module or parameter names::

            X ──┬── linear(X, Wq) ── view ── transpose ── rope ──┐
                ├── linear(X, Wk) ── view ── transpose ── rope ──┼── attention
                └── linear(X, Wv) ── view ── transpose ──────────┘
      => one Group(X, [Wq, Wk, Wv])

A fused ``linear(X, Wqkv)`` whose output is split/chunked/viewed is a group of one
projection. For ``targets="qkv"`` a group qualifies when at least one of its
projections feeds an attention op within a few transparent steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections import deque
from typing import Any

import torch
from torch import fx

from pamm_fx.config import PammConfig
from pamm_fx.names import fmt_value, param_name

__all__ = ["Projection", "Group", "Rejection", "MatchResult", "find_groups", "hint"]

log = logging.getLogger(__name__)

_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_SOFTMAX_FN = {torch.softmax, torch.nn.functional.softmax}
_MATMUL_FN = {torch.matmul, torch.bmm, operator.matmul, torch.einsum, torch.baddbmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_LINEAR = torch._C._nn.linear
#: How many ops may sit between a projection and the attention it feeds (views,
#: transposes, RoPE's mul/cat/add, dtype casts, head repeats for GQA).
MAX_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear node of a group."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_features: int


@dataclasses.dataclass(frozen=True)
class Group:
    """All trainable projections reading ``x``; compressed together."""

    x: fx.Node
    projections: tuple[Projection, ...]
    site: str


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A candidate linear left untouched, and why.

    category: a stable key for tools (``frozen``, ``no_attention``, ``min_tokens``,
    ``autocast``, ``dtype``, ``shape``, ``not_graph_value``); reason: the sentence for people.
    """

    node: fx.Node
    reason: str
    category: str


@dataclasses.dataclass
class MatchResult:
    groups: list[Group]
    rejections: list[Rejection]


def hint(value: Any) -> int:
    """A concrete int for a possibly symbolic size (its example value), without adding a guard."""
    if isinstance(value, torch.SymInt):
        return value.node.hint if value.node.hint is not None else value.node.shape_env.size_hint(value.node.expr)
    return int(value)


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _is_trainable(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "get_attr":
        attr = gm
        for part in node.target.split("."):
            attr = getattr(attr, part)
        return isinstance(attr, torch.Tensor) and attr.requires_grad
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.requires_grad


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FN
    return node.op == "call_method" and node.target in ("softmax", "log_softmax")


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MATMUL_FN
    return node.op == "call_method" and node.target in _MATMUL_METHODS


def _is_flex(node: fx.Node) -> bool:
    return node.op == "call_function" and "flex_attention" in getattr(node.target, "__name__", str(node.target))


def _near(start: fx.Node, pred: Any, forward: bool) -> bool:
    seen = {start}
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        if depth > 0 and pred(node):
            return True
        if depth == MAX_DEPTH:
            continue
        nxt = node.users if forward else node.all_input_nodes
        for n in nxt:
            if n not in seen and not (n.op == "call_function" and n.target is _LINEAR):
                seen.add(n)
                queue.append((n, depth + 1))
    return False


def _is_attention(node: fx.Node) -> bool:
    """SDPA, flex attention, or a matmul next to a softmax (manual attention)."""
    if node.op == "call_function" and node.target in _SDPA:
        return True
    if _is_flex(node):
        return True
    if _is_matmul(node):
        return _near(node, _is_softmax, forward=True) or _near(node, _is_softmax, forward=False)
    return False


def _feeds_attention(node: fx.Node) -> bool:
    """Breadth-first through the projection's consumers until an attention op or a heavy op."""
    seen = {node}
    queue = deque([(node, 0)])
    while queue:
        cur, depth = queue.popleft()
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_attention(user):
                return True
            heavy = user.op == "output" or (user.op == "call_function" and user.target is _LINEAR)
            if not heavy and not _is_matmul(user) and not _is_softmax(user) and depth + 1 < MAX_DEPTH:
                queue.append((user, depth + 1))
    return False


def _rows(val: torch.Tensor) -> Any:
    return math.prod(val.shape[:-1]) if val.dim() > 1 else 1


def _autocast_linears(gm: fx.GraphModule) -> set[fx.Node]:
    """Linears inside an enabled ``torch.autocast`` region (``_enter_autocast(device, dtype, enabled, cache)``)."""
    inside: set[fx.Node] = set()
    stack: list[bool] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", "")
        if name == "_enter_autocast":
            enabled = n.args[2] if len(n.args) > 2 else n.kwargs.get("enabled", True)
            stack.append(bool(enabled))
        elif name == "_exit_autocast" and stack:
            stack.pop()
        elif n.target is _LINEAR and any(stack):
            inside.add(n)
    return inside


def find_groups(gm: fx.GraphModule, config: PammConfig) -> MatchResult:
    """Group the graph's projections by the X they read; say why each other linear is left alone."""
    groups: list[Group] = []
    rejections: list[Rejection] = []
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _LINEAR]
    if not linears:
        return MatchResult(groups, rejections)
    autocast = _autocast_linears(gm)

    by_x: dict[fx.Node, list[Projection]] = {}
    for n in linears:
        x, w, b = n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else None
        xv, wv = _val(x), _val(w)
        if n in autocast:
            rejections.append(Rejection(n, "runs under torch.autocast, which pamm ops do not follow yet", "autocast"))
        elif not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            rejections.append(Rejection(n, "input or weight is not a graph value", "not_graph_value"))
        elif not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or xv.dim() < 1 or wv.dim() != 2:
            rejections.append(Rejection(n, "unknown shapes or a weight that is not 2-D", "shape"))
        elif not xv.is_floating_point():
            rejections.append(Rejection(n, f"input dtype {xv.dtype} is not floating point", "dtype"))
        elif not _is_trainable(gm, w):
            rejections.append(Rejection(n, "frozen weight: no weight gradient, so X is not saved for it", "frozen"))
        else:
            by_x.setdefault(x, []).append(Projection(n, w, b if isinstance(b, fx.Node) else None, hint(wv.shape[0])))

    for x, projs in by_x.items():
        if not any(_feeds_attention(p.node) for p in projs):
            for p in projs:
                rejections.append(Rejection(p.node, "output does not feed attention (targets='qkv')", "no_attention"))
            continue
        b = hint(_rows(_val(x)))
        if b < config.min_tokens:
            for p in projs:
                reason = f"X has {b} rows, below min_tokens={config.min_tokens}"
                rejections.append(Rejection(p.node, reason, "min_tokens"))
            continue
        groups.append(Group(x, tuple(projs), config.targets))
    for g in groups:
        weights = [param_name(p.weight) for p in g.projections]
        log.info("pamm group: X=%s %s -> %s", g.x.name, fmt_value(_val(g.x)), weights)
    for r in rejections:
        w = r.node.args[1] if len(r.node.args) > 1 else None
        log.info("pamm leaves %s exact: %s", param_name(w) if isinstance(w, fx.Node) else r.node.name, r.reason)
    return MatchResult(groups, rejections)
