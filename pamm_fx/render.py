"""Reports as text, graph diffs and Graphviz DOT: how :class:`~pamm_fx.report.ExplainReport` prints.

Everything here reads a report's data (a report read back from JSON prints the same) or, for the DOT
clusters a report keeps, the planned FX graph; it imports no report class, so :mod:`pamm_fx.report` can
print itself through it.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pamm_fx import estimators
from pamm_fx.fxutil import is_linear, val
from pamm_fx.names import fmt_value, param_name
from pamm_fx.passes.match import Group

__all__ = ["code", "dot", "dot_clusters", "graph_text", "mib", "text"]


def text(report: Any) -> str:
    """A report as ``print(report)`` shows it: counts, options, then each graph's groups, skips and saved
    tensors, then the graph breaks and notes."""
    lines = [f"pamm explain: {len(report.graphs)} graph(s), {len(report.graph_breaks)} graph break(s), "
             f"{len(report.groups)} group(s) rewritten, {len(report.skipped)} linear(s) left exact",
             "options: " + ", ".join(f"{k}={v}" for k, v in report.options.items())]
    for g in report.graphs:
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
        lines.extend(_saved_lines(g.saved, report.options))
    if report.graph_breaks:
        lines.append("\ngraph breaks:")
        lines.extend(f"  {i}. {b.reason}  ({b.location})" for i, b in enumerate(report.graph_breaks, 1))
    lines.extend(f"\nnote: {n}" for n in report.notes)
    return "\n".join(lines)


def _saved_lines(saved: Sequence[Any], options: dict[str, Any]) -> list[str]:
    """A graph's saved tensors (its :class:`~pamm_fx.report.SavedInfo` s) under ``saved``, one line each."""
    if not saved:
        return []
    before, after = sum(t.bytes_before for t in saved), sum(t.bytes_after for t in saved)
    n = sum(t.compressed for t in saved)
    what = "dX approximate (unbiased)" if options.get("saved") == "all" else "weight gradients only, dX exact"
    lines = [f"  saved for backward (saved={options.get('saved')!r}, {options.get('saved_bits')} bits; {what}): "
             f"{n} of {len(saved)} tensors compressed, {mib(before)} -> {mib(after)}"]
    width = max(len(t.name) for t in saved)
    for t in saved:
        size = f"{mib(t.bytes_before)} -> {mib(t.bytes_after)}" if t.compressed else mib(t.bytes_before)
        via = f" (of {t.root})" if t.compressed and t.root and t.root != t.name else ""
        state = "compressed" + via if t.compressed else f"kept: {t.why}"
        lines.append(f"    {t.name:<{width}}  {t.dtype} {t.shape}  {size}  {state}")
    return lines


def mib(n: int) -> str:
    """Bytes as KiB or MiB, as reports print them."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _group_lines(i: int, g: Any) -> list[str]:
    """One group (a :class:`~pamm_fx.report.GroupInfo`): X, its estimator and k, the projections, bytes, FLOPs."""
    ratio = g.saved_bytes_before / max(g.saved_bytes_after, 1)
    speed = g.wgrad_flops_before / max(g.wgrad_flops_after, 1)
    how = estimators.settings(g.estimator, g.bits, g.ratio)
    lines = [f"  group {i} ({g.site}): X={g.x} {g.x_type}  b={g.b} n={g.n}  {how}  {g.k_formula}"]
    width = max(len(p.weight) for p in g.projections)
    for p in g.projections:
        bias = f" + {p.bias}" if p.bias else ""
        lines.append(f"    {p.weight:<{width}}  out={p.out_features}{bias}")
    lines.append(f"    saved for backward: {mib(g.saved_bytes_before)} -> {mib(g.saved_bytes_after)} ({ratio:.1f}x)")
    lines.append(f"    weight-grad FLOPs:  {g.wgrad_flops_before:,} -> {g.wgrad_flops_after:,} ({speed:.1f}x)")
    lines.extend(f"    note: {n}" for n in g.notes)
    return lines


def graph_text(graphs: Sequence[Any], mode: str = "diff") -> str:
    """Each graph's code ``before``/``after`` the rewrite, as a unified ``diff``, or ``side`` by side."""
    if mode not in ("before", "after", "diff", "side"):
        raise ValueError(f"graph text mode must be before, after, diff or side, got {mode!r}")
    out = []
    for g in graphs:
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


def dot(graphs: Sequence[Any]) -> str:
    """One Graphviz digraph; each group is a cluster with its X, projections and their neighbours."""
    body = "".join(g.dot for g in graphs)
    return "digraph pamm {\n  rankdir=TB;\n  node [shape=box, fontname=monospace, fontsize=10];\n" + body + "}\n"


def _dot_id(graph_index: int, node: fx.Node) -> str:
    return json.dumps(f"g{graph_index}.{node.name}")


def _neighbourhood(centre: set[fx.Node], radius: int) -> set[fx.Node]:
    """Nodes within ``radius`` data-flow hops of ``centre``, in either direction."""
    keep, frontier = set(centre), set(centre)
    for _ in range(radius):
        frontier = {n for node in frontier for n in (*node.all_input_nodes, *node.users)} - keep
        keep |= frontier
    return keep


def dot_clusters(graph_index: int, groups: Sequence[Group], radius: int = 2) -> str:
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


def code(gm: fx.GraphModule) -> str:
    """A graph module's code as a report keeps it."""
    return gm.code.strip() + "\n"
