"""Shared set-up of the benchmarks, so each script keeps only what it measures.

Models (the demo LLaMA's shapes and the size labels), compiling (plain Inductor or pamm, under a code
object of its own), timing (median of a callable, one training step), memory meters (bytes saved for
backward, process RSS), the machine description, result files and markdown tables.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pamm_fx.demo.llama import LlamaConfig
from pamm_fx.demo.measure import saved_for_backward

__all__ = [
    "DOCS", "RESULTS", "PeakRss", "compile_fresh", "compile_model", "demo_config", "machine", "markdown_table",
    "median_s", "mib", "mmap_large_blocks", "model_config", "parse_common_args", "parse_size", "read_json", "rss",
    "run_resumable", "saved_for_backward", "spread", "train_step", "write_json",
]

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = os.sysconf("SC_PAGE_SIZE")


# Models.


def demo_config(dim: int, layers: int, **overrides: Any) -> LlamaConfig:
    """The demo model's shape at ``dim`` and ``layers``: GQA 8/4 heads, SwiGLU hidden size 2.6875 x dim."""
    return LlamaConfig(**{"dim": dim, "n_layers": layers, "n_heads": 8, "n_kv_heads": 4,
                          "hidden_dim": int(dim * 2.6875), **overrides})


def parse_size(label: str) -> dict[str, Any]:
    """``d512-L2-b8192-bf16`` -> dim 512, 2 layers, 8192 tokens (batch x 512 or x 256), bfloat16;
    a ``-mha`` suffix: 8 kv heads (no GQA) and an MLP hidden size of 4 x dim."""
    d, layers, b, dt, *kind = label.split("-")
    tokens = int(b[1:])
    seq = 512 if tokens >= 4096 else 256
    return {"dim": int(d[1:]), "layers": int(layers[1:]), "batch": tokens // seq, "seq": seq, "tokens": tokens,
            "dtype": {"fp32": torch.float32, "bf16": torch.bfloat16}[dt], "mha": kind == ["mha"]}


def model_config(size: dict[str, Any]) -> LlamaConfig:
    """The benchmark model of a size: the demo's (GQA 8/4, hidden 2.6875 x dim) or, mha, issue 13's."""
    if size.get("mha"):
        return LlamaConfig(dim=size["dim"], n_layers=size["layers"], n_heads=8, n_kv_heads=8,
                           hidden_dim=4 * size["dim"], max_seq_len=size["seq"])
    return demo_config(size["dim"], size["layers"], max_seq_len=size["seq"])


# Compiling and timing.


def compile_model(fn: Callable[..., Any], options: dict[str, Any] | None) -> Callable[..., Any]:
    """Plain Inductor when ``options`` is None, else ``backend="pamm"`` with those options."""
    if options is None:
        return torch.compile(fn, backend="inductor")
    return torch.compile(fn, backend="pamm", options=options)


def compile_fresh(fn: Callable[..., Any], tag: str, backend: str = "inductor",
                  options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``torch.compile`` of ``fn`` (a wrapper the caller just defined) under a code object of its own.

    Dynamo caches compiled code per code object and, with inlined nn.Modules, its guards do not tell
    two copies of one model apart: without a fresh code object a second variant would silently reuse
    the first one's graph (and its partition, whatever the memory budget).
    """
    fn.__code__ = fn.__code__.replace(co_name=f"run_{tag}")
    return torch.compile(fn, backend=backend, options=options)


def train_step(fn: Callable[..., torch.Tensor], model: torch.nn.Module, *inputs: torch.Tensor) -> None:
    """Forward + backward of the loss ``fn(*inputs)``, then the gradients dropped (no optimizer)."""
    fn(*inputs).backward()
    for p in model.parameters():
        p.grad = None


def median_s(fn: Callable[[], object], runs: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn()`` in seconds over ``runs`` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Memory meters (bytes saved for backward: ``saved_for_backward``, re-exported from the demo).


def mmap_large_blocks() -> None:
    """Re-execute this script with glibc ``mmap``-ing blocks from 64 KiB up, unless it already does:
    freeing a large tensor then lowers RSS (else RSS deltas mean nothing). Call it before any work."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Sample RSS every ~1 ms in a thread; ``peak`` is the maximum seen."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def mib(nbytes: float) -> str:
    """``nbytes`` in MiB with two decimals."""
    return f"{nbytes / 2**20:.2f}"


# Machine, result files, tables.


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
