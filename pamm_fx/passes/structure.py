"""Structural candidate discovery: every linear of a graph, where it sits, and what it feeds.

This is the first half of matching (the second is the table of named semantic checks in
:mod:`pamm_fx.passes.checks`). It only reads data flow and context: which X a linear reads,
the grad-mode/autocast region it runs in, the site its output feeds (attention, an MLP,
anything else) and whether it sits inside a checkpointed region. It decides nothing::

            X ──┬── linear(X, Wq) ── view ── transpose ── rope ──┐
                ├── linear(X, Wk) ── view ── transpose ── rope ──┼── attention ── linear(·, Wo)
                ├── linear(X, Wv) ── view ── transpose ──────────┘   "qkv"        "attn_out"
                └── linear(X, Wup) ── silu ── linear(·, Wdown)
                    "mlp_up"                  "mlp_down"
            H ── linear(H, Wlm) ── cross_entropy                                  "head"

Sites are per projection, not per X: in a parallel block (GPT-J, Falcon) one X feeds both
attention and the MLP, and ``targets="qkv"`` must not compress the MLP's input projection.

- ``qkv``: the output reaches an attention op (SDPA, flex attention, or a matmul next to a
  softmax) through at most :data:`ATTENTION_HOPS` ops that are not themselves heavy;
- ``mlp_up`` / ``mlp_down``: linear -> pointwise ops with a nonlinearity -> another linear's X
  within :data:`MLP_HOPS` ops: the up/gate projections and the down projection;
- ``attn_out``: X is an attention op's output, at most :data:`ATTENTION_HOPS` light ops back;
- ``head``: the output reaches a loss or the graph's output through at most :data:`HEAD_HOPS`
  ops and no other linear (an LM head, a classifier);
- ``other``: any other linear.

Sites are what ``targets`` selects (:data:`pamm_fx.config.SITES`); their cost and their effect
on training differ (docs/benchmarks.md, the per-site study), so each can be chosen alone.

A LoRA pair ``B(A(x)) * s`` is classified by where B's output goes.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from collections.abc import Callable

import torch
from torch import fx

from pamm_fx import _compat
from pamm_fx.fxutil import MATMUL_FUNCTIONS, MATMUL_METHODS, Region, hint, is_linear, op_name, regions, val
from pamm_fx.names import param_name

__all__ = [
    "ATTENTION_HOPS", "HEAD_HOPS", "LORA_HOPS", "MLP_HOPS", "Candidate", "attention_output_of", "find_candidates",
]

#: How many ops may sit between a projection and the attention it feeds: views, transposes,
#: RoPE written out (slices, mul, cat, add), dtype casts, GQA head repeats (expand, reshape).
#: HF's Llama path is ~15; 32 leaves room without reaching the next layer (a linear stops the walk).
ATTENTION_HOPS = 32
#: Ops allowed between an MLP's up/gate projection and its down projection: GPT-2's tanh GELU
#: written out is ~8, plus views, dropout and the gating mul.
MLP_HOPS = 16
#: Ops allowed between a head and the loss or output it feeds (casts, views, a softcap, a slice).
HEAD_HOPS = 8
#: Calls that end a head's walk: losses and what they are written with.
_LOSSES = frozenset({
    "cross_entropy", "nll_loss", "log_softmax", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "softmax",
})
#: Ops allowed between a LoRA A and its B (peft: ``B(A(dropout(x))) * scaling``; casts or dropout).
LORA_HOPS = 3

_SDPA = {_compat.NN_SDPA, torch.nn.functional.scaled_dot_product_attention}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax}
_MATMUL = MATMUL_FUNCTIONS | {torch.einsum, torch.baddbmm}
#: Nonlinearities that make linear -> ... -> linear an MLP (function and method names).
_ACTIVATIONS = frozenset({
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "tanh", "sigmoid",
    "hardswish", "hardsigmoid", "hardtanh", "glu", "erf", "silu_", "relu_", "gelu_", "tanh_", "sigmoid_",
})
#: Shape-preserving or pointwise steps allowed on the MLP path (gating, scaling, dropout, views, casts).
_POINTWISE = frozenset({
    "mul", "add", "sub", "truediv", "div", "neg", "pow", "square", "clamp", "dropout", "view", "reshape",
    "contiguous", "to", "float", "half", "bfloat16", "type", "clone", "mul_", "add_", "iadd", "imul",
})
_ADAPTER_STEPS = frozenset({"dropout", "to", "float", "type", "contiguous"})
#: Higher-order ops that run a subgraph under activation checkpointing.
_CHECKPOINT_HOPS = frozenset({"tag_activation_checkpoint", "checkpoint"})


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One linear of the graph and the structural facts the checks need.

    checkpoint: the checkpoint higher-order op's name when the linear runs inside one (its node then
    belongs to the region's subgraph); weight_name: the parameter name as the user knows it, taken
    now because Dynamo drops the source metadata after compilation; adapter_b: a LoRA B, whose X
    is its A's r-wide output.
    """

    node: fx.Node
    x: object
    weight: object
    bias: object
    region: Region
    site: str
    weight_name: str
    checkpoint: str | None = None
    adapter_b: bool = False


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX
    return node.op == "call_method" and node.target in ("softmax", "log_softmax")


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MATMUL
    return node.op == "call_method" and node.target in MATMUL_METHODS


