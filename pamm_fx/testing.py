"""Helpers to see and pin what the backend did to a graph (tests, CI checks).

``capture_rewrites()`` records every graph the ``pamm`` backend compiles while it
is active; ``describe(record)`` prints one as stable, readable text (parameter
names as the user knows them, shapes, which parameters went into which group),
the form the golden-graph tests compare with ``assertExpectedInline``.

For users' CI: ``assert_rewrites(model, *inputs, groups=24, skipped=0)`` checks the
plan :func:`pamm_fx.explain` reports, and ``assert_plan_snapshot(model, *inputs,
expected="plan.json")`` pins the whole plan in a JSON file that ``PAMM_ACCEPT=1``
(or expecttest's ``EXPECTTEST_ACCEPT=1``) rewrites. Both failures say which group
appeared or disappeared and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from torch import fx

from pamm_fx import compiler as _backend
from pamm_fx.capture import capture
from pamm_fx.config import resolve
from pamm_fx.explain import explain
from pamm_fx.fxutil import val
from pamm_fx.names import fmt_value, param_name
from pamm_fx.ops.compress import parse as parse_compress
from pamm_fx.ops.linear_group import parse as parse_linear_group
from pamm_fx.ops.lowbit import Quantize
from pamm_fx.ops.lowbit import parse as parse_lowbit
from pamm_fx.plan import Plan, apply
from pamm_fx.report import ExplainReport
from pamm_fx.snapshot import ACCEPT_ENV, check_plan, missing_groups, plan_text, short_names

__all__ = [
    "RewriteRecord",
    "assert_plan_snapshot",
    "assert_rewrites",
    "canonical_names",
    "capture_rewrites",
    "describe",
    "describe_rewrites",
    "fmt_value",
    "param_name",
]



@dataclasses.dataclass
class RewriteRecord:
    """One graph the backend saw: its :class:`~pamm_fx.plan.Plan` and the rewritten copy (or None)."""

    plan: Plan
    rewritten: fx.GraphModule | None
    #: :func:`describe` text, taken when the graph was seen: Dynamo drops the
    #: placeholders' source metadata (parameter names) once compilation is over.
    summary: str = ""

    @property
    def original(self) -> fx.GraphModule:
        """The graph as Dynamo captured it."""
        return self.plan.original


@contextlib.contextmanager
def capture_rewrites() -> Iterator[list[RewriteRecord]]:
    """Collect a :class:`RewriteRecord` for every graph compiled by the backend inside the block."""
    records: list[RewriteRecord] = []

    def observe(p: Plan, new: fx.GraphModule | None) -> None:
        record = RewriteRecord(p, new)
        record.summary = _describe(record)
        records.append(record)

    _backend.add_observer(observe)
    try:
        yield records
    finally:
        _backend.remove_observer(observe)


def canonical_names(graph: fx.Graph) -> dict[fx.Node, str]:
    """Node names that do not depend on how a torch release numbers them: each name's numeric suffix
    is dropped and the nodes sharing the rest are numbered again in graph order (``view``,
    ``view_1``, ...), so a release that calls the second view ``view_3`` prints the same text."""
    seen: dict[str, int] = {}
    names = {}
    for node in graph.nodes:
        base = re.sub(r"_\d+$", "", node.name)
        i = seen[base] = seen.get(base, -1) + 1
        names[node] = f"{base}_{i}" if i else base
    return names


def _arg(node: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(node, fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return f"{param_name(node)}: {fmt_value(val(node))}"
        return f"{names[node]}: {fmt_value(val(node))}"
    return repr(node)


def describe(record: RewriteRecord) -> str:
    """Readable text of one rewrite: each pamm op in graph order, then each linear left alone and why."""
    return record.summary or _describe(record)


def _describe(record: RewriteRecord) -> str:
    lines: list[str] = []
    graph = record.rewritten.graph if record.rewritten is not None else fx.Graph()
    names = canonical_names(graph)
    for node in graph.nodes:
        if (comp := parse_compress(node)) is not None:
            gens = comp.generators
            lines.append(
                f"compress({_arg(comp.x.args[0], names)}, ratio={gens.ratio.numerator}/{gens.ratio.denominator}, "
                f"min_generators={gens.min_generators}, eps={comp.eps}) -> {fmt_value(val(node))}"
            )
        elif isinstance(quant := parse_lowbit(node), Quantize):
            base = "" if quant.c is not None else ", no base"
            lines.append(f"quantize({_arg(quant.x.args[0], names)}, bits={quant.bits}{base}) -> "
                         f"{fmt_value(val(node))}")
        elif (group := parse_linear_group(node)) is not None:
            residual = f", residual={group.quantized.bits} bits" if group.quantized is not None else ""
            residual = residual if group.c is not None else f", X at {group.quantized.bits} bits"
            lines.append(f"linear_group({_arg(group.x, names)}{residual})")
            outs = sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
            for w, b, out in zip(group.weights, group.biases, outs):
                bias = f" + {param_name(b)}" if b is not None else ""
                users = ", ".join(sorted(names[u] for u in out.users))
                lines.append(f"  {param_name(w)}{bias} -> {fmt_value(val(out))} -> {users}")
    for rej in record.plan.rejections:
        lines.append(f"untouched {rej.weight_name}: {rej.reason}")
    return "\n".join(lines)


def describe_rewrites(model: Any, *inputs: Any, **options: Any) -> str:
    """:func:`describe` text of every graph Dynamo captures from ``model(*inputs)``, joined by ``---``.

    Runs the backend's :func:`~pamm_fx.plan.plan` and :func:`~pamm_fx.plan.apply` (through
    :func:`pamm_fx.capture.capture`, with the config :func:`~pamm_fx.config.resolve` gives the
    backend: ``PAMM_*`` variables and ``config.defaults`` count) but neither Inductor nor the
    rewritten graph, so a golden test of a layout costs one Dynamo trace.
    """
    texts: list[str] = []
    capture(model, inputs, resolve(options), lambda p, gm: texts.append(_describe(RewriteRecord(p, apply(p)))))
    return "\n---\n".join(texts)


def assert_rewrites(
    model: Any,
    *inputs: Any,
    groups: int | Sequence[Sequence[str]] | None = None,
    skipped: int | None = None,
    graph_breaks: int | None = None,
    **options: Any,
) -> ExplainReport:
    """Assert what the backend will rewrite in ``model(*inputs)`` (with ``options``); return the report.

    ``groups`` is a count, or the groups themselves as lists of weight names (which
    then names the groups that appeared or disappeared, with the reason for each).
    """
    report = explain(model, *inputs, **options)
    problems: list[str] = []
    if isinstance(groups, int):
        if len(report.groups) != groups:
            problems.append(f"expected {groups} group(s), got {len(report.groups)}")
    elif groups is not None:
        want = {", ".join(g): list(g) for g in sorted(groups, key=", ".join)}
        have = {g.key: [p.weight for p in g.projections] for g in sorted(report.groups, key=lambda g: g.key)}
        reasons = {s.weight: s.reason for s in report.skipped}
        for _, weights, why in missing_groups(want, have, reasons):
            problems.append(f"group disappeared: {short_names(weights)}" + (f" (left exact: {why})" if why else ""))
        problems += [f"group appeared: {short_names(weights)}" for _, weights, _ in missing_groups(have, want, {})]
    if skipped is not None and len(report.skipped) != skipped:
        problems.append(f"expected {skipped} linear(s) left exact, got {len(report.skipped)}")
    if graph_breaks is not None and len(report.graph_breaks) != graph_breaks:
        problems.append(f"expected {graph_breaks} graph break(s), got {len(report.graph_breaks)}")
    if problems:
        raise AssertionError("pamm rewrite plan differs:\n  " + "\n  ".join(problems) + "\n" + plan_text(report))
    return report


def assert_plan_snapshot(
    model: Any, *inputs: Any, expected: str | os.PathLike[str], **options: Any
) -> ExplainReport:
    """Compare the rewrite plan with the JSON file ``expected``; ``PAMM_ACCEPT=1`` rewrites the file."""
    report = explain(model, *inputs, **options)
    changes = check_plan(report, expected)
    if changes:
        raise AssertionError(
            f"pamm rewrite plan differs from {os.fspath(expected)} (rerun with {ACCEPT_ENV}=1 to accept):\n  "
            + "\n  ".join(changes)
        )
    return report
