"""The demo a newcomer runs first: four models side by side, with the k each pamm variant used."""

from __future__ import annotations

import re

import pytest

from pamm_fx.demo.__main__ import main


def test_demo_prints_plain_pamm_and_both_with_budget_side_by_side(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAMM_MIN_GENERATORS", "16")  # b = 256 rows: k = 16 instead of the exact k = b
    assert main(["--steps", "3", "--dim", "32", "--layers", "1", "--batch", "2", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith(" ") and "plain torch.compile" in line)
    assert "pamm (targets=" in header and "plain + budget 0.5" in header and "pamm + budget 0.5" in header
    ks = next(line for line in out.splitlines() if line.startswith("generators k"))
    assert ks.count("k=16 x ") == 2, ks  # both pamm variants compress, with k = 16 read from the plan
    saved = next(line for line in out.splitlines() if line.startswith("saved for backward"))
    assert saved.count("(-") == 3, saved  # both pamm variants and the budget alone save less than plain
    # what pamm adds to the budget alone (the sign is the run's: at this toy size it can go either way)
    assert re.search(r"^pamm \+ budget 0\.5 against plain \+ budget 0\.5: saved for backward [+-]\d", out, re.M), out
