"""The memory/time frontier: what torch offers a user who runs out of activation memory, and pamm's points.

For each model size every variant is compiled from the same initial weights (torch's own options
first, plain first of all, so that a pamm compile always follows other compiles in the process, as in a
real program) and timed in one process, interleaved round-robin with the order rotating, over one
training step (forward + backward, no optimizer). Variants:

- torch: plain ``torch.compile``; ``activation_memory_budget`` 0.9 ... 0.1 (the min-cut partitioner's
  recompute knapsack); selective activation checkpointing per block (torchtitan's op policy: save
  matmuls and attention, every second mm recomputed); full checkpointing per block; Inductor's fp8
  activation pass (``post_grad_fusion_options["activation_quantization_aten_pass"]``: every saved
  float tensor to float8_e5m2 with a per-row scale, round to nearest), alone and with budget 0.5;
- pamm: ``saved="all"`` (what the partitioner keeps, at 8 bits with stochastic rounding; dX approximate)
  alone and with each budget, at 4 bits, ``saved="wgrad"`` (only tensors read for weight gradients;
  dX exact), and ``targets="all", estimator="sr"`` (the linear inputs at 8 bits through the group op).

Reported per variant: bytes saved for backward (``saved_tensors_hooks``, storages deduplicated,
parameters excluded), peak RSS during a step above the level before it (sampled every ~1 ms, large blocks
mmap-ed so frees reach the OS), step time (median over interleaved rounds, p20-p80) and its ratio to
plain, and compile + warm-up time. Quality is not measured here (``train_quality.py``).

    python benchmarks/bench_frontier.py --threads 1 [--sizes d512-L2-b4096-fp32-mha,d256-L4-b2048-fp32]
        [--rounds 7] [--only 'plain,budget 0.8,...'] [--before-timing 'benchmarks/pause_jobs.sh STOP']

One JSON per size in ``benchmarks/results/frontier/`` (``--force`` reruns); the tables and
``docs/frontier_cpu.png`` are rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pamm_fx.demo.__main__ import FP8, RECOMMENDED  # the demo's: one definition of each
from pamm_fx.demo.llama import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DOCS,
    RESULTS,
    PeakRss,
    compile_fresh,
    machine,
    markdown_table,
    mib,
    mmap_large_blocks,
    model_config,
    parse_common_args,
    parse_size,
    read_json,
    rss,
    run_resumable,
    saved_for_backward,
    spread,
    train_step,
)
from bench_checkpoint import sac_context  # noqa: E402

mmap_large_blocks()

OUT = RESULTS / "frontier"
DEFAULT_SIZES = ["d512-L2-b4096-fp32-mha", "d256-L4-b2048-fp32", "d512-L2-b4096-bf16-mha"]
BUDGETS = (0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class Variant:
    """One way to train: pamm options (None: plain Inductor), a memory budget, checkpointing ("full"/"sac"),
    Inductor's fp8 pass."""

    name: str
    options: dict[str, Any] | None = field(default=None, hash=False)
    budget: float | None = None
    ac: str | None = None
    fp8: bool = False

    @property
    def family(self) -> str:
        return "pamm" if self.options is not None else ("fp8" if self.fp8 else "ac" if self.ac else
                                                        "budget" if self.budget else "plain")


def _with_budget(name: str, budget: float | None) -> str:
    return name if budget is None else f"{name} + budget {budget}"


SAVED_ALL = RECOMMENDED
VARIANTS: list[Variant] = [
    Variant("plain"),
    *(Variant(f"budget {b}", budget=b) for b in BUDGETS),
    Variant("selective AC", ac="sac"),
    Variant("full AC", ac="full"),
    Variant("fp8 pass", fp8=True),
    Variant("fp8 pass + budget 0.5", fp8=True, budget=0.5),
    Variant("pamm saved=all"),
    *(Variant(_with_budget("pamm saved=all", b), budget=b) for b in BUDGETS),
    Variant("pamm saved=all 4-bit"),
    Variant("pamm saved=wgrad"),
    Variant("pamm all sr"),
]
_OPTIONS = {"pamm saved=all": SAVED_ALL, "pamm saved=all 4-bit": {**SAVED_ALL, "saved_bits": 4},
            "pamm saved=wgrad": {"targets": "none", "saved": "wgrad"},
            "pamm all sr": {"targets": "all", "estimator": "sr"}}
