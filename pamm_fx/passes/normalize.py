"""Bring every linear projection in a Dynamo graph into one call form.

Dynamo shows a projection as ``torch._C._nn.linear(x, w, b)`` when it inlines
``nn.Module`` calls (the default), but as ``call_module`` when inlining is off,
and user code may pass ``weight=``/``bias=`` by keyword. Some models write the
projection as a matrix product with a weight stored transposed, (n, m) instead of
F.linear's (m, n): GPT-2's ``Conv1D`` is ``addmm(bias, x.view(-1, n), W)``, and
hand-written code has ``x @ W`` or ``x @ W + b``. After this pass every projection
is ``call_function(torch._C._nn.linear, (x, w, b_or_None))`` with positional
arguments, where ``w`` may be ``W.t()``, a view of the parameter (no copy)::

    addmm(b, x2d, W)  =>  t = W.t() ; linear(x2d, t, b)
    matmul(x, W)      =>  t = W.t() ; linear(x, t, None)
    matmul(x, W.t())  =>  linear(x, W, None)
    linear(x, W.T)    =>  t = W.t() ; linear(x, t, None)

"Transposed" is any chain of 2-D transposes (``.t()``, ``.T``, ``.mT``, ``transpose(0, 1)``,
``permute(1, 0)`` and their ``torch.`` functions; ``W.T.T`` is W). Only products whose right
operand is a 2-D graph input or attribute (a parameter, possibly transposed) are rewritten:
``q @ k.transpose(-2, -1)`` in attention has an activation there and stays as it is. The result
is the same math, so linears the matcher does not group compile exactly as before. Products
that read a parameter in any other form (``einsum``, ``W @ x``, a 3-D weight, ``nn.LSTM``'s
fused op) are listed by the scan after this pass (:mod:`pamm_fx.passes.unrecognised`), so
explain() names each with a reason. ``nn.MultiheadAttention``'s opaque call is written out by the
pass before this one (:mod:`pamm_fx.passes.mha`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from pamm_fx.fxutil import LINEAR, MATMUL_FUNCTIONS, MATMUL_METHODS, op_name, val

__all__ = ["LINEAR_TARGETS", "normalize_linears", "weight_view"]

log = logging.getLogger(__name__)

LINEAR_TARGETS = (LINEAR, torch.nn.functional.linear)
_ADDMM = (torch.addmm,)


def _positional(node: fx.Node) -> tuple:
    values = list(node.args) + [None] * (3 - len(node.args))
    for i, name in enumerate(("input", "weight", "bias")):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    return tuple(values[:3])


def _is_weight(node: Any) -> bool:
    """A 2-D floating graph input or attribute: what a parameter looks like in Dynamo's graph."""
    v = val(node)
    return (
        isinstance(node, fx.Node)
        and node.op in ("placeholder", "get_attr")
        and isinstance(v, torch.Tensor)
        and v.dim() == 2
        and v.is_floating_point()
    )


def _swaps_2d(dims: tuple) -> bool:
    """``transpose(a, b)`` of a 2-D tensor that swaps its two dims (0/1 or -2/-1 in any mix)."""
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}


def _permutes_2d(dims: tuple) -> bool:
    """``permute(1, 0)`` (or ``permute((1, 0))``, negative dims too) of a 2-D tensor."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]


def _transpose_source(node: Any) -> fx.Node | None:
    """X for a node that transposes a 2-D X (``X.t()``, ``X.T``, ``X.mT``, ``X.transpose(0, 1)``,
    ``X.permute(1, 0)``, ``torch.t(X)``, ``torch.transpose(X, 0, 1)``, ``torch.permute(X, (1, 0))``), else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node) or node.kwargs:
        return None
    name, rest = op_name(node), node.args[1:]
    if node.op == "call_function" and node.target is getattr:
        ok = rest in (("T",), ("mT",))
    elif node.op == "call_function" and node.target not in (torch.t, torch.transpose, torch.permute):
        ok = False
    else:
        ok = (name == "t" and not rest) or (name == "transpose" and _swaps_2d(rest)) or (
            name == "permute" and _permutes_2d(rest))
    return node.args[0] if ok else None


def weight_view(node: Any) -> tuple[fx.Node, bool] | None:
    """(W, transposed) when ``node`` is a weight W or a chain of 2-D transposes of one
    (``W.T.T`` is W itself), else None."""
    flipped = False
    while isinstance(node, fx.Node) and not _is_weight(node):
        node = _transpose_source(node)
        flipped = not flipped
    return (node, flipped) if _is_weight(node) else None


