"""explain(): one report per skip category, JSON round-trip, plan diffs, testing helpers, logs, counters.

Each explain() is a Dynamo capture without Inductor (about a second on a tiny model);
reports are built once per module and shared.
"""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pamm_fx
from pamm_fx import compiler, logs
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.explain import ExplainReport, check_plan, diff_plans
from pamm_fx.testing import assert_plan_snapshot, assert_rewrites

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def tiny_llama(frozen_v: bool = False) -> tuple[Llama, torch.Tensor]:
    torch.manual_seed(0)
    model = Llama(TINY)
    if frozen_v:
        model.layers[0].self_attn.v_proj.weight.requires_grad_(False)
    return model, torch.randint(0, TINY.vocab_size, (2, 64))


class Attention(nn.Module):
    """Separate q/k/v; optionally a graph break between q and k/v, or everything under autocast."""

    def __init__(self, dim: int = 32, graph_break: bool = False, autocast: bool = False) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.graph_break, self.autocast = graph_break, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, dim = x.shape
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            h = self.norm(x)
            q = self.q_proj(h)
            if self.graph_break:
                torch._dynamo.graph_break()
            k, v = self.k_proj(h), self.v_proj(h)
            q, k, v = (t.view(bsz, seq, 4, dim // 4).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + self.o_proj(out.transpose(1, 2).reshape(bsz, seq, dim))


X = torch.randn(2, 16, 32)


@pytest.fixture(scope="module")
def frozen() -> ExplainReport:
    model, tokens = tiny_llama(frozen_v=True)
    return pamm_fx.explain(model, tokens, min_tokens=1, min_generators=16)


@pytest.fixture(scope="module")
def split() -> ExplainReport:
    return pamm_fx.explain(Attention(graph_break=True), X, min_tokens=1, min_generators=16)


def _skips(report: ExplainReport) -> dict[str, str]:
    return {s.weight: s.category for s in report.skipped}


def test_group_has_user_names_k_bytes_and_flops(frozen: ExplainReport) -> None:
    (g,) = frozen.groups
    assert g.key == "layers.0.self_attn.q_proj.weight, layers.0.self_attn.k_proj.weight"
    assert (g.x_type, g.b, g.n, g.k, g.ratio) == ("f32[2, 64, 32]", 128, 32, 16, "1/64")
    assert g.k_formula == "k = min(b, max(16, ceil(b*1/64))) = 16"
    assert g.saved_bytes_before == 128 * 32 * 4
    assert g.saved_bytes_after == 16 * 32 * 4 + 128 * 8
    assert g.wgrad_flops_before == 2 * 128 * 32 * (32 + 16)
    assert g.wgrad_flops_after < g.wgrad_flops_before


def test_skip_frozen_and_no_attention(frozen: ExplainReport) -> None:
    skips = _skips(frozen)
    assert skips["layers.0.self_attn.v_proj.weight"] == "frozen"
    for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight", "lm_head.weight"):
        assert skips[name] == "no_attention"


def test_skip_below_min_tokens() -> None:
    report = pamm_fx.explain(Attention(), X, min_tokens=64)
    assert report.groups == []
    skips = _skips(report)
    assert skips["q_proj.weight"] == "min_tokens"
    assert "X has 32 rows, below min_tokens=64" in str(report)


def test_autocast_group_is_planned_in_the_compute_dtype() -> None:
    report = pamm_fx.explain(Attention(autocast=True), X, min_tokens=1, min_generators=16)
    assert [g.key for g in report.groups] == ["q_proj.weight, k_proj.weight, v_proj.weight"]
    assert report.groups[0].saved_bytes_before == 2 * 16 * 32 * 2  # X is saved in bf16 under autocast
    assert _skips(report) == {"o_proj.weight": "no_attention"}


def test_skip_graph_break_splits_group(split: ExplainReport) -> None:
    assert len(split.graphs) == 2
    assert [b.reason for b in split.graph_breaks] == ["Call to `torch._dynamo.graph_break()`"]
    assert "test_explain.py" in split.graph_breaks[0].location
    assert _skips(split)["q_proj.weight"] == "graph_break"
    # k/v after the break read X as a graph input; they form a group (or the rewrite reports failing).
    after = {p.weight for g in split.groups for p in g.projections} | {
        s.weight for s in split.skipped if s.category == "rewrite_failed"
    }
    assert after == {"k_proj.weight", "v_proj.weight"}


def test_str_is_a_table(frozen: ExplainReport) -> None:
    text = str(frozen)
    assert text.splitlines()[0] == (
        "pamm explain: 1 graph(s), 0 graph break(s), 1 group(s) rewritten, 6 linear(s) left exact"
    )
    assert "    layers.0.self_attn.q_proj.weight  out=32" in text
    assert "saved for backward: 16.0 KiB -> 3.0 KiB (5.3x)" in text
    assert "layers.0.self_attn.v_proj.weight  [frozen] frozen weight" in text


def test_json_round_trip(frozen: ExplainReport, split: ExplainReport) -> None:
    for report in (frozen, split):
        back = ExplainReport.from_json(report.to_json())
        assert back == report
        assert str(back) == str(report)
        slim = ExplainReport.from_json(report.to_json(graphs=False))
        assert slim.plan() == report.plan()
    assert json.loads(frozen.to_json())["format"] == 1


def test_graph_text_and_dot(frozen: ExplainReport) -> None:
    diff = frozen.graph_text("diff")
    assert "+++ after" in diff and "torch.ops.pamm.linear_group.default" in diff
    assert "pamm" not in frozen.graph_text("before").replace("pamm_fx", "")
    assert " | " in frozen.graph_text("side")
    dot = frozen.to_dot()
    assert dot.startswith("digraph pamm {") and "cluster_g0_0" in dot
    assert '"linear layers.0.self_attn.q_proj.weight\\nf32[2, 64, 32]"' in dot
    with pytest.raises(ValueError, match="before, after, diff or side"):
        frozen.graph_text("sideways")


def test_diff_plans_names_what_changed(frozen: ExplainReport) -> None:
    model, tokens = tiny_llama()
    unfrozen = pamm_fx.explain(model, tokens, min_tokens=1, min_generators=16)
    assert diff_plans(frozen, frozen) == []
    changes = diff_plans(frozen, unfrozen)
    assert changes == [
        "group disappeared: layers.0.self_attn.{q_proj,k_proj}.weight (X f32[2, 64, 32])",
        "group appeared: layers.0.self_attn.{q_proj,k_proj,v_proj}.weight (X f32[2, 64, 32]); was left exact: "
        "layers.0.self_attn.v_proj.weight: frozen weight: no weight gradient, so X is not saved for it",
    ]
    assert diff_plans(unfrozen, frozen)[0] == (
        "group disappeared: layers.0.self_attn.{q_proj,k_proj,v_proj}.weight (X f32[2, 64, 32]); now left exact: "
        "layers.0.self_attn.v_proj.weight: frozen weight: no weight gradient, so X is not saved for it"
    )


def test_check_plan_and_accept(frozen: ExplainReport, tmp_path, monkeypatch) -> None:
    path = tmp_path / "plan.json"
    monkeypatch.delenv("PAMM_ACCEPT", raising=False)
    monkeypatch.delenv("EXPECTTEST_ACCEPT", raising=False)
    assert "does not exist" in check_plan(frozen, path)[0]
    monkeypatch.setenv("PAMM_ACCEPT", "1")
    assert check_plan(frozen, path) == [] and path.exists()
    assert '"before"' not in path.read_text()
    monkeypatch.delenv("PAMM_ACCEPT")
    assert check_plan(frozen, path) == []
    changed = ExplainReport.from_json(frozen.to_json())
    changed.graphs[0].groups[0].k = 8
    assert check_plan(changed, path) == ["group layers.0.self_attn.{q_proj,k_proj}.weight: k 16 -> 8"]


def test_assert_rewrites_messages() -> None:
    model, tokens = tiny_llama(frozen_v=True)
    qkv = [f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    with pytest.raises(AssertionError) as info:
        assert_rewrites(model, tokens, groups=[qkv], skipped=6, min_tokens=1, min_generators=16)
    msg = str(info.value)
    assert ("group disappeared: layers.0.self_attn.{q_proj,k_proj,v_proj}.weight "
            "(left exact: layers.0.self_attn.v_proj.weight: frozen") in msg
    assert "group appeared: layers.0.self_attn.{q_proj,k_proj}.weight\n" in msg
    report = assert_rewrites(model, tokens, groups=1, skipped=6, graph_breaks=0, min_tokens=1, min_generators=16)
    with pytest.raises(AssertionError, match="expected 2 group"):
        assert_rewrites(model, tokens, groups=2, min_tokens=1, min_generators=16)
    assert report.groups[0].k == 16


def test_assert_plan_snapshot(tmp_path, monkeypatch) -> None:
    model, tokens = tiny_llama()
    path = tmp_path / "expected.json"
    monkeypatch.setenv("EXPECTTEST_ACCEPT", "1")
    assert_plan_snapshot(model, tokens, expected=path, min_tokens=1, min_generators=16)
    monkeypatch.delenv("EXPECTTEST_ACCEPT")
    monkeypatch.delenv("PAMM_ACCEPT", raising=False)
    assert_plan_snapshot(model, tokens, expected=path, min_tokens=1, min_generators=16)
    with pytest.raises(AssertionError, match=r"option min_tokens: 1 -> 1000\n  group disappeared"):
        assert_plan_snapshot(model, tokens, expected=path, min_tokens=1000)


def test_logs_registered_and_graph_artifacts(monkeypatch) -> None:
    from torch._logging import _internal

    assert _internal.log_registry.is_log("pamm") and _internal.log_registry.is_artifact("pamm_graphs")
    structured = []
    monkeypatch.setattr(torch._logging, "trace_structured", lambda name, metadata_fn, payload_fn: structured.append(
        (name, metadata_fn()["name"], payload_fn())))
    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs.graph_log.addHandler(handler)
    old = logs.graph_log.level
    logs.graph_log.setLevel(logging.DEBUG)
    try:
        logs.log_graphs(gm, gm)
    finally:
        logs.graph_log.setLevel(old)
        logs.graph_log.removeHandler(handler)
    assert [s[1] for s in structured] == ["pamm_before_graph", "pamm_after_graph"]
    assert "torch._C._nn.linear" in structured[0][2]
    assert [r.getMessage().splitlines()[0] for r in records] == [
        "pamm graph before rewrite:", "pamm graph after rewrite:"
    ]


def test_counters_per_compile() -> None:
    """One real compile (Inductor): the always-on totals and the per-compile view agree."""
    model, tokens = tiny_llama()
    torch._dynamo.reset()
    before = dict(compiler.counters)
    torch.compile(model, backend="pamm", options={"min_tokens": 1, "min_generators": 16})(tokens).sum().backward()
    torch._dynamo.reset()
    assert compiler.counters_by_compile[-1] == {
        "compile_id": "0/0", "groups_rewritten": 1, "linears_skipped": 5, "fallbacks": 0
    }
    assert compiler.counters["groups_rewritten"] - before["groups_rewritten"] == 1
    assert compiler.counters["graphs"] - before["graphs"] == 1


@pytest.mark.parametrize(
    ("env", "level", "graphs"),
    [
        ({"PAMM_LOGS": "+pamm"}, logging.DEBUG, True),
        ({"PAMM_LOGS": "pamm", "TORCH_LOGS": "dynamo"}, logging.INFO, False),
        ({"PAMM_LOGS": "pamm_graphs"}, logging.NOTSET, True),
    ],
)
def test_pamm_logs_env(env: dict[str, str], level: int, graphs: bool) -> None:
    """PAMM_LOGS enables our loggers at import, next to (not instead of) TORCH_LOGS."""
    import os
    import subprocess
    import sys

    code = ("import logging, pamm_fx.logs as l; d = logging.getLogger('torch._dynamo').level; "
            "print(logging.getLogger('pamm_fx').level, l.graph_log.isEnabledFor(logging.DEBUG), d)")
    base = {k: v for k, v in os.environ.items() if k not in ("PAMM_LOGS", "TORCH_LOGS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    pamm_level, enabled, dynamo_level = out.stdout.split()
    assert (int(pamm_level), enabled == "True") == (level, graphs)
    if "TORCH_LOGS" in env:
        assert int(dynamo_level) == logging.INFO
