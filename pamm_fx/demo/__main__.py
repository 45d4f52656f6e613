"""Train a small LLaMA-style model on real text with and without PAMM, side by side.

``python -m pamm_fx.demo`` trains two identical models (same initial weights,
same batches, interleaved step by step) on the standard library's docstrings:
one with plain ``torch.compile`` (Inductor), one with ``backend="pamm"``. It prints
the bytes saved for backward (measured with ``saved_tensors_hooks``), the median
step time of each and their ratio, and the train and validation losses.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from fractions import Fraction

import torch

from pamm_fx.config import PammConfig
from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward

__all__ = ["main"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@torch.no_grad()
def _validation_loss(model: Llama, val: torch.Tensor, batch: int, seq: int) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [model(*batches(val, batch, seq, gen)).item() for _ in range(4)]
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pamm_fx.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per model (default 40)")
    parser.add_argument("--ratio", default="1/64", help="PAMM compression ratio (default 1/64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pamm = PammConfig(ratio=str(args.ratio), seed=args.seed)
    warmup = min(3, max(args.steps - 1, 0))

    train, val = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(args.seed)
    models = {"plain torch.compile": Llama(cfg)}
    models[f"pamm (ratio {Fraction(pamm.ratio_fraction)})"] = copy.deepcopy(models["plain torch.compile"])
    compiled = {
        name: torch.compile(m, backend="inductor" if i == 0 else "pamm", options=None if i == 0 else pamm.__dict__)
        for i, (name, m) in enumerate(models.items())
    }
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    b = args.batch * args.seq
    print(
        f"model: {sum(p.numel() for p in models['plain torch.compile'].parameters()) / 1e6:.2f}M params, "
        f"{args.layers} layers, dim {args.dim}, {b} tokens/step (k = {pamm.num_generators(b)} generators); "
        f"data: {len(train) / 1e6:.2f} MB of stdlib docstrings; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    gen = torch.Generator().manual_seed(args.seed)
    times: dict[str, list[float]] = {name: [] for name in models}
    saved: dict[str, int] = {}
    losses: dict[str, float] = {}
    for step in range(args.steps):
        tokens, targets = batches(train, args.batch, args.seq, gen)
        for name, fn in compiled.items():
            start = time.perf_counter()
            if step == warmup:
                measured = saved_for_backward(lambda fn=fn, t=tokens, y=targets: fn(t, y), models[name])
                saved[name], loss = measured.nbytes, measured.output
            else:
                loss = fn(tokens, targets)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
        if step == 0 or (step + 1) % 5 == 0 or step + 1 == args.steps:
            line = "  ".join(f"{name}: loss {losses[name]:.3f} ({times[name][-1]:.2f} s)" for name in models)
            print(f"step {step + 1:>3}/{args.steps}  {line}", flush=True)

    names = list(models)
    base, ours = names
    median = {n: statistics.median(times[n][warmup:]) for n in names}
    vals = {n: _validation_loss(models[n], val, args.batch, args.seq) for n in names}
    rows = [
        ("saved for backward", _mib(saved[base]), _mib(saved[ours]), f"{saved[ours] / saved[base] - 1:+.1%}"),
        ("median step time", f"{median[base] * 1e3:.0f} ms", f"{median[ours] * 1e3:.0f} ms",
         f"{median[ours] / median[base]:.3f}x"),
        ("final train loss", f"{losses[base]:.4f}", f"{losses[ours]:.4f}", f"{losses[ours] / losses[base] - 1:+.2%}"),
        ("validation loss", f"{vals[base]:.4f}", f"{vals[ours]:.4f}", f"{vals[ours] / vals[base] - 1:+.2%}"),
    ]
    width = [max(len(r[i]) for r in rows + [("", base, ours, "pamm vs plain")]) for i in range(4)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(("", base, ours, "pamm vs plain"), width)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, width)))
    print(f"\n(medians over steps {warmup + 1}-{args.steps}; the first steps include compilation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
