"""Train a small LLaMA-style model on real text: plain torch.compile, what torch offers instead, and pamm.

``python -m pamm_fx.demo`` trains seven identical models (same initial weights, same batches,
interleaved step by step) on the standard library's docstrings:

- plain ``torch.compile`` (Inductor);
- what torch offers a user short of activation memory: Inductor's ``activation_memory_budget`` (0.8
  by default: it recomputes the cheap elementwise activations), full activation checkpointing of every
  block, and Inductor's fp8 activation pass (every saved float tensor to float8_e5m2, round to nearest);
- ``backend="pamm"`` at the defaults (Q/K/V, the paper's estimator), at :data:`RECOMMENDED`
  (``saved="all"``: what the partitioner keeps, at 8 bits with stochastic rounding), and that under
  the same budget.

A budget row is compared with plain + the same budget as well as with plain: that ratio is what pamm
adds. It prints, per model, the bytes saved for backward (measured with ``saved_tensors_hooks``,
deduplicated by storage, parameters and buffers left out), the median step time and the median of its
per-step ratios (steps are interleaved, so load drift hits every model alike), the losses, and what
pamm compressed (read from the plans and the partitions).
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
import torch.utils.checkpoint

import pamm_fx.config
import pamm_fx.saved
from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.names import BACKEND
from pamm_fx.testing import capture_rewrites

__all__ = ["FP8", "RECOMMENDED", "main"]

#: The options the docs recommend for the smallest footprint at plain's quality (``docs/benchmarks.md``, section
#: 5): every saved activation at 8 bits, dX approximate; the one place the demo names them.
RECOMMENDED: dict[str, Any] = {"targets": "none", "saved": "all"}
#: Inductor's fp8 activation pass on every float tensor the partitioner saves (its own defaults take bf16 only,
#: over 100 MB): torch's answer to the same problem.
FP8: dict[str, Any] = {"activation_quantization_aten_pass": {
    "allowed_dtypes": "torch.float32;torch.bfloat16", "size_in_mb": 0.0, "quant_type": "torch.float8_e5m2",
    "use_scaling": True, "exclude_primals": True}}


@dataclasses.dataclass
class Variant:
    """One of the models trained side by side."""

    name: str
    options: dict[str, Any] | None  # pamm's options; None: plain Inductor
    budget: float | None  # Inductor's activation_memory_budget; None: none
    checkpoint: bool = False  # every block under torch.utils.checkpoint
    fp8: bool = False  # Inductor's fp8 activation pass
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


class _Checkpointed(torch.nn.Module):
    """A block under ``torch.utils.checkpoint``: only its input is saved, the rest recomputed in the backward."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)


def _compile(model: Llama, v: Variant, tag: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The compiled model, through a function with a code object of its own.

    Dynamo caches compiled code per code object, and its guards (backend included, compared by
    value) do not tell two copies of one model apart: without a fresh code object a budget
    variant would reuse another variant's graph, partitioned without the budget. The budget and the
    fp8 pass are read when the graphs are partitioned, so every call is made inside their config patches.
    """
    if v.checkpoint:
        for i, layer in enumerate(model.layers):
            model.layers[i] = _Checkpointed(layer)

    def run(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(tokens, targets)

    run.__code__ = run.__code__.replace(co_name=f"demo_variant_{tag}")
    fn = torch.compile(run, backend="inductor" if v.options is None else BACKEND, options=v.options)
    if v.budget is None and not v.fp8:
        return fn

    def patched(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        budget = torch._functorch.config.patch(activation_memory_budget=v.budget or 1.0)
        with budget, torch._inductor.config.patch(post_grad_fusion_options=FP8 if v.fp8 else {}):
            return fn(tokens, targets)

    return patched


def _kept(records: list[Any], saved: list[Any]) -> str:
    """What pamm kept: "k=256 x 4 groups, X at 8 bits x 9 groups" from the backend's plans, and "12 of 30 saved
    tensors at 8 bits" from its partitions."""
    ks = Counter(g.estimator.summary(r.plan.estimate(g).k) for r in records for g in r.plan.groups)
    parts = [f"{k} x {n} group{'s' * (n > 1)}" for k, n in sorted(ks.items())]
    for choices in saved:
        parts.append(f"{sum(c.compressed for c in choices)} of {len(choices)} saved tensors compressed")
    return ", ".join(parts) or "nothing compressed"


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.3f}x"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    width = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pamm_fx.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="training steps per model (default 25)")
    parser.add_argument("--budget", type=float, default=0.8,
                        help="activation_memory_budget of the budget models (default 0.8, which costs plain no step "
                        "time here; 0: leave them out)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step compiles, the second is measured)")
    default = pamm_fx.config.resolve({"seed": args.seed})
    recommended = {**RECOMMENDED, "seed": args.seed}
    pamm_fx.config.resolve(recommended)  # fail here, not inside the first compile, if the options are wrong
    warmup = min(3, args.steps - 1)  # step 0 compiles, step 1 is measured with the hooks: neither is timed

    budget = f" + budget {args.budget:g}"
    plain, plain_budget, pamm_default, pamm_saved = "plain", "plain" + budget, f"pamm ({default.targets})", \
        "pamm saved=all"
    variants = [Variant(plain, None, None)]
    if args.budget:
        variants.append(Variant(plain_budget, None, args.budget))
    variants += [Variant("full checkpointing", None, None, checkpoint=True), Variant("fp8 pass", None, None, fp8=True),
                 Variant(pamm_default, {"seed": args.seed}, None), Variant(pamm_saved, recommended, None)]
    if args.budget:
        variants.append(Variant(pamm_saved + budget, recommended, args.budget))
    by_name = {v.name: v for v in variants}

    train, val = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(args.seed)
    first = Llama(cfg)
    models = {v.name: first if i == 0 else copy.deepcopy(first) for i, v in enumerate(variants)}
    for i, v in enumerate(variants):
        v.fn = _compile(models[v.name], v, i)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    print(
        f"model: {sum(p.numel() for p in first.parameters()) / 1e6:.2f}M params, {args.layers} layers, dim "
        f"{args.dim}, {args.batch * args.seq} tokens/step; data: {len(train) / 1e6:.2f} MB of stdlib docstrings; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"{pamm_default}: the backend's defaults (ratio={default.ratio_fraction}, min_generators="
        f"{default.min_generators}, targets={default.targets!r}); {pamm_saved}: options {RECOMMENDED} "
        "(dX approximate, unbiased)",
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
                with capture_rewrites() as records, pamm_fx.saved.record_choices() as partitions:
                    loss = v.fn(tokens, targets)
                    loss.backward()  # inside: the backward graph is compiled (and partitioned) lazily
                v.ks = _kept(records, partitions) if v.options is not None else "-"
            elif step == 1:
                measured = saved_for_backward(lambda v=v, t=tokens, y=targets: v.fn(t, y), models[v.name])
                v.saved, loss = measured.nbytes, measured.output
            else:
                loss = v.fn(tokens, targets)
            if step != 0:
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
        ref = by_name.get(plain_budget) if v.budget is not None and v.name != plain_budget else None
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
    print("\nwhat pamm compressed (per group: generators k, or X's bits under estimator 'sr'; per partition: the "
          "saved tensors under saved=): " + "; ".join(f"{v.name}: {v.ks}" for v in variants if v.options))
    print(f"(saved for backward: one step, exact; step times: medians over steps {warmup + 1}-{args.steps}, "
          f"after compilation; a {args.steps}-step run says nothing about quality: see docs/benchmarks.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
