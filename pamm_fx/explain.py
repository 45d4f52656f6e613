"""See, before training, what the ``pamm`` backend will do to a model and why.

``explain(model, *inputs, **options)`` runs Dynamo capture once with a backend that
applies our own normalize and match passes (and the rewrite, for the "after" graph)
but no Inductor and no backward, so it takes about as long as one eager forward plus
tracing. The report names every group and every linear left alone, in the
parameter names the user knows, and estimates what the rewrite saves::

    graph 0  (compile 0/0)
      group 0  X=norm f32[2, 64, 32]  b=128 n=32  ratio 1/64  k=16
        ...

``report.plan()`` is the part worth pinning in CI (groups, skips, graph breaks),
without graph text that changes with the torch version; ``diff_plans`` turns two
plans into the sentences a failing check prints.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat, estimators, seed
from pamm_fx.capture import capture
from pamm_fx.compiler import saved_partitioner
from pamm_fx.config import DEFAULT_ESTIMATOR, OPTIONS, resolve
from pamm_fx.fxutil import is_linear, val
from pamm_fx.names import fmt_value, param_name
from pamm_fx.passes.categories import GRAPH_BREAK, REWRITE_FAILED, Rejection
from pamm_fx.passes.checks import NO_ATTENTION
from pamm_fx.passes.match import Group
from pamm_fx.plan import Plan, apply
from pamm_fx.saved import partition_choices
from pamm_fx.sideeffects import modules_of

__all__ = [
    "ACCEPT_ENV",
    "ExplainReport",
    "GraphBreak",
    "GraphReport",
    "GroupInfo",
    "ProjectionInfo",
    "SkipInfo",
    "check_plan",
    "diff_plans",
    "explain",
    "short_names",
    "why_left_exact",
]

#: Setting this (or expecttest's ``EXPECTTEST_ACCEPT``) to 1 rewrites expected plans instead of failing.
ACCEPT_ENV = "PAMM_ACCEPT"
_FORMAT_VERSION = 1


def accept_enabled() -> bool:
    """Whether expected files should be rewritten (``PAMM_ACCEPT=1`` or ``EXPECTTEST_ACCEPT=1``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in (ACCEPT_ENV, "EXPECTTEST_ACCEPT"))


@dataclasses.dataclass
class ProjectionInfo:
    """One projection of a group: the parameters as the user names them."""

    weight: str
    bias: str | None
    out_features: int


@dataclasses.dataclass
class GroupInfo:
    """A group the backend rewrites, with the estimated effect on backward memory and FLOPs."""

    x: str
    x_type: str
    b: int
    n: int
    projections: list[ProjectionInfo]
    ratio: str
    k: int
    k_formula: str
    saved_bytes_before: int
    saved_bytes_after: int
    wgrad_flops_before: int
    wgrad_flops_after: int
    site: str = "qkv"
    #: The group's estimator and its payload's bits (None under ``pamm``), as the plan resolved them.
    estimator: str = DEFAULT_ESTIMATOR
    bits: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        """Identity of a group across runs: the weights in it."""
        return ", ".join(p.weight for p in self.projections)


@dataclasses.dataclass
class SkipInfo:
    """A candidate linear left exact, and why."""

    weight: str
    category: str
    reason: str


@dataclasses.dataclass
class GraphBreak:
    """Where Dynamo split the model: the first line of its reason, the user frame, and the full text."""

    reason: str
    location: str
    detail: str = ""


@dataclasses.dataclass
class SavedInfo:
    """One tensor the partitioner keeps for the backward, under ``saved`` other than "exact": kept as it is
    (and why) or compressed, with its bytes before and after (a view of a compressed tensor counts 0: its
    root's bytes are counted once)."""

    name: str
    shape: str
    dtype: str
    compressed: bool
    bytes_before: int
    bytes_after: int
    why: str
    root: str = ""


