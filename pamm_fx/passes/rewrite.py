"""Replace each matched group by the two ``pamm::`` ops.

::

    X ── linear(X, Wq, bq) ── ...          X ── detach ── pamm.compress(·, seed) ──┐ (C, f, alpha)
    X ── linear(X, Wk, bk) ── ...   =>     X ─────────── pamm.linear_group(X, [Wq, Wk, Wv], ..., C, f, alpha)
    X ── linear(X, Wv, bv) ── ...                          ├─ [0] ── ...  (was linear(X, Wq, bq))
                                                           ├─ [1] ── ...
                                                           └─ [2] ── ...

The new nodes go right before the group's first projection, never merely after the latest
input: that keeps them in the projections' grad-mode and autocast region (Dynamo records
``with torch.no_grad()`` as ``_set_grad_enabled`` calls in the graph, so a node placed after
X but inside a no-grad block would lose every gradient of the group).

Under autocast the linears compute in their output's dtype (``Group.dtype``), which X, a weight or
a bias may not be in (a float32 X, or a bf16 X read by float32 weights). Custom ops do not follow
autocast, so the rewrite makes its casts explicit, to the letter of what autocast did to each linear:

- each weight and bias not in the compute dtype is cast by its own ``.to(dtype)`` node, whose
  backward returns the weight and bias gradients computed in that dtype in the parameter's dtype;
- X goes to ``pamm::linear_group`` as it is: the op casts it to its weights' dtype inside and returns
  each member's dX contribution cast back to X's dtype, summed there, as autograd sums the gradients
  of autocast's one cast per linear;
- ``pamm::compress`` and ``pamm::quantize`` read ``X.to(dtype)``, so C and the payload are
  in the dtype plain saves X in for its weight gradients (alpha stays float32).

Each group's payload is written by its estimator (``Group.estimator.emit``, :mod:`pamm_fx.estimators`):
``pamm`` writes compress; ``pamm_sr`` also quantizes the residual after it; ``sr`` writes no compress at
all, only ``pamm::quantize`` of X (no base), and the linear_group's C, f, alpha are None::

    X ── detach ── pamm.quantize(·, None, None, None, seed, salt, bits) ──┐ (q, lo, scale)
    X ─────────── pamm.linear_group(X, [W1, W2], ..., None, None, None, q, lo, scale, bits)

The rewrite works on a copy of the graph, so the caller can still compile the
untouched original if anything goes wrong. The ops' nodes are written by their owners
(:func:`pamm_fx.ops.compress.emit`, :func:`pamm_fx.ops.lowbit.emit` through the estimator,
:func:`pamm_fx.ops.linear_group.emit`); the per-call seed input by :func:`pamm_fx.seed.add_placeholder`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat, seed
from pamm_fx.fxutil import copy_graph_module, val
from pamm_fx.ops.linear_group import LinearGroup
from pamm_fx.ops.linear_group import emit as emit_linear_group
from pamm_fx.passes.match import Group

__all__ = ["RewriteError", "rewrite_groups"]

log = logging.getLogger(__name__)


class RewriteError(RuntimeError):
    """A group whose nodes cannot be fused without reordering the graph."""


def _fake_mode(graph: fx.Graph) -> Any:
    for node in graph.find_nodes(op="placeholder"):
        mode = _compat.fake_mode_of(val(node))
        if mode is not None:
            return mode
    return None


def _movable(node: fx.Node) -> bool:
    """A node with no inputs computed in the graph body (a get_attr, or a view/cast of a graph input
    or attribute) may move earlier without changing what it computes."""
    if node.op in ("get_attr", "placeholder"):
        return True
    return node.op == "call_method" and node.target in ("t", "to") and all(
        a.op in ("get_attr", "placeholder") for a in node.all_input_nodes
    )


def _anchor(graph: fx.Graph, group: Group, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """The group's earliest projection: the fused op goes right before it, so it runs in the same
    grad-mode and autocast region as the projections it replaces. Weights or biases defined later
    (a get_attr emitted at its first use) move up in front of it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min((env[p.node] for p in group.projections), key=order.__getitem__)
    inputs = [env[group.x]] + [env[p.weight] for p in group.projections]
    inputs += [env[p.bias] for p in group.projections if p.bias is not None]
    for node in sorted({n for n in inputs if order[n] > order[first]}, key=order.__getitem__):
        if not _movable(node):
            raise RewriteError(f"an input of the group is computed after its first projection ({node.name})")
        for inp in node.all_input_nodes:
            if order[inp] > order[first]:
                first.prepend(inp)
        first.prepend(node)
    return first


def rewrite_groups(
    gm: fx.GraphModule,
    groups: list[Group],
    salt_base: int = 0,
    seed_device: torch.device | None = None,
) -> fx.GraphModule:
    """Return a rewritten copy of ``gm``; ``gm`` itself is not modified.

    Group i gets salt ``salt_base + i`` so that groups draw different rows from one seed. Everything a
    group's ops take comes from the group (its estimator carries its options).
    """
    new, env = copy_graph_module(gm)
    with _compat.observe_pass(new, "pamm_rewrite_groups"):
        _rewrite(new, env, groups, salt_base, seed_device or torch.device("cpu"))
    new.recompile()
    log.info("pamm rewrote %d group(s)", len(groups))
    return new


def _rewrite(new: fx.GraphModule, env: dict[fx.Node, fx.Node], groups: list[Group], salt_base: int,
             seed_device: torch.device) -> None:
    graph = new.graph
    fake_mode = _fake_mode(graph)
    seed_node = seed.add_placeholder(graph, fake_mode, seed_device)
    for salt, group in enumerate(groups):
        first = _anchor(graph, group, env)
        x = env[group.x]
        projs = [env[p.node] for p in group.projections]
        weights = [env[p.weight] for p in group.projections]
        biases = [env[p.bias] if p.bias is not None else None for p in group.projections]
        with graph.inserting_before(first):
            detached = graph.call_method("detach", (_cast(graph, group.dtype, x, fake_mode),))
            xv = val(detached.args[0])
            if fake_mode is not None and xv is not None:
                with fake_mode:
                    detached.meta["example_value"] = xv.detach()
            weights = [_cast(graph, group.dtype, w, fake_mode) for w in weights]
            biases = [_cast(graph, group.dtype, b, fake_mode) if b is not None else None for b in biases]
            kept = group.estimator.emit(graph, detached, seed_node, salt_base + salt)
            fused, outs = emit_linear_group(graph, LinearGroup(x, weights, biases, kept.c, kept.f, kept.alpha,
                                                               kept.quantized))
            for proj, old, out in zip(group.projections, projs, outs):
                out.meta = dict(old.meta)
                old.replace_all_uses_with(out)
                env[proj.node] = out  # a later group may read it as X (LoRA's B reads A's output)
        if fake_mode is not None and xv is not None:
            fused.meta["example_value"] = [o.meta.get("example_value") for o in outs]
        for old in projs:
            graph.erase_node(old)
    graph.lint()


def _cast(graph: fx.Graph, dtype: torch.dtype, node: fx.Node, fake_mode: Any) -> fx.Node:
    """``node.to(dtype)`` at the graph's current insertion point where its value is in another dtype
    (autocast's cast, made explicit), else ``node`` itself."""
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dtype == dtype:
        return node
    cast = graph.call_method("to", (node, dtype))
    if fake_mode is not None:
        with fake_mode:
            cast.meta["example_value"] = v.to(dtype)
    return cast