def _product(node: fx.Node) -> tuple[Any, Any] | None:
    """(x, right operand) of a plain matrix product node, else None."""
    if node.kwargs:
        return None
    if node.op == "call_function" and node.target in MATMUL_FUNCTIONS and len(node.args) == 2:
        return node.args[0], node.args[1]
    if node.op == "call_method" and node.target in MATMUL_METHODS and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def _addmm(node: fx.Node) -> tuple[Any, Any, Any] | None:
    """(bias, x, W) of ``addmm(bias, x, W)`` with beta = alpha = 1 and a 1-D bias, else None."""
    if node.op != "call_function" or node.target not in _ADDMM or len(node.args) != 3:
        return None
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(node.kwargs) - {"beta", "alpha"}:
        return None
    bias, x, w = node.args
    bv = val(bias)
    if not isinstance(bv, torch.Tensor) or bv.dim() != 1:
        return None
    return bias, x, w


def _x_fits(x: Any, n: Any) -> bool:
    """X is a floating (..., n) activation; sizes compared as text so a symbolic size adds no guard."""
    xv = val(x)
    return isinstance(xv, torch.Tensor) and xv.dim() >= 2 and xv.is_floating_point() and str(xv.shape[-1]) == str(n)


def _linear_args(node: fx.Node) -> tuple[Any, Any, Any, bool] | None:
    """(x, weight in F.linear layout or the (n, m) weight to transpose, bias, needs_t) of a product form."""
    addmm = _addmm(node)
    if addmm is not None:
        bias, x, w = addmm
    else:
        product = _product(node)
        if product is None:
            return None
        (x, w), bias = product, None
    view = weight_view(w)
    if view is None:
        return None
    base, flipped = view
    if flipped:
        weight, needs_t, n = base, False, val(base).shape[1]
    else:
        weight, needs_t, n = base, True, val(base).shape[0]
    if not _x_fits(x, n):
        log.debug("not a projection: %s (its weight operand fits, X %s does not)", node.format_node(), x)
        return None
    return x, weight, bias, needs_t


def _transpose_node(graph: fx.Graph, weight: fx.Node, cache: dict[fx.Node, fx.Node]) -> fx.Node:
    """One ``weight.t()`` per weight, right after the last placeholder or the get_attr, so that it
    precedes every use (a weight shared by several projections gets one view)."""
    if weight in cache:
        return cache[weight]
    if weight.op == "placeholder":
        where = list(graph.find_nodes(op="placeholder"))[-1]
    else:
        where = weight
    with graph.inserting_after(where):
        t = graph.call_method("t", (weight,))
    wv = val(weight)
    if wv is not None:
        t.meta["example_value"] = wv.t()
    cache[weight] = t
    return t


def _erase_dead_views(graph: fx.Graph, node: Any) -> None:
    """Erase a weight's transpose chain that nothing reads any more (``W.T.T`` left by a rewrite)."""
    while isinstance(node, fx.Node) and not node.users and (src := _transpose_source(node)) is not None:
        graph.erase_node(node)
        node = src


def normalize_linears(gm: fx.GraphModule) -> int:
    """Rewrite ``call_module(nn.Linear)``, keyword calls and product forms in place; return how many changed."""
    changed = 0
    graph = gm.graph
    transposes: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) is not torch.nn.Linear or len(node.args) != 1 or node.kwargs:
                if isinstance(mod, torch.nn.Linear):
                    log.debug("left as call_module: %s (%s, not a plain nn.Linear(x) call)", node.target,
                              type(mod).__name__)
                continue
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                new = graph.call_function(LINEAR, (node.args[0], w, b))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed += 1
        elif node.op == "call_function" and node.target in LINEAR_TARGETS:
            x, w, b = _positional(node)
            view = weight_view(w) if not _is_weight(w) else None
            if view is not None:  # F.linear(x, W.T) of a (n, m) weight W: the canonical W.t() view
                w = _transpose_node(graph, view[0], transposes) if view[1] else view[0]
            if node.target is not LINEAR or node.kwargs or len(node.args) != 3 or view is not None:
                old_w = node.args[1] if len(node.args) > 1 else None
                node.target, node.args, node.kwargs = LINEAR, (x, w, b), {}
                _erase_dead_views(graph, old_w)
                changed += 1
        else:
            form = _linear_args(node)
            if form is None:
                continue
            x, weight, bias, needs_t = form
            w = _transpose_node(graph, weight, transposes) if needs_t else weight
            log.debug("normalized %s to linear (weight %s, transposed=%s)", node.format_node(), weight.name, needs_t)
            old_w = node.args[1] if len(node.args) == 2 else node.args[2]
            node.op, node.target, node.args, node.kwargs = "call_function", LINEAR, (x, w, bias), {}
            _erase_dead_views(graph, old_w)
            changed += 1
    if changed:
        log.debug("normalized %d linear call(s)", changed)
        gm.recompile()
    return changed
