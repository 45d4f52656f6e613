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

Only products whose right operand is a 2-D graph input or attribute (a parameter,
possibly transposed) are rewritten: ``q @ k.transpose(-2, -1)`` in attention has
an activation there and stays as it is. The result is the same math, so linears
the matcher does not group compile exactly as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from pamm_fx.passes.fxutil import LINEAR, MATMUL_FUNCTIONS, MATMUL_METHODS, val

__all__ = ["LINEAR_TARGETS", "normalize_linears"]

log = logging.getLogger(__name__)

LINEAR_TARGETS = (LINEAR, torch.nn.functional.linear)
_ADDMM = (torch.addmm,)
_TRANSPOSE_METHODS = ("t", "T")


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


def _transposed_weight(node: Any) -> fx.Node | None:
    """W for ``W.t()``, ``W.T``, ``W.transpose(0, 1)`` or ``torch.t(W)`` of a weight W, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in _TRANSPOSE_METHODS and len(node.args) == 1:
        src = node.args[0]
    elif node.op == "call_method" and node.target == "transpose" and _swaps_2d(node.args[1:]):
        src = node.args[0]
    elif node.op == "call_function" and node.target is torch.t and len(node.args) == 1:
        src = node.args[0]
    elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("T",):
        src = node.args[0]
    else:
        return None
    return src if _is_weight(src) else None


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
    base = _transposed_weight(w)
    if base is not None:
        weight, needs_t, n = base, False, val(base).shape[1]
    elif _is_weight(w):
        weight, needs_t, n = w, True, val(w).shape[0]
    else:
        return None
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
            args = _positional(node)
            if node.target is not LINEAR or node.kwargs or len(node.args) != 3:
                node.target = LINEAR
                node.args = args
                node.kwargs = {}
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
            if old_w is not weight and isinstance(old_w, fx.Node) and not old_w.users:
                graph.erase_node(old_w)
            changed += 1
    if changed:
        log.debug("normalized %d linear call(s)", changed)
        gm.recompile()
    return changed