@dataclasses.dataclass
class GraphReport:
    """One graph Dynamo captured: its groups, skipped linears, the graph before/after the rewrite, and under
    ``saved`` the partitioner's saved tensors with what happens to each."""

    index: int
    compile_id: str
    groups: list[GroupInfo]
    skipped: list[SkipInfo]
    before: str = ""
    after: str = ""
    error: str = ""
    dot: str = ""
    saved: list[SavedInfo] = dataclasses.field(default_factory=list)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Dataclass from its ``asdict`` form, recursing into the known nested lists."""
    nested = {"projections": ProjectionInfo, "groups": GroupInfo, "skipped": SkipInfo, "graphs": GraphReport,
              "graph_breaks": GraphBreak}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        if key in nested and isinstance(value, list):
            value = [_from_dict(nested[key], v) for v in value]
        kwargs[key] = value
    return cls(**kwargs)


@dataclasses.dataclass
class ExplainReport:
    """What ``torch.compile(model, backend="pamm", options=...)`` will do, graph by graph."""

    options: dict[str, Any]
    graphs: list[GraphReport]
    graph_breaks: list[GraphBreak]
    torch_version: str = torch.__version__
    #: What the report cannot show in its graphs: why nothing was captured, a parameter the capture changed.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def groups(self) -> list[GroupInfo]:
        return [g for graph in self.graphs for g in graph.groups]

    @property
    def skipped(self) -> list[SkipInfo]:
        return [s for graph in self.graphs for s in graph.skipped]

    def to_dict(self, graphs: bool = True) -> dict[str, Any]:
        """Plain data; ``graphs=False`` drops the graph text (what expected files keep)."""
        data = dataclasses.asdict(self)
        data["format"] = _FORMAT_VERSION
        if not graphs:
            for g in data["graphs"]:
                g.pop("before"), g.pop("after"), g.pop("dot")
        return data

    def to_json(self, graphs: bool = True) -> str:
        return json.dumps(self.to_dict(graphs), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplainReport:
        if data.get("format", _FORMAT_VERSION) != _FORMAT_VERSION:
            raise ValueError(f"pamm explain report format {data.get('format')!r} is not {_FORMAT_VERSION}")
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> ExplainReport:
        return cls.from_dict(json.loads(text))

    def plan(self) -> dict[str, Any]:
        """The rewrite plan: what a CI check pins (no graph text, no torch version)."""
        data = self.to_dict(graphs=False)
        data.pop("torch_version")
        data.pop("format")
        for g in data["graphs"]:
            g.pop("compile_id")
        for b in data["graph_breaks"]:
            b.pop("location"), b.pop("detail")
        if not data["notes"]:
            data.pop("notes")
        return data

    def graph_text(self, mode: str = "diff") -> str:
        """Each graph's code ``before``/``after`` the rewrite, as a unified ``diff``, or ``side`` by side."""
        if mode not in ("before", "after", "diff", "side"):
            raise ValueError(f"graph text mode must be before, after, diff or side, got {mode!r}")
        out = []
        for g in self.graphs:
            after = g.after or g.before
            out.append(f"# graph {g.index} (compile {g.compile_id})" + ("" if g.after else ": not rewritten"))
            if mode == "before":
                out.append(g.before)
            elif mode == "after":
                out.append(after)
            elif mode == "diff":
                out.extend(difflib.unified_diff(
                    g.before.splitlines(), after.splitlines(), "before", "after", lineterm="", n=2))
            else:
                out.append(_side_by_side(g.before, after))
        return "\n".join(out)

    def to_dot(self) -> str:
        """One Graphviz digraph; each group is a cluster with its X, projections and their neighbours."""
        body = "".join(g.dot for g in self.graphs)
        return "digraph pamm {\n  rankdir=TB;\n  node [shape=box, fontname=monospace, fontsize=10];\n" + body + "}\n"

    def __str__(self) -> str:
        lines = [f"pamm explain: {len(self.graphs)} graph(s), {len(self.graph_breaks)} graph break(s), "
                 f"{len(self.groups)} group(s) rewritten, {len(self.skipped)} linear(s) left exact",
                 "options: " + ", ".join(f"{k}={v}" for k, v in self.options.items())]
        for g in self.graphs:
            lines.append(f"\ngraph {g.index} (compile {g.compile_id})")
            if g.error:
                lines.append(f"  rewrite failed, the backend compiles this graph unchanged ({g.error})")
            for i, grp in enumerate(g.groups):
                lines.extend(_group_lines(i, grp))
            if g.skipped:
                width = max(len(s.weight) for s in g.skipped)
                lines.append("  left exact:")
                lines.extend(f"    {s.weight:<{width}}  [{s.category}] {s.reason}" for s in g.skipped)
            if not g.groups and not g.skipped:
                lines.append("  no linear projection")
            lines.extend(_saved_lines(g.saved, self.options))
        if self.graph_breaks:
            lines.append("\ngraph breaks:")
            lines.extend(f"  {i}. {b.reason}  ({b.location})" for i, b in enumerate(self.graph_breaks, 1))
        lines.extend(f"\nnote: {n}" for n in self.notes)
        return "\n".join(lines)


