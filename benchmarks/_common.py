"""Shared helpers of the benchmarks: machine description, result files, markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def machine() -> dict[str, Any]:
    """What produced a number: host CPU count, threads, torch and Python versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically (a cut-off run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(p20, median, p80) of ``values``."""
    xs = sorted(values)
    pick = lambda q: xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]  # noqa: E731
    return pick(0.2), statistics.median(xs), pick(0.8)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_resumable(labels: Sequence[str], out: Path, run: Callable[[str], dict[str, Any]],
                  summary: Callable[[dict[str, Any]], str], force: bool = False) -> None:
    """Run each label not yet in ``out`` (one JSON per label), so a cut-off run loses at most one label."""
    for i, label in enumerate(labels):
        path = out / (label.replace("/", "_") + ".json")
        if path.exists() and not force:
            print(f"[{i + 1}/{len(labels)}] {label}: done already ({path.name})")
            continue
        print(f"[{i + 1}/{len(labels)}] {label}", flush=True)
        result = run(label)
        write_json(path, result)
        print(f"  {label}: {summary(result)}", flush=True)


def parse_common_args(parser: Any, out: Path) -> Any:
    """Add the options every benchmark takes (output folder, threads, report-only), parse, apply --threads."""
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
