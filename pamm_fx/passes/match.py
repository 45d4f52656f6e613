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
projection. Each group gets a site, which ``targets`` selects:

- ``qkv``: at least one projection feeds an attention op within a few transparent steps;
- ``mlp``: linear -> activation (-> gating mul) -> linear: the group holds an up/gate
  projection (its output reaches another linear's X through pointwise ops including a
  nonlinearity) or the down projection (its X is reached that way);
- ``other``: any other trainable linear (its X is saved for the weight gradient).

Under ``torch.autocast`` a linear computes in its output's dtype (bf16/f16), not X's;
the group then records that dtype and the rewrite casts X, weights and biases to it
explicitly, because custom ops do not follow autocast.
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
#: How many pointwise ops may sit between an MLP's up/gate projection and its down projection
#: (GPT-2's tanh-approximated GELU written out is ~8, plus views and dropout).
_MLP_DEPTH = 16
#: Nonlinearities that make linear -> ... -> linear an MLP (function and method names).
_ACTIVATIONS = frozenset({
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "tanh", "sigmoid",
    "hardswish", "hardsigmoid", "hardtanh", "glu", "erf", "silu_", "relu_", "gelu_", "tanh_", "sigmoid_",
})
#: Shape-preserving or pointwise steps allowed on that path (gating, scaling, dropout, views, casts).
_POINTWISE = frozenset({
    "mul", "add", "sub", "truediv", "div", "neg", "pow", "square", "clamp", "dropout", "view", "reshape",
    "contiguous", "to", "float", "half", "bfloat16", "type", "clone", "mul_", "add_", "iadd", "imul",
})
#: Steps allowed between a LoRA A and its B (peft: ``B(A(dropout(x))) * scaling``; dropout sits before A).
_ADAPTER_STEPS = frozenset({"dropout", "to", "float", "type", "contiguous"})
#: Dtypes autocast computes linears in; anything else differing from X's dtype is not autocast.
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
#: Bytes PAMM keeps per row of X whatever the ratio: f (int32) and alpha (float32).
_INDEX_BYTES_PER_ROW = 8


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear node of a group."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_features: int


@dataclasses.dataclass(frozen=True)
class Group:
    """All trainable projections reading ``x`` (in one compute dtype); compressed together.

    site: ``qkv``, ``mlp`` or ``other`` (:data:`pamm_fx.config.SITES`), picks the ratio.
    dtype: the dtype the projections compute in when it is not X's (autocast), else None.
    """

    x: fx.Node
    projections: tuple[Projection, ...]
    site: str
    dtype: torch.dtype | None = None


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A candidate linear left untouched, and why.

    category: a stable key for tools (``frozen``, ``no_attention``, ``not_target``, ``min_tokens``,
    ``no_saving``, ``autocast``, ``dtype``, ``shape``, ``not_graph_value``); reason: the sentence for people.
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
    if node.op == "call_method" and node.target == "t" and isinstance(node.args[0], fx.Node):
        return _is_trainable(gm, node.args[0])  # a (in, out) weight that normalize transposed
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


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return ""


