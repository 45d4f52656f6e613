"""Training quality: plain ``torch.compile`` vs ``backend="pamm"`` at several ratios, same seeds and data.

A small LLaMA-style byte-level LM (the demo's model) is trained from the same
initial weights on the same batches (both fixed by the seed) with plain Inductor
and with PAMM at ratios 1/8, 1/64 and 1/512; two seeds for the baseline and for
1/64 show the run-to-run noise. Each run is written to
``benchmarks/results/train_quality/<run>.json`` as soon as it finishes, and runs
already there are skipped, so a cut-off invocation resumes. The table and
``docs/quality_cpu.png`` are rebuilt from all result files at the end.

    /work/venv/bin/python benchmarks/train_quality.py --threads 1 [--steps 400] [--runs plain-s0,...] [--report-only]
"""

from __future__ import annotations

import argparse
import math
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from _common import DOCS, RESULTS, machine, markdown_table, parse_common_args, read_json, run_resumable

from pamm_fx.config import PammConfig
from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward

OUT = RESULTS / "train_quality"
#: (label, ratio or None for plain Inductor, seed)
DEFAULT_RUNS = ["plain-s0", "pamm-1/512-s0", "pamm-1/64-s0", "plain-s1", "pamm-1/512-s1", "pamm-1/8-s0", "pamm-1/64-s1"]


def parse_run(label: str) -> tuple[str | None, int]:
    """``plain-s0`` -> (None, 0); ``pamm-1/64-s1`` -> ("1/64", 1)."""
    parts = label.split("-")
    seed = int(parts[-1].removeprefix("s"))
    return (None if parts[0] == "plain" else parts[1]), seed


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def val_loss(model: Llama, val: torch.Tensor, batch: int, seq: int, n: int) -> float:
    """Mean loss over ``n`` fixed validation batches (eager forward: no compile, no PAMM)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    out = sum(model(*batches(val, batch, seq, gen)).item() for _ in range(n)) / n
    model.train()
    return out


def train_one(label: str, args: argparse.Namespace) -> dict[str, Any]:
    ratio, seed = parse_run(label)
    train, val = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(seed)
    model = Llama(cfg)
    b = args.batch * args.seq
    if ratio is None:
        fn = torch.compile(model, backend="inductor")
        k = None
    else:
        pcfg = PammConfig(ratio=ratio)
        fn = torch.compile(model, backend="pamm", options={"ratio": ratio})
        k = pcfg.num_generators(b)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1000)  # PAMM's generator rows come from the global RNG
    curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    saved = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        tokens, targets = batches(train, args.batch, args.seq, gen)
        if step == 1:
            m = saved_for_backward(lambda t=tokens, y=targets: fn(t, y), model)
            saved, loss = m.nbytes, m.output
        else:
            loss = fn(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append((step + 1, loss.item()))
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, val_loss(model, val, args.batch, args.seq, args.val_batches)))
            el = time.perf_counter() - t0
            print(f"  {label}: step {step + 1}/{args.steps} train {loss.item():.4f} val {val_curve[-1][1]:.4f} "
                  f"({el:.0f} s)", flush=True)
    final = val_loss(model, val, args.batch, args.seq, args.final_val_batches)
    return {
        "label": label, "ratio": ratio, "seed": seed, "k": k, "tokens_per_step": b, "steps": args.steps,
        "params": sum(p.numel() for p in model.parameters()), "saved_for_backward_bytes": saved,
        "final_val_loss": final, "val_curve": val_curve, "train_curve": curve,
        "wall_s": time.perf_counter() - t0, "config": vars(args), "machine": machine(),
    }


def report(out: Path = OUT, plot: bool = True) -> None:
    """Print the table of every run in ``out`` and draw the curves."""
    runs = {p.stem: read_json(p) for p in sorted(out.glob("*.json"))}
    if not runs:
        print("no results yet")
        return
    base = [r for r in runs.values() if r["ratio"] is None]
    base_mean = sum(r["final_val_loss"] for r in base) / len(base) if base else float("nan")
    by_seed = {r["seed"]: r["final_val_loss"] for r in base}

    def order(r: dict[str, Any]) -> tuple[float, int]:
        return (0.0 if r["ratio"] is None else 1 / float(Fraction(r["ratio"])), r["seed"])

    rows = []
    for r in sorted(runs.values(), key=order):
        same = by_seed.get(r["seed"])
        rows.append([
            "plain torch.compile" if r["ratio"] is None else f"pamm {r['ratio']}",
            r["seed"], r["k"] if r["k"] is not None else "-", r["steps"], f"{r['final_val_loss']:.4f}",
            f"{math.exp(r['final_val_loss']):.3f}",
            f"{(r['final_val_loss'] / same - 1) * 100:+.2f}%" if same else "-",
            f"{(r['final_val_loss'] / base_mean - 1) * 100:+.2f}%",
            f"{r['saved_for_backward_bytes'] / 2**20:.2f}", f"{r['wall_s'] / 60:.1f}",
        ])
    header = ["run", "seed", "k", "steps", "val loss", "val ppl (bytes)", "vs plain same seed",
              "vs plain mean", "saved MiB", "min"]
    print(markdown_table(header, rows))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in sorted(runs.values(), key=order):
            name = ("plain" if r["ratio"] is None else f"pamm {r['ratio']} (k={r['k']})") + f" s{r['seed']}"
            style = "-" if r["seed"] == 0 else "--"
            xs, ys = zip(*r["val_curve"])
            ax1.plot(xs, ys, style, label=name)
            tx, ty = zip(*r["train_curve"])
            w = 25
            sm = [sum(ty[max(0, i - w + 1): i + 1]) / len(ty[max(0, i - w + 1): i + 1]) for i in range(len(ty))]
            ax2.plot(tx, sm, style, label=name)
        ax1.set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation loss")
        ax2.set(xlabel="step", ylabel="train loss (25-step mean)", title="training loss")
        ax1.set_ylim(top=min(3.0, ax1.get_ylim()[1]))
        ax2.set_ylim(top=min(3.0, ax2.get_ylim()[1]))
        ax1.legend(fontsize=7)
        fig.suptitle("byte-level LLaMA-style LM on stdlib docstrings, 2-core CPU, torch " + torch.__version__)
        fig.tight_layout()
        DOCS.mkdir(exist_ok=True)
        fig.savefig(DOCS / "quality_cpu.png", dpi=110)
        print(f"wrote {DOCS / 'quality_cpu.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--final-val-batches", type=int, default=32)
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated run labels")
    args = parse_common_args(p, OUT)
    if not args.report_only:
        settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "out"})
        run_resumable(
            args.runs.split(","), args.out, lambda label: train_one(label, settings),
            lambda r: f"final val loss {r['final_val_loss']:.4f} (k={r['k']}, {r['wall_s']:.0f} s)",
        )
    report(args.out, plot=args.out == OUT)


if __name__ == "__main__":
    main()
