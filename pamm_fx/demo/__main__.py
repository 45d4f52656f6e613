"""Train a small LLaMA-style model on real text: plain torch.compile and pamm, each alone and with a memory budget.

``python -m pamm_fx.demo`` trains five identical models (same initial weights, same batches,
interleaved step by step) on the standard library's docstrings:

- plain ``torch.compile`` (Inductor), and plain under Inductor's ``activation_memory_budget``;
- ``backend="pamm"`` at the defaults (Q/K/V), and at :data:`RECOMMENDED_ALL` (every linear);
- :data:`RECOMMENDED_ALL` under the same budget.

The budget alone already recomputes most activations, so a budget row is compared with plain
+ the same budget as well as with plain: that ratio is what pamm adds. It prints, per model, the
bytes saved for backward (measured with ``saved_tensors_hooks``, deduplicated by storage,
parameters and buffers left out), the median step time and the median of its per-step ratios
(steps are interleaved, so load drift hits every model alike), the losses, and the k of every
compressed group (read from the plan).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from pamm_fx.estimators import SR
from pamm_fx.names import BACKEND
from pamm_fx.testing import capture_rewrites

__all__ = ["RECOMMENDED_ALL", "main"]

#: The options the docs recommend for compressing every linear (``targets="all"``): the one place the demo
#: names them, so that it always shows the documented configuration.
RECOMMENDED_ALL: dict[str, Any] = {"targets": "all", "estimator": SR.name}


@dataclasses.dataclass
class Variant:
    """One of the models trained side by side."""

    name: str
    options: dict[str, Any] | None  # pamm's options; None: plain Inductor
    budget: float | None  # Inductor's activation_memory_budget; None: none
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    saved: int = 0
    loss: float = float("nan")
    ks: str = "-"


@torch.no_grad()
def _validation_loss(model: Llama, val: torch.Tensor, seq: int, windows: int = 128) -> float:
    """Mean loss over the first ``windows`` fixed windows of the held-out split."""
    rows = val[: windows * seq + 1]
    x, y = rows[:-1].view(windows, seq).long(), rows[1:].view(windows, seq).long()
    return sum(model(x[i : i + 32], y[i : i + 32]).item() for i in range(0, windows, 32)) / len(range(0, windows, 32))


def _compile(model: Llama, options: dict[str, Any] | None, budget: float | None, tag: int
             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The compiled model, through a function with a code object of its own.

    Dynamo caches compiled code per code object, and its guards (backend included, compared by
    value) do not tell two copies of one model apart: without a fresh code object a budget
    variant would reuse another variant's graph, partitioned without the budget. The budget is
    read by the partitioner at the first call, so every call is made inside the config patch.
    """

    def run(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(tokens, targets)

    run.__code__ = run.__code__.replace(co_name=f"demo_variant_{tag}")
    fn = torch.compile(run, backend="inductor" if options is None else BACKEND, options=options)
    if budget is None:
        return fn

    def with_budget(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return fn(tokens, targets)

    return with_budget


def _ks(records: list[Any]) -> str:
    """What each compressed group keeps, as "k=256 x 4 groups, X at 8 bits x 9 groups", from the backend's plans."""
    ks = Counter(g.estimator.summary(r.plan.estimate(g).k) for r in records for g in r.plan.groups)
    return ", ".join(f"{k} x {n} group{'s' * (n > 1)}" for k, n in sorted(ks.items())) or "no group compressed"


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.3f}x"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    width = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pamm_fx.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="training steps per model (default 25)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="activation_memory_budget of the budget models (default 0.5; 0: leave them out)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step compiles, the second is measured)")
    default = pamm_fx.config.resolve({"seed": args.seed})
    recommended = {**RECOMMENDED_ALL, "seed": args.seed}
    pamm_fx.config.resolve(recommended)  # fail here, not inside the first compile, if the options are wrong
    warmup = min(3, args.steps - 1)  # step 0 compiles, step 1 is measured with the hooks: neither is timed

    budget = f" + budget {args.budget:g}"
    plain, plain_budget, pamm_default, pamm_all = "plain", "plain" + budget, f"pamm ({default.targets})", "pamm all"
    variants = [Variant(plain, None, None), Variant(pamm_default, {"seed": args.seed}, None),
                Variant(pamm_all, recommended, None)]
    if args.budget:
        variants[1:1] = [Variant(plain_budget, None, args.budget)]
        variants.append(Variant(pamm_all + budget, recommended, args.budget))
    by_name = {v.name: v for v in variants}

    train, val = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(args.seed)
    first = Llama(cfg)
    models = {v.name: first if i == 0 else copy.deepcopy(first) for i, v in enumerate(variants)}
    for i, v in enumerate(variants):
        v.fn = _compile(models[v.name], v.options, v.budget, i)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    print(
        f"model: {sum(p.numel() for p in first.parameters()) / 1e6:.2f}M params, {args.layers} layers, dim "
        f"{args.dim}, {args.batch * args.seq} tokens/step; data: {len(train) / 1e6:.2f} MB of stdlib docstrings; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"{pamm_default}: the backend's defaults (ratio={default.ratio_fraction}, min_generators="
        f"{default.min_generators}, targets={default.targets!r}); {pamm_all}: options {RECOMMENDED_ALL}",
        flush=True,
    )

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        tokens, targets = batches(train, args.batch, args.seq, gen)
        shift = step % len(variants)  # a different model goes first at each step: no order bias in the times
        for v in variants[shift:] + variants[:shift]:
            if step == 0:
                print(f"step   1: compiling {v.name} ...", end=" ", flush=True)
            start = time.perf_counter()
            if step == 0:
                with capture_rewrites() as records:
                    loss = v.fn(tokens, targets)
                v.ks = _ks(records) if v.options is not None else "-"
            elif step == 1:
                measured = saved_for_backward(lambda v=v, t=tokens, y=targets: v.fn(t, y), models[v.name])
                v.saved, loss = measured.nbytes, measured.output
            else:
                loss = v.fn(tokens, targets)
            loss.backward()
            opts[v.name].step()
            opts[v.name].zero_grad(set_to_none=True)
            v.times.append(time.perf_counter() - start)
            v.loss = loss.item()
            if step == 0:
                print(f"{v.times[-1]:.1f} s", flush=True)
        if step > 0 and ((step + 1) % 5 == 0 or step + 1 == args.steps):
            line = "  ".join(f"{v.name}: {v.loss:.3f} ({v.times[-1]:.2f} s)" for v in variants)
            print(f"step {step + 1:>3}/{args.steps}  loss (step time)  {line}", flush=True)

    print("validation loss ...", flush=True)
    vals = {v.name: _validation_loss(models[v.name], val, args.seq) for v in variants}
    base = by_name[plain]

    def step_ratio(v: Variant, ref: Variant) -> str:  # median of per-step ratios: both ran in the same step
        return _ratio(statistics.median(a / b for a, b in zip(v.times[warmup:], ref.times[warmup:])), 1.0)

    rows = []
    for v in variants:
        ref = by_name[plain_budget] if v.budget is not None and v.name != plain_budget else None
        rows.append((
            v.name, f"{v.saved / 2**20:.2f} MiB", _ratio(v.saved, base.saved),
            "-" if ref is None else _ratio(v.saved, ref.saved),
            f"{statistics.median(v.times[warmup:]) * 1e3:.0f} ms", step_ratio(v, base),
            "-" if ref is None else step_ratio(v, ref),
            f"{v.loss:.4f}", f"{vals[v.name]:.4f} ({vals[v.name] / vals[plain] - 1:+.2%})",
        ))
    same = "vs plain" + budget
    header = ("", "saved for backward", "vs plain", same, "step time", "vs plain", same, "train loss",
              "validation loss")
    keep = [i for i, h in enumerate(header) if args.budget or h != same]  # no budget: no budget baseline
    print()
    print(_table(tuple(header[i] for i in keep), [tuple(r[i] for i in keep) for r in rows]))
    print("\nper compressed group (generators k, or X's bits under estimator 'sr'): "
          + "; ".join(f"{v.name}: {v.ks}" for v in variants if v.options))
    print(f"(saved for backward: one step, exact; step times: medians over steps {warmup + 1}-{args.steps}, "
          f"after compilation; a {args.steps}-step run says nothing about quality: see docs/benchmarks.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
