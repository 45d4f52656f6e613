"""Memory and speed: plain ``torch.compile`` vs ``backend="pamm"`` vs activation-memory budgets, interleaved.

For each model size (the LLaMA-style demo model: dim, layers, tokens per step,
dtype) every variant is compiled from the same initial weights and then timed in
one process, interleaved round-robin (the order rotates every round), over one
training step = forward + backward (no optimizer: it is the same for every
variant). Variants: plain Inductor; ``backend="pamm"`` at the defaults with
``targets="qkv"`` (the default) and ``targets="all"``;
``torch._functorch.config.activation_memory_budget`` (min-cut partitioner with a
recompute knapsack) at 0.8/0.5/0.2 with plain Inductor; and pamm ``"all"`` stacked with
each budget (1.0 is the default, i.e. pamm alone). ``--extra`` adds ``"all"`` at k = b/64
(``min_generators=16``) alone and with budget 0.5; ``--sites`` adds one site family at a
time. The budget is a config patch read by the partitioner, so it is applied around the
first (compiling) call of each variant.

Reported per variant: bytes saved for backward (``pamm_fx.demo.measure.saved_for_backward``:
a ``saved_tensors_hooks`` count, deduplicated by storage, parameters excluded);
the QKV-input part (plain: the attention-norm output, layers x b x n, saved as its
own tensor; pamm: C k x n + f int32 + alpha fp32 per layer, read off the saved
tensors by shape); resident memory held between forward and backward (RSS after
the forward minus before, with glibc forced to ``mmap`` large blocks so frees reach
the OS) and the peak RSS during a step (sampled every ~1 ms); median step time with
its p20/p80 over the timed rounds, and the ratio to plain.

Each size is written to ``benchmarks/results/memory_speed/<size>.json`` when done;
sizes already there are skipped (``--force`` reruns). The table and
``docs/pareto_cpu.png`` are rebuilt from all result files.

    /work/venv/bin/python benchmarks/bench_memory_speed.py --threads 1 [--sizes d256-L4-b2048-fp32,...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pamm_fx.config import PammConfig
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

mmap_large_blocks()  # large tensors mmap-ed, so that RSS deltas mean something

OUT = RESULTS / "memory_speed"
#: The three benchmark sizes (the demo's SwiGLU/GQA model at 2.6875 x dim) and, ``-mha``, the model
#: of issue 13's goals: multi-head attention (8 kv heads) and a SwiGLU MLP of 4 x dim.
DEFAULT_SIZES = ["d256-L4-b2048-fp32", "d512-L2-b8192-fp32", "d512-L2-b4096-bf16", "d512-L2-b4096-fp32-mha"]


@dataclass(frozen=True)
class Variant:
    """One way to compile the model: pamm targets (None: plain Inductor), memory budget (None: default 1.0),
    min_generators and estimator (None: the defaults)."""

    targets: str | None = None
    budget: float | None = None
    min_generators: int | None = None
    estimator: str | None = None

    @property
    def name(self) -> str:
        parts = ["plain" if self.targets is None else f"pamm {self.targets}"]
        if self.min_generators is not None:
            parts[0] += f" mg{self.min_generators}"
        if self.estimator is not None:
            parts[0] += f" {self.estimator}"
        if self.budget is not None:
            parts.append(f"budget {self.budget}")
        return " + ".join(parts)

    @property
    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {} if self.targets == "defaults" else {"targets": self.targets}
        if self.min_generators is not None:
            opts["min_generators"] = self.min_generators
        if self.estimator is not None:
            opts["estimator"] = self.estimator
        return opts


VARIANTS = [
    Variant(), Variant("defaults"), Variant("qkv"), Variant("all"),
    Variant(None, 0.8), Variant(None, 0.5), Variant(None, 0.2),
    Variant("all", 0.8), Variant("all", 0.5), Variant("all", 0.2),
]
EXTRA = [Variant("all", None, 16), Variant("all", 0.5, 16), Variant("defaults", 0.5)]
#: The weight-gradient estimators of issue 19 (``--estimators``), with plain and its budget to compare against.
ESTIMATOR_VARIANTS = [
    Variant(), Variant(None, 0.5), Variant("defaults"), Variant("all"),
    Variant("all", None, None, "sr"), Variant("all", 0.5, None, "sr"), Variant("all", None, None, "auto"),
    Variant("all", 0.5, None, "auto"),
]
#: One site family at a time (``--sites``): what each costs and saves.
SITE_VARIANTS = [Variant(site) for site in ("attn_out", "mlp_up", "mlp_down", "head")]


def compile_variant(model: torch.nn.Module, v: Variant, tag: int) -> Callable[..., torch.Tensor]:
    """The model compiled as variant ``v`` under a code object of its own (see ``compile_fresh``)."""

    def run(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(tokens, targets)

    if v.targets is None:
        return compile_fresh(run, f"variant_{tag}")
    return compile_fresh(run, f"variant_{tag}", "pamm", v.options)


def qkv_bytes(v: Variant, saved: list[tuple[tuple[int, ...], torch.dtype, int]], size: dict[str, Any]) -> int | None:
    """Bytes of the QKV input as saved: plain layers*b*n; pamm the compressed (C, f, alpha) found by shape."""
    b, n, layers = size["tokens"], size["dim"], size["layers"]
    if v.targets is None:
        return None if v.budget is not None else layers * b * n * size["dtype"].itemsize
    if v.targets not in ("qkv", "all", "defaults"):
        return None  # another site's C has the same shape
    k = PammConfig(**v.options).num_generators(b, "qkv")
    c = [e for e in saved if e[0] == (k, n) and e[1] == size["dtype"]]
    f = [e for e in saved if e[0] == (b,) and e[1] == torch.int32]
    a = [e for e in saved if e[0] == (b,) and e[1] == torch.float32]
    if len(c) != layers or len(f) != layers or len(a) < layers:
        return None
    return sum(e[2] for e in c + f + a[:layers])


def run_size(label: str, rounds: int, warmup: int, variants: list[Variant],
             hooks: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    size = parse_size(label)
    cfg = model_config(size)
    torch.manual_seed(0)
    base = Llama(cfg).to(size["dtype"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    targets = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[torch.nn.Module, Callable[..., torch.Tensor]]] = {}
    for tag, v in enumerate(variants):
        model = copy.deepcopy(base)
        fn = compile_variant(model, v, tag)
        t0 = time.perf_counter()
        try:
            if v.budget is not None:
                with torch._functorch.config.patch(activation_memory_budget=v.budget):
                    train_step(fn, model, tokens, targets)
            else:
                train_step(fn, model, tokens, targets)
            for _ in range(warmup - 1):
                train_step(fn, model, tokens, targets)
        except Exception as e:  # record the failure, go on with the other variants
            print(f"  {v.name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            results[v.name] = {"variant": v.__dict__, "error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        compile_s = time.perf_counter() - t0
        gc.collect()
        before = rss()
        m = saved_for_backward(lambda fn=fn, model=model: fn(tokens, targets), model)
        after_fwd = rss()
        m.output.backward()
        for p in model.parameters():
            p.grad = None
        del m.output
        gc.collect()
        before_peak = rss()
        with PeakRss() as pk:
            train_step(fn, model, tokens, targets)
        results[v.name] = {
            "variant": v.__dict__, "compile_s": compile_s, "saved_bytes": m.nbytes,
            "qkv_bytes": qkv_bytes(v, m.tensors, size), "rss_after_forward_bytes": after_fwd - before,
            "peak_rss_step_bytes": pk.peak - before_peak,
            "k": None if v.targets is None else PammConfig(**v.options).num_generators(size["tokens"]),
            "saved_tensors": [[list(s), str(d), nb] for s, d, nb in m.tensors],
        }
        live[v.name] = (model, fn)
        print(f"  {v.name}: compiled+warm-up {compile_s:.1f} s, saved {mib(m.nbytes)} MiB", flush=True)
    times: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    if hooks[0]:
        subprocess.run(hooks[0], shell=True, check=False)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            model, fn = live[name]
            t0 = time.perf_counter()
            train_step(fn, model, tokens, targets)
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " + " ".join(f"{n}={times[n][-1] * 1e3:.0f}ms" for n in names), flush=True)
    if hooks[1]:
        subprocess.run(hooks[1], shell=True, check=False)
    for name in names:
        p20, med, p80 = spread(times[name])
        results[name].update({"step_s": times[name], "median_s": med, "p20_s": p20, "p80_s": p80})
    size_json = {k: (str(v) if k == "dtype" else v) for k, v in size.items()}
    params = sum(p.numel() for p in base.parameters())
    return {"size": label, "shape": size_json, "params": params, "rounds": rounds, "warmup": warmup,
            "variants": results, "machine": machine()}


def report(out: Path = OUT, plot: bool = True) -> None:
    """Print one table per size (baseline first) and draw the Pareto plot."""
    files = sorted(out.glob("*.json"))
    if not files:
        print("no results yet")
        return
    cell = lambda x: "-" if x is None else mib(x)  # noqa: E731
    data = [read_json(p) for p in files]
    for d in data:
        res, base = d["variants"], d["variants"].get("plain", {})
        print(f"\n### {d['size']} ({d['params'] / 1e6:.2f}M params, {d['shape']['batch']}x{d['shape']['seq']} tokens, "
              f"{d['shape']['dtype']}; median of {d['rounds']} interleaved rounds, torch {d['machine']['torch']}, "
              f"{d['machine']['nproc']} CPUs)\n")
        rows = []
        for name, r in res.items():
            if "error" in r:
                rows.append([name, "-", "FAILED: " + r["error"].splitlines()[0][:80], *[""] * 9])
                continue
            saved_vs = f"{r['saved_bytes'] / base['saved_bytes'] - 1:+.1%}" if base.get("saved_bytes") else "-"
            qkv_vs = (f"{r['qkv_bytes'] / base['qkv_bytes'] - 1:+.1%}"
                      if r.get("qkv_bytes") is not None and base.get("qkv_bytes") else "-")
            rows.append([
                name, r["k"] if r["k"] is not None else "-", cell(r["saved_bytes"]), saved_vs, cell(r["qkv_bytes"]),
                qkv_vs, cell(r["rss_after_forward_bytes"]), cell(r["peak_rss_step_bytes"]),
                f"{r['median_s'] * 1e3:.0f} ({r['p20_s'] * 1e3:.0f}-{r['p80_s'] * 1e3:.0f})",
                f"{r['median_s'] / base['median_s']:.3f}x" if base.get("median_s") else "-",
                f"{min(r['step_s']) * 1e3:.0f}",
                f"{min(r['step_s']) / min(base['step_s']):.3f}x" if base.get("step_s") else "-",
            ])
        print(markdown_table(["variant", "k", "saved MiB", "vs plain", "QKV input MiB", "QKV vs plain",
                              "RSS held after fwd MiB", "peak RSS in step MiB", "step ms median (p20-p80)",
                              "median vs plain", "step ms min", "min vs plain"], rows))
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 4.6), squeeze=False)
    for ax, d in zip(axes[0], data):
        res, base = d["variants"], d["variants"].get("plain", {})
        for name, r in res.items():
            if "error" in r or not base:
                continue
            v = r["variant"]
            color = "black" if name == "plain" else ("tab:red" if v["targets"] and v["budget"]
                                                      else "tab:blue" if v["targets"] else "tab:green")
            x, y = r["median_s"] / base["median_s"], r["saved_bytes"] / 2**20
            ax.errorbar(x, y, xerr=[[x - r["p20_s"] / base["median_s"]], [r["p80_s"] / base["median_s"] - x]],
                        fmt="o", color=color, capsize=2)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="step time / plain (median, p20-p80)", ylabel="saved for backward (MiB)", title=d["size"])
        ax.grid(alpha=0.3)
    fig.suptitle(f"saved for backward vs step time (lower left is better)\nblack plain, blue pamm, green budget, "
                 f"red pamm+budget; {data[0]['machine']['nproc']}-core CPU, {data[0]['machine']['torch_threads']} "
                 f"thread(s), torch {data[0]['machine']['torch']}", fontsize=9)
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "pareto_cpu.png", dpi=110)
    print(f"\nwrote {DOCS / 'pareto_cpu.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES))
    p.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant, compile included")
    p.add_argument("--force", action="store_true", help="rerun sizes that have results")
    p.add_argument("--extra", action="store_true", help="also pamm all at k = b/64 (min_generators=16), alone and "
                   "with budget 0.5")
    p.add_argument("--sites", action="store_true", help="also pamm on one site family at a time")
    p.add_argument("--estimators", action="store_true", help="only plain, plain + budget 0.5, pamm defaults, and "
                   "pamm all under the estimators pamm, sr and auto (sr and auto also with budget 0.5); "
                   "use a separate --out")
    p.add_argument("--only", help="comma-separated variant names to run (of all the above), e.g. "
                   "'plain,pamm defaults,pamm all,pamm all + budget 0.5'")
    p.add_argument("--before-timing", help="shell command run before the timed rounds of each size (e.g. to pause "
                   "other jobs sharing the machine; compilation and memory measurements do not need it)")
    p.add_argument("--after-timing", help="shell command run after the timed rounds (e.g. to resume those jobs)")
    args = parse_common_args(p, OUT)

    def run(label: str) -> dict:
        t0 = time.perf_counter()
        variants = (ESTIMATOR_VARIANTS if args.estimators else
                    VARIANTS + (EXTRA if args.extra else []) + (SITE_VARIANTS if args.sites else []))
        if args.only:
            every = {v.name: v for v in VARIANTS + EXTRA + SITE_VARIANTS + ESTIMATOR_VARIANTS}
            unknown = sorted(set(args.only.split(",")) - set(every))
            if unknown:
                raise SystemExit(f"unknown variant(s) {unknown}; valid: {sorted(every)}")
            variants = [every[name] for name in args.only.split(",")]
        result = run_size(label, args.rounds, args.warmup, variants, (args.before_timing, args.after_timing))
        torch._dynamo.reset()
        gc.collect()
        result["bench_wall_s"] = time.perf_counter() - t0
        return result

    if not args.report_only:
        run_resumable(args.sizes.split(","), args.out, run, lambda r: f"{r['bench_wall_s']:.0f} s", force=args.force)
    report(args.out, plot=args.out == OUT)


if __name__ == "__main__":
    main()
