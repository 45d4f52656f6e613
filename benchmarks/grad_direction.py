"""How far PAMM's weight gradient is from the exact one, per site, and what a LoRA B's compression buys.

Part 1, per site: the quality benchmark's model (d=256, 4 layers, 2,048 tokens per step) after
``--train`` plain AdamW steps; on fresh batches, the exact gradient (eager) against PAMM's under
``targets="all"`` at several ``min_generators`` (k at b = 2,048), three draws each. Per site
(``pamm_fx.config.SITES``): the cosine between the PAMM and the exact dW, and the relative error
||dW_pamm - dW|| / ||dW||, averaged over the site's weights and the draws.

Part 2, LoRA: the same model with frozen base weights and rank-8 adapters on every projection
(``B(A(x)) * 2``, B initialised non-zero as after some training). Saved for backward, step
time and the lora_B gradient's cosine with B's input compressed against left exact (the
``lora_b`` check switched off with :func:`pamm_fx.passes.checks.disabled`).

    python benchmarks/grad_direction.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, demo_config, machine, markdown_table, parse_common_args, write_json  # noqa: E402

from pamm_fx.demo.data import batches, byte_dataset  # noqa: E402
from pamm_fx.demo.llama import Llama  # noqa: E402
from pamm_fx.demo.measure import saved_for_backward  # noqa: E402
from pamm_fx.passes import checks  # noqa: E402

OUT = RESULTS / "grad_direction"
SITE_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "attn_out", "gate_proj": "mlp_up",
           "up_proj": "mlp_up", "down_proj": "mlp_down", "lm_head": "head"}


def site(name: str) -> str:
    return next((s for key, s in SITE_OF.items() if key in name), "other")


def gradients(model: nn.Module, fn: Callable[..., torch.Tensor], t: torch.Tensor, y: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn(t, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.dim() == 2}


def compare(exact: dict[str, torch.Tensor], approx: dict[str, torch.Tensor], key: Callable[[str], str]
            ) -> dict[str, tuple[float, float]]:
    """Per key: (mean cosine, mean relative error) over the weights of that key."""
    cos: dict[str, list[float]] = defaultdict(list)
    err: dict[str, list[float]] = defaultdict(list)
    for n, g in exact.items():
        a = approx[n]
        cos[key(n)].append(float(torch.nn.functional.cosine_similarity(a.flatten(), g.flatten(), dim=0)))
        err[key(n)].append(float((a - g).norm() / g.norm().clamp_min(1e-30)))
    return {k: (statistics.fmean(cos[k]), statistics.fmean(err[k])) for k in cos}


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable rank-r adapter ``B(A(x)) * scale`` (peft's layout)."""

    def __init__(self, base: nn.Linear, rank: int = 8, scale: float = 2.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.02)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def add_lora(model: Llama) -> Llama:
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                setattr(mod, name, LoRALinear(child))
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=100, help="plain training steps before measuring")
    p.add_argument("--draws", type=int, default=3)
    args = parse_common_args(p, OUT)
    train, _ = byte_dataset()
    torch.manual_seed(0)
    model = Llama(demo_config(256, 4))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    for i in range(args.train):
        t, y = batches(train, 8, 256, gen)
        model(t, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % 25 == 0:
            print(f"  plain training step {i + 1}/{args.train} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t, y = batches(train, 8, 256, gen)
    exact = gradients(model, model, t, y)
    result: dict[str, object] = {"machine": machine(), "train_steps": args.train, "sites": {}, "lora": {}}
    rows = []
    for mg in (16, 64, 256, 1024):
        torch._dynamo.reset()
        c = copy.deepcopy(model)
        fn = torch.compile(c, backend="pamm", options={"targets": "all", "min_generators": mg})
        per: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for _ in range(args.draws):
            for k, v in compare(exact, gradients(c, fn, t, y), site).items():
                per[k].append(v)
        stats = {k: (statistics.fmean(a for a, _ in v), statistics.fmean(e for _, e in v)) for k, v in per.items()}
        result["sites"][mg] = stats
        rows.append([f"k = {mg}", *(f"{stats[s][0]:.3f} / {stats[s][1]:.2f}" for s in dict.fromkeys(SITE_OF.values()))])
        print(rows[-1], flush=True)
    print(f"\n### gradient fidelity per site after {args.train} plain steps: cosine / relative error (b = 2048)\n")
    print(markdown_table(["k", *dict.fromkeys(SITE_OF.values())], rows))

    lora_rows = []
    base = add_lora(copy.deepcopy(model))
    lora_exact = gradients(base, base, t, y)
    for label, off in (("lora_B exact (the default)", ()), ("lora_B compressed", ("lora_b",))):
        torch._dynamo.reset()
        c = copy.deepcopy(base)
        with checks.disabled(*off):
            fn = torch.compile(c, backend="pamm", options={"targets": "all"})
            saved = saved_for_backward(lambda fn=fn: fn(t, y), c).nbytes
            per = defaultdict(list)
            for _ in range(args.draws):
                for k, v in compare(lora_exact, gradients(c, fn, t, y), lambda n: n.rsplit(".", 2)[-2]).items():
                    per[k].append(v)
            times = []
            for _ in range(5):
                s = time.perf_counter()
                gradients(c, fn, t, y)
                times.append(time.perf_counter() - s)
        stats = {k: (statistics.fmean(a for a, _ in v), statistics.fmean(e for _, e in v)) for k, v in per.items()}
        result["lora"][label] = {"saved_bytes": saved, "step_s": times, "grad": stats}
        lora_rows.append([label, f"{saved / 2**20:.2f}", f"{statistics.median(times) * 1e3:.0f}",
                          f"{stats['lora_a'][0]:.3f} / {stats['lora_a'][1]:.2f}",
                          f"{stats['lora_b'][0]:.3f} / {stats['lora_b'][1]:.2f}"])
    plain_saved = saved_for_backward(lambda: base(t, y), base).nbytes
    print(f"\n### LoRA r=8 on every projection, targets='all' (eager plain saves {plain_saved / 2**20:.2f} MiB)\n")
    print(markdown_table(["variant", "saved MiB", "step ms (median of 5)", "lora_A cos / rel err",
                          "lora_B cos / rel err"], lora_rows))
    result["lora"]["eager plain saved_bytes"] = plain_saved
    write_json(args.out / "grad_direction.json", result)


if __name__ == "__main__":
    main()