def _saved_lines(saved: list[SavedInfo], options: dict[str, Any]) -> list[str]:
    if not saved:
        return []
    before, after = sum(t.bytes_before for t in saved), sum(t.bytes_after for t in saved)
    n = sum(t.compressed for t in saved)
    what = "dX approximate (unbiased)" if options.get("saved") == "all" else "weight gradients only, dX exact"
    lines = [f"  saved for backward (saved={options.get('saved')!r}, {options.get('saved_bits')} bits; {what}): "
             f"{n} of {len(saved)} tensors compressed, {_mib(before)} -> {_mib(after)}"]
    width = max(len(t.name) for t in saved)
    for t in saved:
        size = f"{_mib(t.bytes_before)} -> {_mib(t.bytes_after)}" if t.compressed else _mib(t.bytes_before)
        via = f" (of {t.root})" if t.compressed and t.root and t.root != t.name else ""
        state = "compressed" + via if t.compressed else f"kept: {t.why}"
        lines.append(f"    {t.name:<{width}}  {t.dtype} {t.shape}  {size}  {state}")
    return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _group_lines(i: int, g: GroupInfo) -> list[str]:
    ratio = g.saved_bytes_before / max(g.saved_bytes_after, 1)
    speed = g.wgrad_flops_before / max(g.wgrad_flops_after, 1)
    how = estimators.settings(g.estimator, g.bits, g.ratio)
    lines = [f"  group {i} ({g.site}): X={g.x} {g.x_type}  b={g.b} n={g.n}  {how}  {g.k_formula}"]
    width = max(len(p.weight) for p in g.projections)
    for p in g.projections:
        bias = f" + {p.bias}" if p.bias else ""
        lines.append(f"    {p.weight:<{width}}  out={p.out_features}{bias}")
    lines.append(f"    saved for backward: {_mib(g.saved_bytes_before)} -> {_mib(g.saved_bytes_after)} ({ratio:.1f}x)")
    lines.append(f"    weight-grad FLOPs:  {g.wgrad_flops_before:,} -> {g.wgrad_flops_after:,} ({speed:.1f}x)")
    lines.extend(f"    note: {n}" for n in g.notes)
    return lines


def _side_by_side(before: str, after: str, width: int = 70) -> str:
    left, right = before.splitlines(), after.splitlines()
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, left, right, autojunk=False).get_opcodes():
        mark = {"equal": " ", "replace": "|", "delete": "<", "insert": ">"}[tag]
        a, b = left[i1:i2], right[j1:j2]
        for k in range(max(len(a), len(b))):
            la = a[k] if k < len(a) else ""
            lb = b[k] if k < len(b) else ""
            la = la if len(la) <= width else la[: width - 1] + "…"
            out.append(f"{la:<{width}} {mark} {lb}")
    return "\n".join(out)


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


#: The :class:`~pamm_fx.plan.Estimate` fields a :class:`GroupInfo` reports as they are.
_ESTIMATE_FIELDS = ("b", "n", "k", "saved_bytes_before", "saved_bytes_after", "wgrad_flops_before",
                    "wgrad_flops_after")


def _group(p: Plan, g: Group) -> GroupInfo:
    est = p.estimate(g)
    ratio = g.estimator.ratio
    info = GroupInfo(
        x=g.x.name,
        x_type=fmt_value(val(g.x)),
        projections=[ProjectionInfo(q.weight_name, q.bias_name, q.out_features) for q in g.projections],
        ratio=f"{ratio.numerator}/{ratio.denominator}",
        k_formula=est.k_text,
        site=g.site,
        estimator=g.estimator.name,
        bits=g.estimator.bits,
        **{f: getattr(est, f) for f in _ESTIMATE_FIELDS},
    )
    if (note := g.estimator.note(_mib(est.lowbit_bytes))) is not None:
        info.notes.append(note)
    if est.dynamic:
        info.notes.append(f"b = {est.b_expr} changes from call to call: k is decided on every call by the op "
                          f"(numbers here are for b = {est.b})")
    if g.x.op == "placeholder":
        info.notes.append("X is an input of this graph (made before a graph break?): if an earlier graph keeps X "
                          "alive for backward, compressing it here saves nothing")
    return info


