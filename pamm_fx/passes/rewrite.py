"""Replace each matched group by the two ``pamm::`` ops.

::

    X ── linear(X, Wq, bq) ── ...          X ── detach ── pamm.compress(·, seed) ──┐ (C, f, alpha)
    X ── linear(X, Wk, bk) ── ...   =>     X ─────────── pamm.linear_group(X, [Wq, Wk, Wv], ..., C, f, alpha)
    X ── linear(X, Wv, bv) ── ...                          ├─ [0] ── ...  (was linear(X, Wq, bq))
                                                           ├─ [1] ── ...
                                                           └─ [2] ── ...

Under autocast (``Group.dtype`` set) X, the weights and the biases are first cast
explicitly to the dtype the linears computed in (``.to(dtype)``), because custom ops
do not follow autocast: C is then stored in that dtype, alpha stays float32, and the
casts' backward returns dX and the weight gradients in the original dtypes, as
autocast's own casts do.

The rewrite works on a copy of the graph, so the caller can still compile the
untouched original if anything goes wrong. One extra placeholder, ``pamm_seed``
(an int64 scalar tensor), is appended after the graph's own inputs; the backend
feeds a fresh value every call so each step samples different generator rows.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx

from pamm_fx.config import PammConfig
from pamm_fx.passes.match import Group

__all__ = ["copy_graph_module", "rewrite_groups", "SEED_PLACEHOLDER"]

log = logging.getLogger(__name__)

SEED_PLACEHOLDER = "pamm_seed"


class RewriteError(RuntimeError):
    """A group whose nodes cannot be fused without reordering the graph."""


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of ``gm`` (node metadata included) and the map from its nodes to the copy's."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    return new, env


def _fake_mode(graph: fx.Graph) -> Any:
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("example_value")
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None


def _insertion_point(graph: fx.Graph, group: Group, env: dict[fx.Node, fx.Node], seed: fx.Node) -> fx.Node:
    """The latest definition among the group's inputs (and the seed placeholder, which follows the
    graph's own inputs); it must precede every use of the group's outputs."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [seed, env[group.x]] + [env[p.weight] for p in group.projections]
    inputs += [env[p.bias] for p in group.projections if p.bias is not None]
    last = max(inputs, key=order.__getitem__)
    first_use = min(order[u] for p in group.projections for u in env[p.node].users)
    if order[last] >= first_use:
        raise RewriteError(f"an input of the group is defined after a projection's output is used ({last.name})")
    return last


def _add_seed(graph: fx.Graph, fake_mode: Any) -> fx.Node:
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        seed = graph.placeholder(SEED_PLACEHOLDER)
    example = torch.zeros((), dtype=torch.int64)
    seed.meta["example_value"] = fake_mode.from_tensor(example) if fake_mode is not None else example
    return seed


def rewrite_groups(
    gm: fx.GraphModule, groups: list[Group], config: PammConfig, salt_base: int = 0
) -> fx.GraphModule:
    """Return a rewritten copy of ``gm``; ``gm`` itself is not modified.

    Group i gets salt ``salt_base + i`` so that groups draw different rows from one seed.
    """
    new, env = copy_graph_module(gm)
    graph = new.graph
    fake_mode = _fake_mode(graph)
    seed = _add_seed(graph, fake_mode)
    for salt, group in enumerate(groups):
        frac = config.site_ratio(group.site) or config.ratio_fraction
        where = _insertion_point(graph, group, env, seed)
        x = env[group.x]
        projs = [env[p.node] for p in group.projections]
        weights = [env[p.weight] for p in group.projections]
        biases = [env[p.bias] for p in group.projections if p.bias is not None]
        has_bias = [p.bias is not None for p in group.projections]
        if group.dtype is not None:
            where, (x, *weights), biases = _cast(graph, where, group.dtype, [x, *weights], biases, fake_mode)
        with graph.inserting_after(where):
            detached = graph.call_method("detach", (x,))
        with graph.inserting_after(detached):
            comp = graph.call_function(
                torch.ops.pamm.compress.default,
                (detached, seed, frac.numerator, frac.denominator, config.min_generators, config.min_tokens, config.eps,
                 salt_base + salt),
            )
        with graph.inserting_after(comp):
            c = graph.call_function(operator.getitem, (comp, 0))
        with graph.inserting_after(c):
            f = graph.call_function(operator.getitem, (comp, 1))
        with graph.inserting_after(f):
            alpha = graph.call_function(operator.getitem, (comp, 2))
        with graph.inserting_after(alpha):
            fused = graph.call_function(
                torch.ops.pamm.linear_group.default, (x, weights, biases, has_bias, c, f, alpha)
            )
        outs = []
        anchor = fused
        for i, (proj, old) in enumerate(zip(group.projections, projs)):
            with graph.inserting_after(anchor):
                out = graph.call_function(operator.getitem, (fused, i))
            out.meta = dict(old.meta)
            old.replace_all_uses_with(out)
            env[proj.node] = out  # a later group may read it as X (LoRA's B reads A's output)
            outs.append(out)
            anchor = out
        _set_meta(x, detached, comp, (c, f, alpha), fused, outs, fake_mode)
        for old in projs:
            graph.erase_node(old)
    graph.lint()
    new.recompile()
    log.info("pamm rewrote %d group(s)", len(groups))
    return new


def _cast(
    graph: fx.Graph, where: fx.Node, dtype: torch.dtype, tensors: list[fx.Node], biases: list[fx.Node], fake_mode: Any
) -> tuple[fx.Node, list[fx.Node], list[fx.Node]]:
    """``t.to(dtype)`` for each tensor and bias, inserted after ``where``; returns the new anchor and nodes."""
    out: list[fx.Node] = []
    for node in [*tensors, *biases]:
        with graph.inserting_after(where):
            cast = graph.call_method("to", (node, dtype))
        val = node.meta.get("example_value")
        if fake_mode is not None and isinstance(val, torch.Tensor):
            with fake_mode:
                cast.meta["example_value"] = val.to(dtype)
        out.append(cast)
        where = cast
    return where, out[: len(tensors)], out[len(tensors) :]


def _set_meta(
    x: fx.Node,
    detached: fx.Node,
    comp: fx.Node,
    parts: tuple[fx.Node, fx.Node, fx.Node],
    fused: fx.Node,
    outs: list[fx.Node],
    fake_mode: Any,
) -> None:
    """Give the new nodes example values so later passes and inspection see shapes."""
    xv = x.meta.get("example_value")
    if fake_mode is None or xv is None:
        return
    with fake_mode, torch.no_grad():
        dv = xv.detach()
        detached.meta["example_value"] = dv
        args = [a.meta["example_value"] if isinstance(a, fx.Node) else a for a in comp.args]
        vals = torch.ops.pamm.compress.default(*args)
    comp.meta["example_value"] = vals
    for node, val in zip(parts, vals):
        node.meta["example_value"] = val
    fused.meta["example_value"] = [o.meta.get("example_value") for o in outs]
