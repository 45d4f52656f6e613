"""The demo a newcomer runs first: three models side by side, with the k each pamm variant used."""

from __future__ import annotations

import pytest

from pamm_fx.demo.__main__ import main


def test_demo_prints_plain_pamm_and_budget_side_by_side(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAMM_MIN_GENERATORS", "16")  # b = 256 rows: k = 16 instead of the exact k = b
    assert main(["--steps", "3", "--dim", "32", "--layers", "1", "--batch", "2", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith(" ") and "plain torch.compile" in line)
    assert "pamm (targets=" in header and "pamm + budget 0.5" in header
    ks = next(line for line in out.splitlines() if line.startswith("generators k"))
    assert ks.count("k=16 x ") == 2, ks  # both pamm variants compress, with k = 16 read from the plan
    saved = next(line for line in out.splitlines() if line.startswith("saved for backward"))
    assert saved.count("(-") == 2, saved  # both pamm variants save less than plain