def _dot_id(graph_index: int, node: fx.Node) -> str:
    return json.dumps(f"g{graph_index}.{node.name}")


def _neighbourhood(centre: set[fx.Node], radius: int) -> set[fx.Node]:
    """Nodes within ``radius`` data-flow hops of ``centre``, in either direction."""
    keep, frontier = set(centre), set(centre)
    for _ in range(radius):
        frontier = {n for node in frontier for n in (*node.all_input_nodes, *node.users)} - keep
        keep |= frontier
    return keep


def _dot(graph_index: int, groups: Sequence[Group], radius: int = 2) -> str:
    """DOT clusters of each group's neighbourhood (``radius`` hops around X and the projections)."""
    lines = []
    for gi, g in enumerate(groups):
        proj = {p.node for p in g.projections}
        keep = _neighbourhood({g.x, *proj}, radius)
        lines.append(f"  subgraph cluster_g{graph_index}_{gi} {{\n    label=\"graph {graph_index} group {gi}\";\n")
        ordered = [n for n in g.x.graph.nodes if n in keep]
        for node in ordered:
            label = node.name
            if node.op == "placeholder":
                label = param_name(node)
            elif is_linear(node):
                w = node.args[1]
                label = f"linear {param_name(w) if isinstance(w, fx.Node) else node.name}"
            v = val(node)
            if isinstance(v, torch.Tensor):
                label += f"\n{fmt_value(v)}"
            style = ""
            if node is g.x:
                style = ', style=filled, fillcolor="#ffd27f"'
            elif node in proj:
                style = ', style=filled, fillcolor="#9fd3ff"'
            lines.append(f"    {_dot_id(graph_index, node)} [label={json.dumps(label)}{style}];\n")
        for node in ordered:
            for inp in node.all_input_nodes:
                if inp in keep:
                    lines.append(f"    {_dot_id(graph_index, inp)} -> {_dot_id(graph_index, node)};\n")
        lines.append("  }\n")
    return "".join(lines)


def _code(gm: fx.GraphModule) -> str:
    return gm.code.strip() + "\n"


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
            before=_code(gm),
            error=p.error or "",
        )
        outputs = _outputs(p.graph)
        rejections = [(r, r.node.args[0] in outputs) for r in p.rejections]
        if p.config.saved != "exact" and not p.error:
            report.saved = _saved(p)
        if p.groups:
            report.dot = _dot(report.index, p.groups)
            try:
                report.after = _code(apply(p))
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
    return [SavedInfo(c.name, str(tuple(c.shape)).replace("torch.SymInt", ""), str(c.dtype).removeprefix("torch."),
                      c.compressed, c.bytes_before, c.bytes_after, c.why, c.root) for c in choices]


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
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"explain(): unknown pamm option(s) {unknown}; valid options are {list(OPTIONS)}. "
                         "Pass the model's own keyword arguments as model_kwargs={...}.")
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


# --- comparing plans -----------------------------------------------------------------------


def _keyed(items: Iterable[Any], key: Any) -> dict[str, Any]:
    """Items by key; repeated keys (a module called twice) get ``#2``, ``#3``..."""
    out: dict[str, Any] = {}
    for item in items:
        k, i = key(item), 2
        while k in out:
            k, i = f"{key(item)}#{i}", i + 1
        out[k] = item
    return out


def short_names(names: Sequence[str]) -> str:
    """``model.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight`` for weights sharing a prefix and suffix."""
    if len(names) < 2:
        return ", ".join(names)
    split = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre + 1 and p[pre] == split[0][pre] for p in split):
        pre += 1
    post = 0
    while all(len(p) > pre + post + 1 and p[-1 - post] == split[0][-1 - post] for p in split):
        post += 1
    middles = [".".join(p[pre : len(p) - post]) for p in split]
    return ".".join([*split[0][:pre], "{" + ",".join(middles) + "}", *split[0][len(split[0]) - post :]])


def why_left_exact(weights: Sequence[str], reasons: dict[str, str]) -> str:
    """Reasons for the given weights, one clause per distinct reason, in the weights' order."""
    by_reason: dict[str, list[str]] = {}
    for w in weights:
        if w in reasons:
            by_reason.setdefault(reasons[w], []).append(w)
    return "; ".join(f"{short_names(ws)}: {reason}" for reason, ws in by_reason.items())