VARIANTS = [Variant(v.name, _OPTIONS.get(v.name.split(" + ")[0]), v.budget, v.ac, v.fp8) for v in VARIANTS]
#: A shorter list for the second and third sizes.
SHORT = ["plain", "budget 0.8", "budget 0.5", "budget 0.2", "selective AC", "full AC", "fp8 pass",
         "pamm saved=all", "pamm saved=all + budget 0.8", "pamm saved=all + budget 0.5",
         "pamm saved=all + budget 0.2", "pamm saved=wgrad"]


class _Checkpointed(nn.Module):
    """A block under ``torch.utils.checkpoint`` (full, or torchtitan's selective op policy)."""

    def __init__(self, block: nn.Module, ac: str) -> None:
        super().__init__()
        self.block, self.ac = block, ac

    def forward(self, *args: Any) -> Any:
        if self.ac == "sac":
            return checkpoint(self.block, *args, use_reentrant=False, context_fn=sac_context)
        return checkpoint(self.block, *args, use_reentrant=False)


def build(base: Llama, v: Variant, tag: int) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    model = copy.deepcopy(base)
    if v.ac:
        for i, layer in enumerate(model.layers):
            model.layers[i] = _Checkpointed(layer, v.ac)

    def run(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(tokens, targets)

    if v.options is None:
        return model, compile_fresh(run, f"variant_{tag}")
    return model, compile_fresh(run, f"variant_{tag}", "pamm", v.options)


def first_step(fn: Callable[..., torch.Tensor], model: nn.Module, v: Variant, *inputs: torch.Tensor) -> None:
    """The compiling step, under the variant's budget and fp8 settings (read when the graphs are partitioned)."""
    budget = torch._functorch.config.patch(activation_memory_budget=v.budget if v.budget else 1.0)
    fp8 = torch._inductor.config.patch(post_grad_fusion_options=FP8 if v.fp8 else {})
    with budget, fp8:
        train_step(fn, model, *inputs)


def run_size(label: str, rounds: int, warmup: int, variants: list[Variant],
             hooks: tuple[str | None, str | None]) -> dict[str, Any]:
    size = parse_size(label)
    torch.manual_seed(0)
    base = Llama(model_config(size)).to(size["dtype"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    targets = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[nn.Module, Callable[..., torch.Tensor]]] = {}
    for tag, v in enumerate(variants):
        model, fn = build(base, v, tag)
        t0 = time.perf_counter()
        try:
            first_step(fn, model, v, tokens, targets)
            for _ in range(warmup - 1):
                train_step(fn, model, tokens, targets)
        except Exception as e:  # record the failure, go on with the other variants
            print(f"  {v.name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            results[v.name] = {"family": v.family, "error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        compile_s = time.perf_counter() - t0
        gc.collect()
        m = saved_for_backward(lambda fn=fn, model=model: fn(tokens, targets), model)
        m.output.backward()
        for p in model.parameters():
            p.grad = None
        del m.output
        gc.collect()
        before = rss()
        with PeakRss() as pk:
            train_step(fn, model, tokens, targets)
        results[v.name] = {"family": v.family, "options": v.options, "budget": v.budget, "ac": v.ac, "fp8": v.fp8,
                           "compile_s": compile_s, "saved_bytes": m.nbytes, "peak_rss_step_bytes": pk.peak - before}
        live[v.name] = (model, fn)
        print(f"  [{tag + 1}/{len(variants)}] {v.name}: compiled+warm-up {compile_s:.0f} s, saved {mib(m.nbytes)} MiB",
              flush=True)
    times: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    if hooks[0]:
        subprocess.run(hooks[0], shell=True, check=False)
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                model, fn = live[name]
                t0 = time.perf_counter()
                train_step(fn, model, tokens, targets)
                times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}/{rounds} done", flush=True)
    finally:
        if hooks[1]:
            subprocess.run(hooks[1], shell=True, check=False)
    for name in names:
        p20, med, p80 = spread(times[name])
        results[name].update({"step_s": times[name], "median_s": med, "p20_s": p20, "p80_s": p80})
    return {"size": label, "shape": {k: (str(v) if k == "dtype" else v) for k, v in size.items()},
            "params": sum(p.numel() for p in base.parameters()), "rounds": rounds, "variants": results,
            "machine": machine()}


def report(out: Path = OUT, plot: bool = True) -> None:
    files = sorted(out.glob("*.json"))
    if not files:
        print("no results yet")
        return
    data = [read_json(p) for p in files]
    for d in data:
        res, base = d["variants"], d["variants"].get("plain", {})
        print(f"\n### {d['size']} ({d['params'] / 1e6:.2f}M params, {d['shape']['batch']}x{d['shape']['seq']} tokens, "
              f"{d['shape']['dtype']}; median of {d['rounds']} interleaved rounds; torch {d['machine']['torch']}, "
              f"{d['machine']['nproc']} CPUs, {d['machine']['torch_threads']} thread(s), {d['machine']['date']})\n")
        rows = []
        for name, r in res.items():
            if "error" in r:
                rows.append([name, "FAILED: " + r["error"].splitlines()[0][:80], "", "", "", "", ""])
                continue
            rows.append([
                name, mib(r["saved_bytes"]), f"{r['saved_bytes'] / base['saved_bytes']:.3f}x",
                mib(r["peak_rss_step_bytes"]),
                f"{r['median_s'] * 1e3:.0f} ({r['p20_s'] * 1e3:.0f}-{r['p80_s'] * 1e3:.0f})",
                f"{r['median_s'] / base['median_s']:.3f}x", f"{r['compile_s']:.0f}",
            ])
        print(markdown_table(["variant", "saved MiB", "saved vs plain", "peak RSS in step MiB",
                              "step ms median (p20-p80)", "step vs plain", "compile+warm-up s"], rows))
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "black", "budget": "tab:green", "ac": "tab:olive", "fp8": "tab:purple", "pamm": "tab:red"}
    fig, axes = plt.subplots(1, len(data), figsize=(5.6 * len(data), 4.8), squeeze=False)
    for ax, d in zip(axes[0], data):
        res, base = d["variants"], d["variants"].get("plain", {})
        for name, r in res.items():
            if "error" in r or not base:
                continue
            x, y = r["median_s"] / base["median_s"], r["saved_bytes"] / base["saved_bytes"]
            ax.errorbar(x, y, xerr=[[x - r["p20_s"] / base["median_s"]], [r["p80_s"] / base["median_s"] - x]],
                        fmt="o", color=colors[r["family"]], capsize=2, ms=4)
            ax.annotate(name.replace("pamm saved=all", "pamm").replace("budget ", "b"), (x, y), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.set(xlabel="step time / plain (median, p20-p80)", ylabel="saved for backward / plain", title=d["size"],
               yscale="log")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("saved for backward vs step time (lower left is better): black plain, green budget, olive "
                 "checkpointing, purple Inductor fp8 pass, red pamm", fontsize=9)
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "frontier_cpu.png", dpi=110)
    print(f"\nwrote {DOCS / 'frontier_cpu.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES))
    p.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant, compile included")
    p.add_argument("--force", action="store_true", help="rerun sizes that have results")
    p.add_argument("--only", help="comma-separated variant names (default: all for the first size, a shorter list "
                   "for the others)")
    p.add_argument("--before-timing", help="shell command before the timed rounds (e.g. pause other jobs)")
    p.add_argument("--after-timing", help="shell command after the timed rounds")
    args = parse_common_args(p, OUT)
    every = {v.name: v for v in VARIANTS}
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(every))
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; valid: {list(every)}")

    def run(label: str) -> dict:
        t0 = time.perf_counter()
        names = args.only.split(",") if args.only else (list(every) if label == args.sizes.split(",")[0] else SHORT)
        result = run_size(label, args.rounds, args.warmup, [every[n] for n in names],
                          (args.before_timing, args.after_timing))
        torch._dynamo.reset()
        gc.collect()
        result["bench_wall_s"] = time.perf_counter() - t0
        return result

    if not args.report_only:
        run_resumable(args.sizes.split(","), args.out, run, lambda r: f"{r['bench_wall_s']:.0f} s", force=args.force)
    report(args.out, plot=args.out == OUT)


if __name__ == "__main__":
    main()
