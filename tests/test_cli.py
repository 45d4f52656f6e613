"""The ``pamm-fx explain`` command: output forms, ``--check`` and exit codes (run in-process through main())."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pamm_fx.cli import main, parse_options

FACTORY = textwrap.dedent(
    """
    import torch
    from pamm_fx.demo.llama import Llama, LlamaConfig

    def tiny(frozen=False):
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64))
        if frozen:
            model.layers[0].self_attn.v_proj.weight.requires_grad_(False)
        return model, (torch.randint(0, 64, (2, 64)),)

    def tiny_frozen():
        return tiny(frozen=True)

    def broken():
        raise RuntimeError("factory exploded")

    def not_a_pair():
        return 3
    """
)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("factories") / "models.py"
    path.write_text(FACTORY)
    return str(path)


@pytest.fixture(autouse=True)
def no_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAMM_ACCEPT", raising=False)
    monkeypatch.delenv("EXPECTTEST_ACCEPT", raising=False)


def test_parse_options() -> None:
    assert parse_options("ratio=1/128, min_tokens=1,eps=0.5,seed=none") == {
        "ratio": "1/128", "min_tokens": 1, "eps": 0.5, "seed": None
    }
    assert parse_options("") == {}


def test_table_graph_and_dot(factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dot = tmp_path / "groups.dot"
    assert main(["explain", f"{factory}:tiny", "--options", "ratio=1/128,min_tokens=1,min_generators=16", "--graph", "diff",
                 "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pamm explain: 1 graph(s), 0 graph break(s), 1 group(s) rewritten, 5 linear(s) left exact")
    assert "ratio=1/128" in out and "+++ after" in out
    assert dot.read_text().startswith("digraph pamm {")


def test_check_fails_on_changed_plan_and_passes_on_same(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = tmp_path / "plan.json"
    args = ["explain", f"{factory}:tiny", "--options", "min_tokens=1,min_generators=16", "--check", str(expected)]
    assert main(args) == 1
    assert "rerun with PAMM_ACCEPT=1" in capsys.readouterr().err
    monkeypatch.setenv("PAMM_ACCEPT", "1")
    assert main(args) == 0
    monkeypatch.delenv("PAMM_ACCEPT")
    assert main(args) == 0
    capsys.readouterr()
    assert main(["explain", f"{factory}:tiny_frozen", "--options", "min_tokens=1,min_generators=16", "--check", str(expected)]) == 1
    err = capsys.readouterr().err
    assert "pamm rewrite plan differs from" in err
    assert ("  group disappeared: layers.0.self_attn.{q_proj,k_proj,v_proj}.weight (X f32[2, 64, 32]); now left exact: "
            "layers.0.self_attn.v_proj.weight: frozen weight") in err


def test_json_output(factory: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", f"{factory}:tiny", "--options", "min_tokens=1,min_generators=16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["weight"] for p in data["graphs"][0]["groups"][0]["projections"]] == [
        f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "no_colon"], "expected MODULE:FACTORY"),
        (["explain", "pamm_fx.does_not_exist:f"], "cannot import 'pamm_fx.does_not_exist'"),
        (["explain", "pamm_fx.demo.llama:nope"], "has no attribute 'nope'"),
        (["explain", "{factory}:broken"], "RuntimeError: factory exploded"),
        (["explain", "{factory}:not_a_pair"], "must return (model, example_inputs), got int"),
        (["explain", "{factory}:tiny", "--options", "ratio"], "key=value pairs"),
        (["explain", "{factory}:tiny", "--options", "colour=red"], "unknown pamm option(s) ['colour']"),
        (["explain", "{factory}:tiny", "--graph", "sideways"], "invalid choice"),
        ([], "required"),
    ],
)
def test_errors_exit_2(factory: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(factory=factory) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--help"]) == 0
    assert "--check EXPECTED" in capsys.readouterr().out


def test_checks_lists_every_category_once_with_its_rule(capsys: pytest.CaptureFixture[str]) -> None:
    from pamm_fx.passes.checks import GROUP_CHECKS, PROJECTION_CHECKS

    assert main(["checks"]) == 0
    out = capsys.readouterr().out
    for check in PROJECTION_CHECKS + GROUP_CHECKS:
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [check.name]]
        assert line.endswith(check.doc)


def test_checks_lists_the_categories_decided_outside_the_check_tables(capsys: pytest.CaptureFixture[str]) -> None:
    """unrecognised (the scan), graph_break and rewrite_failed (explain) are declared with the checks' ones."""
    from pamm_fx.passes.categories import CATEGORIES, GRAPH_BREAK, REWRITE_FAILED, UNRECOGNISED

    assert main(["checks"]) == 0
    out = capsys.readouterr().out
    for category in (UNRECOGNISED, GRAPH_BREAK, REWRITE_FAILED):
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [category.name]]
        assert line.endswith(category.doc)
    assert {ln.split()[0] for ln in out.splitlines() if ln.startswith("  ")} == set(CATEGORIES)
