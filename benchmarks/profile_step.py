"""Where one training step's time goes: plain ``torch.compile`` vs pamm ``targets="qkv"`` and ``"all"``.

One forward + backward of the LLaMA-style model under ``torch.profiler`` (self CPU time of every
op, Inductor's C++ kernels included via ``cpp.enable_kernel_profile``), after warm-up steps.
Each op is put in one bucket, by name and by the shapes of its operands:

- *compress GEMM*: the similarity X C^T, an ``mm`` whose output is (b, k);
- *compress rest*: the fused kernels that do the argmax, the gather of alpha, the row draw;
- *contraction*: ``pamm::contract`` (the scatter of dY into k rows);
- *weight-grad GEMM*: an ``mm`` whose output has a weight's shape (dW = dY^T X or B~^T C);
- *forward / input-grad GEMM*: the other ``mm`` / ``addmm`` / ``bmm`` calls;
- *attention*: SDPA forward and backward;
- *the rest*: every other kernel (norms, RoPE, SwiGLU, softmax cross-entropy, copies).

    python benchmarks/profile_step.py --threads 1 [--size d512-L2-b4096-fp32-mha] [--steps 3]

The variants run the code as it is now: ``"all"`` leaves an SDPA output projection exact.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    compile_model,
    machine,
    markdown_table,
    mmap_large_blocks,
    model_config,
    parse_common_args,
    parse_size,
    train_step,
    write_json,
)

from pamm_fx.config import SITES, PammConfig  # noqa: E402
from pamm_fx.demo.llama import Llama  # noqa: E402

mmap_large_blocks()  # the allocator set-up of bench_memory_speed.py, whose sizes it profiles

OUT = RESULTS / "profile_step"
VARIANTS: dict[str, dict[str, Any] | None] = {"plain": None, "pamm qkv": {"targets": "qkv"},
                                                "pamm all": {"targets": "all"}}
BUCKETS = ["compress GEMM", "compress rest", "contraction", "weight-grad GEMM", "forward / input-grad GEMM",
           "attention", "the rest"]
_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_weight_int8pack_mm")


def _gemm_operands(name: str, shapes: list[Any]) -> tuple[list[int], list[int]] | None:
    """The two matrix operands of a GEMM event (``addmm`` starts with the bias; ``mm`` may end with ``out=``)."""
    dims = [s for s in shapes if isinstance(s, list)]
    if name == "aten::addmm":
        dims = dims[1:]
    if len(dims) < 2 or len(dims[0]) != 2 or len(dims[1]) != 2:
        return None
    return dims[0], dims[1]


def buckets(name: str, shapes: list[Any], calls: float, weights: dict[tuple[int, int], int], b: int,
            k: set[int]) -> dict[str, float]:
    """The share of an event's time in each bucket (one bucket, except a GEMM shape two sites share).

    calls: calls per step. A (b, n) x (n, k) GEMM is a compression's similarity, unless a weight
    has shape (k, n) (a byte-level LM head: vocab 256 = k): then one call per such weight is
    its forward GEMM and the rest are compressions.
    """
    low = name.lower()
    if "contract" in low:
        return {"contraction": 1.0}
    if "scaled_dot_product" in low or "flash_attention" in low or "efficient_attention" in low:
        return {"attention": 1.0}
    if name in _GEMMS:
        ops = _gemm_operands(name, shapes)
        if ops is None:
            return {"forward / input-grad GEMM": 1.0}
        (p, q), (_, r) = ops
        if (p, r) in weights and q in (b, *k):
            return {"weight-grad GEMM": 1.0}
        if p == b and r in k:
            fwd = min(calls, weights.get((r, q), 0))
            share = fwd / calls if calls else 0.0
            return {"forward / input-grad GEMM": share, "compress GEMM": 1.0 - share}
        return {"forward / input-grad GEMM": 1.0}
    if "argmax" in low or "pamm::compress" in low or "randint" in low or "philox" in low:
        return {"compress rest": 1.0}
    return {"the rest": 1.0}


def profile_variant(name: str, options: dict[str, Any] | None, size: dict[str, Any], steps: int,
                    hooks: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Llama(model_config(size)).to(size["dtype"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    targets = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    fn = compile_model(model, options)

    def step() -> None:
        train_step(fn, model, tokens, targets)

    for _ in range(3):
        step()
    if hooks[0]:
        subprocess.run(hooks[0], shell=True, check=False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    if hooks[1]:
        subprocess.run(hooks[1], shell=True, check=False)
    weights: dict[tuple[int, int], int] = defaultdict(int)
    for prm in model.parameters():
        if prm.dim() == 2:
            weights[tuple(prm.shape)] += 1
    ks = set() if options is None else {PammConfig(**options).num_generators(size["tokens"], s) for s in SITES}
    totals: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key.startswith(("ProfilerStep", "## ", "Torch-Compiled Region", "CompiledFunction")):
            continue
        us = ev.self_cpu_time_total / steps
        if us <= 0:
            continue
        for key, share in buckets(ev.key, ev.input_shapes, ev.count / steps, weights, size["tokens"], ks).items():
            totals[key] += us * share
            top[f"{key}: {ev.key} {ev.input_shapes}"[:160]] += us * share
    torch._dynamo.reset()
    return {"variant": name, "options": options, "ms_per_step": {k: v / 1e3 for k, v in totals.items()},
            "top": sorted(((k, v / 1e3) for k, v in top.items()), key=lambda kv: -kv[1])[:25]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="d512-L2-b4096-fp32-mha")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--before-timing", help="shell command run before the profiled steps (e.g. pause other jobs)")
    p.add_argument("--after-timing", help="shell command run after them (e.g. resume those jobs)")
    args = parse_common_args(p, OUT)
    size = parse_size(args.size)
    torch._inductor.config.cpp.enable_kernel_profile = True
    results = []
    for name, options in VARIANTS.items():
        print(f"profiling {name} ...", flush=True)
        results.append(profile_variant(name, options, size, args.steps, (args.before_timing, args.after_timing)))
    write_json(args.out / f"{args.size}.json", {"size": args.size, "variants": results, "machine": machine()})
    base = sum(results[0]["ms_per_step"].values())
    rows = []
    for bk in [*BUCKETS, "total"]:
        row = [bk]
        for r in results:
            v = sum(r["ms_per_step"].values()) if bk == "total" else r["ms_per_step"].get(bk, 0.0)
            row.append(f"{v:.1f} ({v / base:.1%})")
        rows.append(row)
    print(f"\n### {args.size}: ms per step (share of plain's total), self CPU time, {args.steps} profiled steps\n")
    print(markdown_table(["bucket", *[r["variant"] for r in results]], rows))
    for r in results:
        print(f"\n{r['variant']}: top ops")
        for k, v in r["top"][:12]:
            print(f"  {v:8.1f} ms  {k}")


if __name__ == "__main__":
    main()
