"""See, before training, what the ``pamm`` backend will do to a model and why.

``explain(model, *inputs, **options)`` runs Dynamo capture once with a backend that
applies our own passes (and the rewrite, for the "after" graph) but no Inductor and no
backward, so it takes about as long as one eager forward plus tracing. The report
(:mod:`pamm_fx.report`) names every group and every linear left alone, in the
parameter names the user knows, and estimates what the rewrite saves::

    graph 0  (compile 0/0)
      group 0  X=norm f32[2, 64, 32]  b=128 n=32  ratio 1/64  k=16
        ...

This module builds the report from each graph's :class:`~pamm_fx.plan.Plan`; printing is
:mod:`pamm_fx.render`'s, comparing plans and expected files :mod:`pamm_fx.snapshot`'s (both
re-exported here, as before the split).
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat, render, seed
from pamm_fx.capture import capture
from pamm_fx.compiler import saved_partitioner
from pamm_fx.config import check_option_names, resolve
from pamm_fx.fxutil import val
from pamm_fx.names import fmt_value
from pamm_fx.passes.categories import GRAPH_BREAK, REWRITE_FAILED, Rejection
from pamm_fx.passes.checks import NO_ATTENTION
from pamm_fx.passes.match import Group
from pamm_fx.plan import Estimate, Plan, apply
from pamm_fx.report import ExplainReport, GraphBreak, GraphReport, GroupInfo, ProjectionInfo, SavedInfo, SkipInfo
from pamm_fx.saved import partition_choices
from pamm_fx.sideeffects import modules_of
from pamm_fx.snapshot import ACCEPT_ENV, check_plan, diff_plans, short_names, why_left_exact

__all__ = [
    "ACCEPT_ENV",
    "ExplainReport",
    "GraphBreak",
    "GraphReport",
    "GroupInfo",
    "ProjectionInfo",
    "SavedInfo",
    "SkipInfo",
    "check_plan",
    "diff_plans",
    "explain",
    "short_names",
    "why_left_exact",
]


# --- building a report from one captured graph -------------------------------------------


def _outputs(gm: fx.GraphModule) -> set[fx.Node]:
    out = next(iter(gm.graph.find_nodes(op="output")))
    return set(out.all_input_nodes) | {n for a in out.all_input_nodes for n in a.all_input_nodes
                                       if a.op == "call_function" and a.target is operator.getitem}


def _skip(rej: Rejection, x_is_output: bool, graph_breaks: bool) -> SkipInfo:
    """A skip as reported: when X itself leaves the graph, the reason says a graph break may split its
    group, and the category is ``graph_break`` when Dynamo did break the model (:func:`explain` knows
    the breaks only after the whole capture, so this is decided then, once)."""
    if rej.category != NO_ATTENTION.name or not x_is_output:
        return SkipInfo(rej.weight_name, rej.category, rej.reason)
    return SkipInfo(rej.weight_name, GRAPH_BREAK.name if graph_breaks else rej.category,
                    "a graph break splits its group: X is an output of this graph, so the projections of X after "
                    "the break are in another graph and this one does not reach attention here")


#: What a :class:`GroupInfo` reports of a group's :class:`~pamm_fx.plan.Estimate`: every field the two share,
#: taken as it is (sizes, k and its formula, bytes and FLOPs before and after).
_FROM_ESTIMATE = tuple(f.name for f in dataclasses.fields(GroupInfo)
                       if f.name in {e.name for e in dataclasses.fields(Estimate)})


def _group(p: Plan, g: Group) -> GroupInfo:
    """A group as reported: who is in it (names as the user knows them), its estimator, and its Estimate."""
    est = p.estimate(g)
    ratio = g.estimator.ratio
    info = GroupInfo(
        x=g.x.name,
        x_type=fmt_value(val(g.x)),
        projections=[ProjectionInfo(q.weight_name, q.bias_name, q.out_features) for q in g.projections],
        ratio=f"{ratio.numerator}/{ratio.denominator}",
        site=g.site,
        estimator=g.estimator.name,
        bits=g.estimator.bits,
        **{name: getattr(est, name) for name in _FROM_ESTIMATE},
    )
    if (note := g.estimator.note(render.mib(est.lowbit_bytes))) is not None:
        info.notes.append(note)
    if est.dynamic:
        info.notes.append(f"b = {est.b_expr} changes from call to call: k is decided on every call by the op "
                          f"(numbers here are for b = {est.b})")
    if g.x.op == "placeholder":
        info.notes.append("X is an input of this graph (made before a graph break?): if an earlier graph keeps X "
                          "alive for backward, compressing it here saves nothing")
    return info


class _Collector:
    """Builds a :class:`GraphReport` from each graph's :class:`~pamm_fx.plan.Plan` (and the rewritten
    copy :func:`apply` makes) while :func:`pamm_fx.capture.capture` runs; skips are finished once the
    graph breaks are known (:meth:`finish`)."""

    def __init__(self) -> None:
        self.graphs: list[GraphReport] = []
        self._rejections: list[list[tuple[Rejection, bool]]] = []

    def __call__(self, p: Plan, gm: fx.GraphModule) -> None:
        report = GraphReport(
            index=len(self.graphs),
            compile_id=p.compile_id or "?",
            groups=[_group(p, g) for g in p.groups],
            skipped=[],
            before=render.code(gm),
            error=p.error or "",
        )
        outputs = _outputs(p.graph)
        rejections = [(r, r.node.args[0] in outputs) for r in p.rejections]
        if p.config.saved != "exact" and not p.error:
            report.saved = _saved(p)
        if p.groups:
            report.dot = render.dot_clusters(report.index, p.groups)
            try:
                report.after = render.code(apply(p))
            except Exception as exc:  # the backend compiles the captured graph then: no group is rewritten
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                report.error = f"{type(exc).__name__}: {first}"
                report.skipped = [
                    SkipInfo(q.weight, REWRITE_FAILED.name, f"the rewrite of its group failed ({report.error})")
                    for g in report.groups for q in g.projections
                ]
                report.groups = []
        self.graphs.append(report)
        self._rejections.append(rejections)

    def finish(self, graph_breaks: bool) -> list[GraphReport]:
        for report, rejections in zip(self.graphs, self._rejections):
            report.skipped += [_skip(r, x_is_output, graph_breaks) for r, x_is_output in rejections]
        return self.graphs


def _saved(p: Plan) -> list[SavedInfo]:
    """The partitioner's saved tensors of the rewritten graph and what ``saved`` does to each, as the backend's
    compile would decide them (:func:`pamm_fx.saved.partition_choices`)."""
    part = saved_partitioner(p, {})
    new = apply(p)
    if part is None or new is None:
        return []
    inputs = [n.meta.get("example_value") for n in p.original.graph.find_nodes(op="placeholder")]
    fake_mode = _compat.detect_fake_mode([i for i in inputs if isinstance(i, torch.Tensor)])
    choices = partition_choices(new, [*inputs, seed.example(fake_mode, p.seed_device)], part)
    return [SavedInfo(c.name, _shape_text(c.shape), str(c.dtype).removeprefix("torch."),
                      c.compressed, c.bytes_before, c.bytes_after, c.why, c.root) for c in choices]


def _shape_text(shape: tuple[int | str, ...]) -> str:
    """``(8, 512)``, ``(s0, 32)``: a saved tensor's sizes as Python prints a tuple of them."""
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _location(reason: Any) -> str:
    stack = getattr(reason, "user_stack", None) or []
    if not stack:
        return "?"
    frame = stack[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"


def _graph_break(reason: Any) -> GraphBreak:
    text = str(reason.reason).strip()
    return GraphBreak(text.splitlines()[0] if text else "?", _location(reason), text)


def explain(
    model: Any, *example_inputs: Any, model_kwargs: Mapping[str, Any] | None = None, **options: Any
) -> ExplainReport:
    """Capture ``model(*example_inputs, **model_kwargs)`` with Dynamo and report the pamm rewrite plan; no
    training, no Inductor.

    The plan is made by the same :func:`pamm_fx.plan.plan` the backend runs. Dynamo's caches are left as
    they were: graphs the user already compiled stay compiled and no capture entry stays on any code
    object (:func:`pamm_fx.sideeffects.dynamo_untouched`), so calling this between training steps, however
    often, recompiles nothing and brings no code nearer its ``recompile_limit``; and the capture leaves no
    trace on the model (:func:`pamm_fx.sideeffects.preserved`: its Python attributes, counters and dict
    caches, buffers such as BatchNorm's statistics, and the random generators are as they were).
    ``model`` may be the module or what ``torch.compile`` returned for it. Hugging Face models:
    ``explain(model, model_kwargs=tokenizer(text, return_tensors="pt"))``.
    """
    check_option_names(options, prefix="explain(): ",
                       suffix=". Pass the model's own keyword arguments as model_kwargs={...}.")
    config = resolve(options)
    collector = _Collector()
    counters = _compat.dynamo_counters()
    seen = {key: collections.Counter(counters[key]) for key in ("graph_break", "unimplemented")}
    captured = capture(model, example_inputs, config, collector, model_kwargs)
    breaks = [_graph_break(r) for r in captured.break_reasons]
    graphs = collector.finish(bool(breaks))
    notes = [f"the forward modified {name} in place; explain() could not restore it" for name in captured.touched]
    notes += [f"explain() changed Dynamo's cache entries on {where}, which torch cannot undo one by one"
              for where in captured.caches_changed]
    if not graphs:
        notes.append(_nothing_captured(seen))
    if missed := _linears_not_captured(model, captured.graph_inputs):
        notes.append(f"{short_names(missed)}: no captured graph reads these linear weights (Dynamo skipped their "
                     "frame or ran it outside its graphs, e.g. a checkpoint wrapper it cannot trace); they run "
                     "eagerly and stay exact, as under plain torch.compile")
    opts = config.options()
    opts["ratio"] = str(config.ratio_fraction)
    opts["eps"] = str(opts["eps"])
    if not isinstance(config.estimator, str):
        opts["estimator"] = dict(config.estimator)  # the per-site form, as JSON keeps it
    return ExplainReport(options=opts, graphs=graphs, graph_breaks=breaks, notes=notes)


def _linears_not_captured(model: Any, graph_inputs: set[int]) -> list[str]:
    """Trainable ``nn.Linear`` weights of ``model`` that no captured graph reads (found by identity,
    since a nested frame names its parameters relative to its own module)."""
    return [f"{prefix}.{name}" if prefix else name
            for root in modules_of(model) for prefix, module in root.named_modules()
            if isinstance(module, torch.nn.Linear)
            for name, p in module.named_parameters(recurse=False)
            if name == "weight" and p.requires_grad and id(p) not in graph_inputs]


def _nothing_captured(before: dict[str, collections.Counter]) -> str:
    """Why Dynamo captured no graph, in its own words (its graph-break and unimplemented counters)."""
    reasons = []
    for key, old in before.items():
        new = _compat.dynamo_counters()[key] - old
        reasons += [str(text).strip().splitlines()[0] + (f" ({text.strip().splitlines()[1].strip()})"
                                                         if len(str(text).strip().splitlines()) > 1 else "")
                    for text in new]
    if reasons:
        return "Dynamo captured no graph: " + "; ".join(dict.fromkeys(reasons))
    return ("Dynamo captured no graph: the call ran no tensor operation it could trace (no tensor input, "
            "or only Python-level work); nothing would be compiled, so nothing is rewritten")
