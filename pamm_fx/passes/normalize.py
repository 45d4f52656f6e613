"""Bring every linear projection in a Dynamo graph into one call form.

Dynamo shows a projection as ``torch._C._nn.linear(x, w, b)`` when it inlines
``nn.Module`` calls (the default), but as ``call_module`` when inlining is off,
and user code may pass ``weight=``/``bias=`` by keyword. After this pass every
projection is ``call_function(torch._C._nn.linear, (x, w, b_or_None))`` with
positional arguments, so the matcher needs to know a single form.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

__all__ = ["LINEAR_TARGETS", "normalize_linears"]

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


def _positional(node: fx.Node) -> tuple:
    values = list(node.args) + [None] * (3 - len(node.args))
    for i, name in enumerate(("input", "weight", "bias")):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    return tuple(values[:3])


def normalize_linears(gm: fx.GraphModule) -> int:
    """Rewrite ``call_module(nn.Linear)`` and keyword calls in place; return how many changed."""
    changed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) is not torch.nn.Linear or len(node.args) != 1 or node.kwargs:
                continue
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                new = graph.call_function(torch._C._nn.linear, (node.args[0], w, b))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed += 1
        elif node.op == "call_function" and node.target in LINEAR_TARGETS:
            args = _positional(node)
            if node.target is not torch._C._nn.linear or node.kwargs or len(node.args) != 3:
                node.target = torch._C._nn.linear
                node.args = args
                node.kwargs = {}
                changed += 1
    if changed:
        log.debug("normalized %d linear call(s)", changed)
        gm.recompile()
    return changed
