"""Train a small LLaMA-style model on real text: plain torch.compile and pamm, each alone and with a memory budget.

``python -m pamm_fx.demo`` trains four identical models (same initial weights, same
batches, interleaved step by step) on the standard library's docstrings: plain
``torch.compile`` (Inductor), ``backend="pamm"`` at the defaults (or ``--targets``), and
both again under Inductor's ``activation_memory_budget`` (``--budget``; 0 leaves those two
out). The budget alone already recomputes most activations, so pamm + budget is compared
with plain + the same budget as well as with plain. It prints the bytes saved for backward
(measured with ``saved_tensors_hooks``), the median step time of each and its ratio to
plain, the train and validation losses, and the number of generators k each compressed
group actually used (read from the plan).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

import pamm_fx.config
from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.testing import capture_rewrites

__all__ = ["main"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@torch.no_grad()
def _validation_loss(model: Llama, val: torch.Tensor, seq: int, windows: int = 128) -> float:
    """Mean loss over the first ``windows`` fixed windows of the held-out split."""
    rows = val[: windows * seq + 1]
    x, y = rows[:-1].view(windows, seq).long(), rows[1:].view(windows, seq).long()
    return sum(model(x[i : i + 32], y[i : i + 32]).item() for i in range(0, windows, 32)) / len(range(0, windows, 32))


def _compile(model: Llama, options: dict[str, Any] | None, budget: float | None, tag: int
             ) -> Callable[..., torch.Tensor]:
    """The compiled model, through a function with a code object of its own.

    Dynamo caches compiled code per code object, and its guards (backend included, compared by
    value) do not tell two copies of one model apart: without a fresh code object the budget
    variant would reuse pamm's graph, partitioned without the budget. The budget is read by the
    partitioner at the first call, so that call is made inside the config patch.
    """

    def run(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(tokens, targets)

    run.__code__ = run.__code__.replace(co_name=f"demo_variant_{tag}")
    fn = torch.compile(run, backend="inductor" if options is None else "pamm", options=options)
    if budget is None:
        return fn

    def with_budget(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return fn(tokens, targets)

    return with_budget


def _ks(records: list[Any]) -> str:
    """The k of every compressed group, as "k=256 x 9", from the plans the backend made."""
    ks = Counter(r.plan.estimate(g).k for r in records for g in r.plan.groups)
    return ", ".join(f"k={k} x {n} group{'s' * (n > 1)}" for k, n in sorted(ks.items())) or "no group compressed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pamm_fx.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per model (default 40)")
    parser.add_argument("--targets", default=None, help=f"pamm targets (default: the backend's, "
                        f"{pamm_fx.config.defaults.targets!r}); one of {list(pamm_fx.config.TARGETS)}")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="activation_memory_budget of the plain + budget and pamm + budget models "
                        "(0: leave both out)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"seed": args.seed}
    if args.targets is not None:
        options["targets"] = args.targets
    config = pamm_fx.config.resolve(options)
    warmup = min(3, max(args.steps - 1, 0))

    train, val = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(args.seed)
    first = Llama(cfg)
    pamm_name = f"pamm (targets={config.targets!r})"
    variants: dict[str, tuple[dict[str, Any] | None, float | None]] = {"plain torch.compile": (None, None),
                                                                        pamm_name: (options, None)}
    plain_budget, pamm_budget = f"plain + budget {args.budget:g}", f"pamm + budget {args.budget:g}"
    if args.budget:
        variants[plain_budget] = (None, args.budget)
        variants[pamm_budget] = (options, args.budget)
    models = {name: first if i == 0 else copy.deepcopy(first) for i, name in enumerate(variants)}
    compiled = {name: _compile(models[name], o, bud, i) for i, (name, (o, bud)) in enumerate(variants.items())}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    b = args.batch * args.seq
    print(
        f"model: {sum(p.numel() for p in first.parameters()) / 1e6:.2f}M params, {args.layers} layers, dim "
        f"{args.dim}, {b} tokens/step; pamm options: ratio={config.ratio_fraction}, min_generators="
        f"{config.min_generators}, targets={config.targets!r}; data: {len(train) / 1e6:.2f} MB of stdlib "
        f"docstrings; torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    gen = torch.Generator().manual_seed(args.seed)
    times: dict[str, list[float]] = {name: [] for name in models}
    saved: dict[str, int] = {}
    losses: dict[str, float] = {}
    groups: dict[str, str] = {}
    for step in range(args.steps):
        tokens, targets = batches(train, args.batch, args.seq, gen)
        for name, fn in compiled.items():
            start = time.perf_counter()
            if step == 0:
                with capture_rewrites() as records:
                    loss = fn(tokens, targets)
                groups[name] = _ks(records) if variants[name][0] is not None else "-"
            elif step == warmup:
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
    base = names[0]
    median = {n: statistics.median(times[n][warmup:]) for n in names}
    vals = {n: _validation_loss(models[n], val, args.seq) for n in names}

    rows = [("generators k", *(groups.get(n, "-") for n in names))]
    rows.append(("saved for backward", *(_mib(saved[n]) + ("" if n == base else f" ({saved[n] / saved[base] - 1:+.1%})")
                                         for n in names)))
    rows.append(("median step time", *(f"{median[n] * 1e3:.0f} ms" + ("" if n == base else
                                       f" ({median[n] / median[base]:.3f}x)") for n in names)))
    rows.append(("final train loss", *(f"{losses[n]:.4f}" for n in names)))
    rows.append(("validation loss", *(f"{vals[n]:.4f}" + ("" if n == base else f" ({vals[n] / vals[base] - 1:+.2%})")
                                      for n in names)))
    header = ("", *names)
    width = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, width)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, width)))
    if args.budget:  # what pamm adds to the budget's own saving
        print(f"\n{pamm_budget} against {plain_budget}: saved for backward "
              f"{saved[pamm_budget] / saved[plain_budget] - 1:+.1%}, step time "
              f"{median[pamm_budget] / median[plain_budget]:.3f}x, validation loss "
              f"{vals[pamm_budget] / vals[plain_budget] - 1:+.2%}")
    print(f"\n(medians over steps {warmup + 1}-{args.steps}; the first steps include compilation; a "
          f"{args.steps}-step run is too short for the losses to say anything about quality: see docs/benchmarks.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
