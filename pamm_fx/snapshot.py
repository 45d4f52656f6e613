"""Pinning a plan: expected files, golden accept, and sentences saying how two plans differ.

``check_plan(report, "plan.json")`` compares a report's :meth:`~pamm_fx.report.ExplainReport.plan` with the
one stored in the file, or stores it under ``PAMM_ACCEPT=1`` (or expecttest's ``EXPECTTEST_ACCEPT=1``), like
``assertExpectedInline``; :func:`diff_plans` turns two plans into the sentences a failing check prints. The
test helpers (:mod:`pamm_fx.testing`) and the CLI use the same functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pamm_fx.report import ExplainReport

__all__ = ["ACCEPT_ENV", "accept_enabled", "check_plan", "diff_plans", "missing_groups", "plan_text", "short_names",
           "why_left_exact"]

#: Setting this (or expecttest's ``EXPECTTEST_ACCEPT``) to 1 rewrites expected plans instead of failing.
ACCEPT_ENV = "PAMM_ACCEPT"


def accept_enabled() -> bool:
    """Whether expected files should be rewritten (``PAMM_ACCEPT=1`` or ``EXPECTTEST_ACCEPT=1``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in (ACCEPT_ENV, "EXPECTTEST_ACCEPT"))


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



def missing_groups(groups: Mapping[str, Sequence[str]], others: Container[str],
                   reasons: dict[str, str]) -> list[tuple[str, Sequence[str], str]]:
    """(key, weights, why they are left exact) for each group of ``groups`` (key -> its weights) whose key is
    not among ``others``: the groups that appeared or disappeared, as a plan diff and the test helpers say."""
    return [(key, weights, why_left_exact(weights, reasons)) for key, weights in groups.items() if key not in others]


def _group_changes(groups: dict, others: dict, reasons: dict[str, str], verb: str, tail: str) -> list[str]:
    """One line per group of ``groups`` missing from ``others``, with why its weights are (or were) exact."""
    weights = {key: [p.weight for p in g.projections] for key, g in groups.items()}
    return [f"group {verb}: {short_names(ws)} (X {groups[key].x_type})" + (f"; {tail}: {why}" if why else "")
            for key, ws, why in missing_groups(weights, others, reasons)]


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


def plan_text(report: ExplainReport) -> str:
    """A plan as a test failure prints it: the groups, each linear left exact with its category and reason,
    the graph breaks."""
    lines = [f"groups ({len(report.groups)}):"]
    lines += [f"  [{g.key}] X {g.x_type}" for g in report.groups]
    lines.append(f"left exact ({len(report.skipped)}):")
    lines += [f"  {s.weight}: [{s.category}] {s.reason}" for s in report.skipped]
    lines += [f"graph break: {b.reason} ({b.location})" for b in report.graph_breaks]
    return "\n".join(lines)