def _near(start: fx.Node, pred: Callable[[fx.Node], bool], forward: bool) -> bool:
    seen = {start}
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        if depth > 0 and pred(node):
            return True
        if depth == ATTENTION_HOPS:
            continue
        for n in node.users if forward else node.all_input_nodes:
            if n not in seen and not is_linear(n):
                seen.add(n)
                queue.append((n, depth + 1))
    return False


def _is_attention(node: fx.Node) -> bool:
    """SDPA, flex attention, or a matmul next to a softmax (manual attention)."""
    if node.op == "call_function" and node.target in _SDPA:
        return True
    if node.op == "call_function" and "flex_attention" in getattr(node.target, "__name__", str(node.target)):
        return True
    if _is_matmul(node):
        return _near(node, _is_softmax, forward=True) or _near(node, _is_softmax, forward=False)
    return False


def _reaches(node: fx.Node, found: Callable[[fx.Node], bool], stop: Callable[[fx.Node], bool], hops: int) -> bool:
    """Breadth-first through ``node``'s consumers: whether one satisfying ``found`` comes within ``hops``
    ops, not walking past a consumer that satisfies ``stop``."""
    seen = {node}
    queue = deque([(node, 0)])
    while queue:
        cur, depth = queue.popleft()
        for user in cur.users:
            if user in seen or _is_size(user):
                continue
            seen.add(user)
            if found(user):
                return True
            if not stop(user) and depth + 1 < hops:
                queue.append((user, depth + 1))
    return False


def _is_size(node: fx.Node) -> bool:
    """A size computed from a tensor (``x.size(0)``, ``bsz * heads``): under dynamic shapes such nodes link
    a tensor to the view of an unrelated one, which is not data flow."""
    return isinstance(val(node), (int, float, torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size))


def _feeds_attention(node: fx.Node) -> bool:
    """The projection's output reaches an attention op before any heavy op."""
    heavy = lambda n: n.op == "output" or is_linear(n) or _is_matmul(n) or _is_softmax(n)  # noqa: E731
    return _reaches(node, _is_attention, heavy, ATTENTION_HOPS)


#: Steps that only rearrange or cast a tensor: a consumer's X built from a saved tensor by these is
#: recomputed from it by the partitioner, not saved on its own.
_REARRANGE = frozenset({
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze",
    "to", "float", "half", "bfloat16", "type", "clone", "_unsafe_view",
})


def attention_output_of(x: object) -> fx.Node | None:
    """The SDPA or flex attention whose output ``x`` is, up to transposes, reshapes and casts.

    Their backward saves that output (with the log-sum-exp), so an ``attn_out`` projection's X
    costs nothing extra to keep: compressing it saves no memory (measured: docs/benchmarks.md).
    A hand-written attention (matmul, softmax, matmul) saves the probabilities instead, not this.
    """
    node, hops = x, 0
    while isinstance(node, fx.Node) and hops <= ATTENTION_HOPS:
        if node.op == "call_function" and (node.target in _SDPA or "flex_attention" in
                                           getattr(node.target, "__name__", str(node.target))):
            return node
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            node = node.args[0]  # flex attention returns (out, lse)
        elif op_name(node) in _REARRANGE and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            return None
        hops += 1
    return None


def _reads_attention(node: fx.Node) -> bool:
    """X comes out of an attention op through light ops (transposes, views, a gate): ``attn_out``."""
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return False
    return _is_attention(x) or _near(x, _is_attention, forward=False)


def _feeds_loss(node: fx.Node) -> bool:
    """The output reaches a loss or the graph's output within :data:`HEAD_HOPS` ops, no linear between."""
    loss = lambda n: n.op == "output" or op_name(n) in _LOSSES  # noqa: E731
    return _reaches(node, loss, lambda n: is_linear(n) or _is_matmul(n), HEAD_HOPS)


def _reached_linears(start: fx.Node) -> list[tuple[fx.Node, bool]]:
    """Linears whose X ``start``'s output reaches through pointwise ops (at most :data:`MLP_HOPS`),
    each with whether a nonlinearity was passed on the way."""
    found: list[tuple[fx.Node, bool]] = []
    seen = {(start, False)}
    queue = deque([(start, False, 0)])
    while queue:
        node, act, depth = queue.popleft()
        for user in node.users:
            if is_linear(user):
                if user.args[0] is node:
                    found.append((user, act))
                continue
            name = op_name(user)
            if depth + 1 >= MLP_HOPS or name not in _POINTWISE | _ACTIVATIONS:
                continue
            state = (user, act or name in _ACTIVATIONS)
            if state not in seen:
                seen.add(state)
                queue.append((*state, depth + 1))
    return found


