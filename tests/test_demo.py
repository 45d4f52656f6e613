"""The demo a newcomer runs first: plain, plain + budget, pamm default, pamm all and pamm all + budget side by side."""

from __future__ import annotations

import re

import pytest

from pamm_fx.demo.__main__ import RECOMMENDED_ALL, main


def _rows(out: str) -> dict[str, list[str]]:
    """The printed table, as {model: its cells}, the header under the key ""."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(" ") and "saved for backward" in line)
    table = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        table["" if line.startswith(" ") else cells[0]] = cells if line.startswith(" ") else cells[1:]
    return table


def test_demo_compares_every_budget_row_with_plain_and_with_plain_under_the_same_budget(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAMM_MIN_GENERATORS", "16")  # b = 256 rows: k = 16 instead of the exact k = b
    assert main(["--steps", "2", "--dim", "32", "--layers", "1", "--batch", "2", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    table = _rows(out)
    assert table[""] == ["saved for backward", "vs plain", "vs plain + budget 0.5", "step time", "vs plain",
                         "vs plain + budget 0.5", "train loss", "validation loss"], out
    assert list(table)[1:] == ["plain", "plain + budget 0.5", "pamm (qkv)", "pamm all", "pamm all + budget 0.5"], out
    assert f"pamm all: options {RECOMMENDED_ALL}" in out
    mib = {name: float(cells[0].removesuffix(" MiB")) for name, cells in table.items() if name}

    def ratio_of(cell: str, num: str, den: str) -> bool:  # of the printed sizes, to their rounding (0.005 MiB)
        low, high = (mib[num] - 5e-3) / (mib[den] + 5e-3), (mib[num] + 5e-3) / (mib[den] - 5e-3)
        return low - 5e-4 <= float(cell.removesuffix("x")) <= high + 5e-4

    for name, cells in table.items():
        if not name:
            continue
        # each ratio is against its own baseline, and only a pamm row under a budget has a budget baseline
        assert ratio_of(cells[1], name, "plain"), (name, cells, mib)
        if name.startswith("pamm") and name.endswith("budget 0.5"):
            assert ratio_of(cells[2], name, "plain + budget 0.5"), (name, cells, mib)
            assert float(cells[5].removesuffix("x")) > 0, cells
        else:
            assert cells[2] == cells[5] == "-", cells
    assert table["plain"][1] == table["plain"][4] == "1.000x"
    # the default, "all" and the budget alone save less than plain, pamm adds to the budget
    assert mib["pamm (qkv)"] < mib["plain"] and mib["pamm all"] < mib["plain"], mib
    assert mib["pamm all + budget 0.5"] < mib["plain + budget 0.5"] < mib["plain"], mib
    ks = next(line for line in out.splitlines() if line.startswith("per compressed group"))
    kept = r"k=16|X at 8 bits"  # k = 16 (PAMM), or X at 8 bits (the recommended estimator 'sr'), from the plan
    groups = {m.group(1): (m.group(2), int(m.group(3))) for m in re.finditer(rf"(pamm [^:]+): ({kept}) x (\d+) group", ks)}
    assert set(groups) == {"pamm (qkv)", "pamm all", "pamm all + budget 0.5"}, ks
    assert groups["pamm (qkv)"] == ("k=16", 1), ks
    assert groups["pamm all"][0] == groups["pamm all + budget 0.5"][0] == "X at 8 bits", ks
    assert groups["pamm all"][1] > 1 and groups["pamm all + budget 0.5"][1] > 1, ks