def _group_changes(groups: dict, others: dict, reasons: dict[str, str], verb: str, tail: str) -> list[str]:
    """One line per group of ``groups`` missing from ``others``, with why its weights are (or were) exact."""
    lines = []
    for key, g in groups.items():
        if key not in others:
            weights = [p.weight for p in g.projections]
            why = why_left_exact(weights, reasons)
            lines.append(f"group {verb}: {short_names(weights)} (X {g.x_type})" + (f"; {tail}: {why}" if why else ""))
    return lines


def diff_plans(expected: ExplainReport, actual: ExplainReport) -> list[str]:
    """Sentences saying how ``actual``'s plan differs from ``expected``'s; empty when they are the same."""
    lines: list[str] = []
    if expected.options != actual.options:
        changed = sorted(k for k in {*expected.options, *actual.options}
                         if expected.options.get(k) != actual.options.get(k))
        lines += [f"option {k}: {expected.options.get(k)!r} -> {actual.options.get(k)!r}" for k in changed]
    if len(expected.graphs) != len(actual.graphs):
        lines.append(f"graphs: {len(expected.graphs)} -> {len(actual.graphs)}")
    old_breaks = [b.reason for b in expected.graph_breaks]
    new_breaks = [b.reason for b in actual.graph_breaks]
    lines += [f"graph break disappeared: {r}" for r in old_breaks if r not in new_breaks]
    lines += [f"graph break appeared: {r} ({b.location})" for r, b in zip(new_breaks, actual.graph_breaks)
              if r not in old_breaks]

    old_g = _keyed(expected.groups, lambda g: g.key)
    new_g = _keyed(actual.groups, lambda g: g.key)
    new_skips = _keyed(actual.skipped, lambda s: s.weight)
    old_skips = _keyed(expected.skipped, lambda s: s.weight)
    new_reasons = {k: s.reason for k, s in new_skips.items()}
    old_reasons = {k: s.reason for k, s in old_skips.items()}
    lines += _group_changes(old_g, new_g, new_reasons, "disappeared", "now left exact")
    lines += _group_changes(new_g, old_g, old_reasons, "appeared", "was left exact")
    for key in [k for k in old_g if k in new_g]:
        a, b = dataclasses.asdict(old_g[key]), dataclasses.asdict(new_g[key])
        changed = [f"{f} {a[f]} -> {b[f]}" for f in ("x_type", "estimator", "bits", "ratio", "k", "saved_bytes_after",
                                                     "wgrad_flops_after", "projections") if a[f] != b[f]]
        if changed:
            lines.append(f"group {short_names([p.weight for p in new_g[key].projections])}: " + ", ".join(changed))
    grouped_now = {p.weight for g in actual.groups for p in g.projections}
    grouped_before = {p.weight for g in expected.groups for p in g.projections}
    for key, s in old_skips.items():
        if key not in new_skips and s.weight not in grouped_now:
            lines.append(f"no longer a candidate: {s.weight} (was left exact: {s.reason})")
    for key, s in new_skips.items():
        if key not in old_skips and s.weight not in grouped_before:
            lines.append(f"newly left exact: {s.weight}: {s.reason}")
        elif key in old_skips and old_skips[key].reason != s.reason:
            lines.append(f"{s.weight}: reason changed: {old_skips[key].reason!r} -> {s.reason!r}")
    if not lines and expected.plan() != actual.plan():
        lines += difflib.unified_diff(
            json.dumps(expected.plan(), indent=2, sort_keys=True).splitlines(),
            json.dumps(actual.plan(), indent=2, sort_keys=True).splitlines(),
            "expected", "actual", lineterm="",
        )
    return lines


def check_plan(report: ExplainReport, expected_path: str | os.PathLike[str]) -> list[str]:
    """Compare with the plan stored at ``expected_path``; with ``PAMM_ACCEPT=1`` store this one instead.

    Returns the differences (empty: same plan, or accepted).
    """
    path = Path(expected_path)
    if accept_enabled():
        path.write_text(report.to_json(graphs=False))
        return []
    if not path.exists():
        return [f"{path} does not exist; rerun with {ACCEPT_ENV}=1 to write it"]
    return diff_plans(ExplainReport.from_json(path.read_text()), report)