def _mlp_links(linears: list[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(up, down): linears joined by linear -> pointwise ops with a nonlinearity -> linear's X.

    The path state carries whether an activation was passed, so SwiGLU's up projection
    (reaching down only through the gating mul) is not an "up" by itself; it joins as a
    member of the gate projection's group (same X).
    """
    ups: set[fx.Node] = set()
    downs: set[fx.Node] = set()
    for lin in linears:
        seen = {(lin, False)}
        queue = deque([(lin, False, 0)])
        while queue:
            node, act, depth = queue.popleft()
            for user in node.users:
                if user.op == "call_function" and user.target is _LINEAR:
                    if act and user.args[0] is node:
                        ups.add(lin)
                        downs.add(user)
                    continue
                name = _op_name(user)
                if depth + 1 >= _MLP_DEPTH or name not in _POINTWISE | _ACTIVATIONS:
                    continue
                state = (user, act or name in _ACTIVATIONS)
                if state not in seen:
                    seen.add(state)
                    queue.append((*state, depth + 1))
    return ups, downs


def _in_out(node: fx.Node) -> tuple[int, int] | None:
    wv = _val(node.args[1]) if len(node.args) > 1 else None
    if not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return None
    return hint(wv.shape[1]), hint(wv.shape[0])


def _low_rank_partners(node: fx.Node) -> list[fx.Node]:
    """The widening linears a narrowing one feeds directly: a LoRA pair ``B(A(x)) * s``.

    A (n -> r, r < n) reaches B (r -> m, r < m) as B's X through at most a scaling,
    dropout or cast, so A's group is classified by where B's output goes. A residual
    add or a norm in between ends the search: an attention output projection or an MLP
    down projection is never taken for an adapter.
    """
    dims = _in_out(node)
    if dims is None or dims[1] >= dims[0]:
        return []
    partners: list[fx.Node] = []
    frontier = [node]
    for _ in range(3):
        nxt = []
        for cur in frontier:
            for user in cur.users:
                if user.op == "call_function" and user.target is _LINEAR:
                    user_dims = _in_out(user)
                    if user.args[0] is cur and user_dims is not None and user_dims[0] < user_dims[1]:
                        partners.append(user)
                elif _op_name(user) in _ADAPTER_STEPS:
                    nxt.append(user)
        frontier = nxt
    return partners


def _site(projs: list[Projection], ups: set[fx.Node], downs: set[fx.Node]) -> str:
    nodes = [n for p in projs for n in (p.node, *_low_rank_partners(p.node))]
    if any(_feeds_attention(n) for n in nodes):
        return "qkv"
    if any(n in ups or n in downs for n in nodes):
        return "mlp"
    return "other"


def _compute_dtype(x: torch.Tensor, out: Any) -> torch.dtype | None:
    """The dtype an autocast region made the linear compute in, when it is not X's."""
    if isinstance(out, torch.Tensor) and out.dtype != x.dtype:
        return out.dtype
    return None


def _not_target_reason(site: str, config: PammConfig) -> tuple[str, str]:
    if config.targets == "qkv":
        return "output does not feed attention (targets='qkv')", "no_attention"
    return f"site '{site}' is not in targets={config.targets!r}", "not_target"


def find_groups(gm: fx.GraphModule, config: PammConfig) -> MatchResult:
    """Group the graph's projections by the X they read; say why each other linear is left alone."""
    groups: list[Group] = []
    rejections: list[Rejection] = []
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _LINEAR]
    if not linears:
        return MatchResult(groups, rejections)

    by_x: dict[tuple[fx.Node, torch.dtype | None], list[Projection]] = {}
    for n in linears:
        x, w, b = n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else None
        xv, wv = _val(x), _val(w)
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            rejections.append(Rejection(n, "input or weight is not a graph value", "not_graph_value"))
        elif not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or xv.dim() < 1 or wv.dim() != 2:
            rejections.append(Rejection(n, "unknown shapes or a weight that is not 2-D", "shape"))
        elif not xv.is_floating_point():
            rejections.append(Rejection(n, f"input dtype {xv.dtype} is not floating point", "dtype"))
        elif not _is_trainable(gm, w):
            rejections.append(Rejection(n, "frozen weight: no weight gradient, so X is not saved for it", "frozen"))
        elif (dtype := _compute_dtype(xv, _val(n))) is not None and dtype not in _AUTOCAST_DTYPES:
            reason = f"computes in {dtype}, not X's {xv.dtype}, and not as autocast would (bf16/f16)"
            rejections.append(Rejection(n, reason, "autocast"))
        else:
            proj = Projection(n, w, b if isinstance(b, fx.Node) else None, hint(wv.shape[0]))
            by_x.setdefault((x, dtype), []).append(proj)

    ups, downs = _mlp_links(linears)
    for (x, dtype), projs in by_x.items():
        site = _site(projs, ups, downs)
        if config.site_ratio(site) is None:
            reason, category = _not_target_reason(site, config)
            rejections.extend(Rejection(p.node, reason, category) for p in projs)
            continue
        xv = _val(x)
        b = hint(_rows(xv))
        if b < config.min_tokens:
            for p in projs:
                reason = f"X has {b} rows, below min_tokens={config.min_tokens}"
                rejections.append(Rejection(p.node, reason, "min_tokens"))
            continue
        row_bytes = hint(xv.shape[-1]) * (dtype or xv.dtype).itemsize
        if row_bytes <= _INDEX_BYTES_PER_ROW:
            reason = f"a row of X is {row_bytes} bytes, no more than the {_INDEX_BYTES_PER_ROW} PAMM keeps per row"
            rejections.extend(Rejection(p.node, reason, "no_saving") for p in projs)
            continue
        if config.site_ratio(site) < 1 and config.num_generators(b, site) >= b:
            reason = f"X has {b} rows, not more than min_generators={config.min_generators}: every row would be kept"
            rejections.extend(Rejection(p.node, reason, "no_saving") for p in projs)
            continue
        groups.append(Group(x, tuple(projs), site, dtype))
    for g in groups:
        weights = [param_name(p.weight) for p in g.projections]
        log.info("pamm %s group: X=%s %s -> %s", g.site, g.x.name, fmt_value(_val(g.x)), weights)
    for r in rejections:
        w = r.node.args[1] if len(r.node.args) > 1 else None
        log.info("pamm leaves %s exact: %s", param_name(w) if isinstance(w, fx.Node) else r.node.name, r.reason)
    return MatchResult(groups, rejections)
