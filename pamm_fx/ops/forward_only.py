"""What the forward-only ops (``pamm::compress``, ``pamm::quantize``) share.

Both only produce what a backward will need, so their outputs are non-differentiable
(:func:`register_non_differentiable`), and the rewrite writes each as one node plus one ``getitem``
per output, with example values where X has a fake one, so that later passes see shapes
(:func:`emit_outputs`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat

__all__ = ["emit_outputs", "register_non_differentiable"]


def register_non_differentiable(op: Any) -> None:
    """Register ``op``'s autograd: every output non-differentiable, no gradient to any input."""

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.mark_non_differentiable(*output)
        ctx.num_inputs = len(inputs)

    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        """Unreachable in practice: the outputs are non-differentiable by construction."""
        return (None,) * ctx.num_inputs

    op.register_autograd(backward, setup_context=setup_context)


def emit_outputs(graph: fx.Graph, target: Any, args: Sequence[Any], x: fx.Node,
                 count: int) -> tuple[fx.Node, list[fx.Node]]:
    """``target(*args)`` (args hold FX nodes) at the graph's insertion point and its ``count`` outputs;
    with example values computed under X's fake mode when X has one."""
    node = graph.call_function(target, tuple(args))
    parts = [graph.call_function(operator.getitem, (node, i)) for i in range(count)]
    fake = _compat.fake_mode_of(x.meta.get("example_value"))
    if fake is not None:
        examples = [a.meta["example_value"] if isinstance(a, fx.Node) else a for a in args]
        with fake, torch.no_grad():
            values = target(*examples)
        node.meta["example_value"] = values
        for part, v in zip(parts, values):
            part.meta["example_value"] = v
    return node, parts