def _mlp_links(linears: list[fx.Node]) -> dict[fx.Node, str]:
    """Linears at either end of an MLP, as ``mlp_up`` or ``mlp_down``: a down projection is a linear
    whose X is reached from another linear through a nonlinearity; every linear reaching a down
    projection's X through pointwise ops is an up projection (SwiGLU's up reaches it only through
    the gating mul, without an activation)."""
    reached = {lin: _reached_linears(lin) for lin in linears}
    downs = {user for found in reached.values() for user, act in found if act}
    ups = {lin for lin, found in reached.items() if any(user in downs for user, _ in found)}
    return {**{d: "mlp_down" for d in downs}, **{u: "mlp_up" for u in ups}}


def _in_out(node: fx.Node) -> tuple[int, int] | None:
    wv = val(node.args[1]) if len(node.args) > 1 else None
    if not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return None
    return hint(wv.shape[1]), hint(wv.shape[0])


def _low_rank_partners(node: fx.Node) -> list[fx.Node]:
    """The widening linears a narrowing one feeds directly: a LoRA pair ``B(A(x)) * s``.

    A (n -> r, r < n) reaches B (r -> m, r < m) as B's X through at most a scaling, dropout
    or cast. A residual add or a norm in between ends the search: an attention output
    projection or an MLP down projection is never taken for an adapter.
    """
    dims = _in_out(node)
    if dims is None or dims[1] >= dims[0]:
        return []
    partners: list[fx.Node] = []
    frontier = [node]
    for _ in range(LORA_HOPS):
        nxt = []
        for cur in frontier:
            for user in cur.users:
                if is_linear(user):
                    user_dims = _in_out(user)
                    if user.args[0] is cur and user_dims is not None and user_dims[0] < user_dims[1]:
                        partners.append(user)
                elif op_name(user) in _ADAPTER_STEPS:
                    nxt.append(user)
        frontier = nxt
    return partners


def _site(node: fx.Node, mlp_ends: dict[fx.Node, str]) -> str:
    """The site of a linear; a LoRA pair takes B's site (where the adapted projection's output goes)."""
    nodes = [node, *_low_rank_partners(node)]
    if any(_feeds_attention(n) for n in nodes):
        return "qkv"
    for n in nodes:
        if n in mlp_ends:
            return mlp_ends[n]
    if _reads_attention(node):
        return "attn_out"
    if any(_feeds_loss(n) for n in nodes):
        return "head"
    return "other"


def _weight_name(gm: fx.GraphModule, weight: object, outer: dict[fx.Node, fx.Node] | None = None) -> str:
    if not isinstance(weight, fx.Node):
        return repr(weight)
    if outer is not None and weight in outer:
        return param_name(outer[weight])
    return param_name(weight)


def _checkpointed(gm: fx.GraphModule, hop: fx.Node, region: Region) -> list[Candidate]:
    """The linears inside a checkpoint region's subgraph, named by the outer graph's arguments."""
    body_node = hop.args[0] if hop.args else None
    if not isinstance(body_node, fx.Node) or body_node.op != "get_attr":
        return []
    body = getattr(gm, str(body_node.target), None)
    if not isinstance(body, fx.GraphModule):
        return []
    outer = dict(zip(body.graph.find_nodes(op="placeholder"), hop.args[1:]))
    name = op_name(hop)
    found = []
    for node in body.graph.nodes:
        if is_linear(node):
            x, w, b = (list(node.args) + [None, None])[:3]
            found.append(Candidate(node, x, w, b, region, "other", _weight_name(body, w, outer), name))
    return found


def find_candidates(gm: fx.GraphModule, grad_enabled: bool) -> list[Candidate]:
    """Every linear of a normalized graph (and of its checkpoint regions), in graph order."""
    where = regions(gm.graph, grad_enabled)
    linears = [n for n in gm.graph.nodes if is_linear(n)]
    mlp_ends = _mlp_links(linears)
    adapter_bs = {b for lin in linears for b in _low_rank_partners(lin)}
    out: list[Candidate] = []
    for node in gm.graph.nodes:
        if is_linear(node):
            x, w, b = (list(node.args) + [None, None])[:3]
            out.append(Candidate(node, x, w, b, where[node], _site(node, mlp_ends), _weight_name(gm, w),
                                 adapter_b=node in adapter_bs))
        elif node.op == "call_function" and op_name(node) in _CHECKPOINT_HOPS:
            out.extend(_checkpointed(gm, node, where[node]))
    return out
