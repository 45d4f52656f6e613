"""The demo a newcomer runs first: plain, torch's options (budget, full checkpointing, the fp8 pass) and pamm's."""

from __future__ import annotations

import re

import pytest

from pamm_fx.demo.__main__ import RECOMMENDED, main


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
    assert table[""] == ["saved for backward", "vs plain", "vs plain + budget 0.8", "step time", "vs plain",
                         "vs plain + budget 0.8", "train loss", "validation loss"], out
    assert list(table)[1:] == ["plain", "plain + budget 0.8", "full checkpointing", "fp8 pass", "pamm (qkv)",
                               "pamm saved=all", "pamm saved=all + budget 0.8"], out
    assert f"pamm saved=all: options {RECOMMENDED}" in out
    mib = {name: float(cells[0].removesuffix(" MiB")) for name, cells in table.items() if name}

    def ratio_of(cell: str, num: str, den: str) -> bool:  # of the printed sizes, to their rounding (0.005 MiB)
        low, high = (mib[num] - 5e-3) / (mib[den] + 5e-3), (mib[num] + 5e-3) / (mib[den] - 5e-3)
        return low - 5e-4 <= float(cell.removesuffix("x")) <= high + 5e-4

    for name, cells in table.items():
        if not name:
            continue
        # each ratio is against its own baseline, and only a pamm row under a budget has a budget baseline
        assert ratio_of(cells[1], name, "plain"), (name, cells, mib)
        if name.startswith("pamm") and name.endswith("budget 0.8"):
            assert ratio_of(cells[2], name, "plain + budget 0.8"), (name, cells, mib)
            assert float(cells[5].removesuffix("x")) > 0, cells
        else:
            assert cells[2] == cells[5] == "-", cells
    assert table["plain"][1] == table["plain"][4] == "1.000x"
    # every option saves less than plain; pamm's compression adds to the budget; torch's options are exact
    assert all(mib[name] < mib["plain"] for name in mib if name != "plain"), mib
    assert mib["pamm saved=all + budget 0.8"] < mib["plain + budget 0.8"], mib
    assert mib["pamm saved=all"] < mib["plain + budget 0.8"], mib
    val = {name: cells[-1] for name, cells in table.items() if name}
    assert val["plain + budget 0.8"] == val["full checkpointing"] == val["plain"], val
    kept = next(line for line in out.splitlines() if line.startswith("what pamm compressed"))
    assert "pamm (qkv): k=16 x 1 group" in kept, kept
    counts = dict(re.findall(r"(pamm saved=all[^:]*): (\d+) of \d+ saved tensors compressed", kept))
    assert set(counts) == {"pamm saved=all", "pamm saved=all + budget 0.8"} and all(int(n) > 0 for n in counts.values()), kept
