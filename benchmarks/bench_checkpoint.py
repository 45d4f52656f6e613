"""Activation checkpointing and pamm: plain ``torch.compile`` vs ``backend="pamm"`` under each AC mode.

For each AC mode every variant trains the same model from the same initial weights on the
same batches (the demo's stdlib-docstring bytes), interleaved step by step in one process;
each step is forward + backward + AdamW. AC modes:

- ``none``: no activation checkpointing;
- ``full``: ``torch.utils.checkpoint(block, use_reentrant=False)`` around every block;
- ``sac``: the same with ``context_fn=create_selective_checkpoint_contexts(policy)`` and a
  torchtitan-like op-level policy (torchtitan 0.3.0 ``SelectiveAC``): save the outputs of
  compute-intensive ops (mm, addmm, bmm, SDPA, including CPU's flash kernel) except every second
  mm, recompute everything else;
- ``budget``: no explicit checkpoint, ``torch._functorch.config.activation_memory_budget = 0.5``
  while compiling (torchtitan's ``memory-budget`` mode).

Variants: plain Inductor; ``backend="pamm"`` with targets ``qkv`` and ``all`` (default options,
and ``all`` with ``min_generators=16``); and, under full and selective AC, a hand-written
prototype of "pamm inside the checkpointed region" (``inside ...``): the block calls
``torch.ops.pamm.compress`` / ``torch.ops.pamm.linear_group`` itself, inside the checkpointed
function, exactly as the backend's rewrite would, and is compiled with the pamm backend (which
then rewrites only what lies outside the regions, the LM head under ``targets="all"``).

Reported per variant: bytes saved for backward (``saved_tensors_hooks``, parameters excluded),
median step time (after warm-up; steps interleaved, order rotating) and its ratio to plain of
the same AC mode, train loss (mean of the last 5 steps) and validation loss after the run, and
what the backend rewrote (groups; linears refused as ``checkpointed``).

``--hf`` runs the same comparison on a transformers ``LlamaForCausalLM`` built from a config
(no download), without and with ``model.gradient_checkpointing_enable()``.

One JSON per AC mode in ``benchmarks/results/checkpoint/`` (``--force`` reruns); the tables
are rebuilt from all result files::

    python benchmarks/bench_checkpoint.py --threads 1 [--modes none,full,sac,budget] [--hf] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import pamm_fx.ops  # noqa: F401  (registers torch.ops.pamm)
from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Block, Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.testing import capture_rewrites

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    compile_fresh,
    demo_config,
    machine,
    markdown_table,
    parse_common_args,
    read_json,
    run_resumable,
)

OUT = RESULTS / "checkpoint"
MODES = ["none", "full", "sac", "budget"]
HF_MODES = ["hf-none", "hf-gc"]


# --- the selective policy (torchtitan 0.3.0 SelectiveAC, without its MoE/CUDA special cases) ----------

def _save_ops() -> set:
    from torch._functorch.partitioners import get_default_op_list

    ops = {op.default for op in get_default_op_list().compute_intensive_ops}
    ops |= {torch.ops.aten.linear.default, torch.ops.aten._scaled_dot_product_attention_math.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
    return ops


SAVE_OPS = _save_ops()
MM_OPS = (torch.ops.aten.mm.default, torch.ops.aten.linear.default)


def sac_context() -> Any:
    """torchtitan's op-level SAC: save compute-intensive outputs, but recompute every second mm."""
    count = {"forward": 0, "recompute": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        key = "recompute" if ctx.is_recompute else "forward"
        if func in MM_OPS:
            count[key] += 1
        if func in SAVE_OPS:
            if func in MM_OPS and count[key] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


# --- the model: the demo Llama's modules, with optional checkpoint wrappers and a pamm-inside prototype ---

@dataclass(frozen=True)
class Compression:
    """k = num_generators(b, ratio, min_generators, min_tokens), as the backend computes it."""

    ratio: Fraction = Fraction(1, 64)
    min_generators: int = 256
    min_tokens: int = 128


def _pamm_linears(x: Tensor, weights: list[Tensor], seed: Tensor, salt: int, c: Compression) -> list[Tensor]:
    """What the backend's rewrite emits for one group: compress(detach(X)) then linear_group."""
    cc, f, alpha = torch.ops.pamm.compress(x.detach(), seed, c.ratio.numerator, c.ratio.denominator,
                                           c.min_generators, c.min_tokens, float("inf"), salt)
    return torch.ops.pamm.linear_group(x, weights, [], [False] * len(weights), cc, f, alpha)


class InsideBlock(nn.Module):
    """The demo Block's forward with its projections as pamm ops (``targets`` "qkv" or "all")."""

    def __init__(self, block: Block, layer: int, targets: str, comp: Compression) -> None:
        super().__init__()
        self.block, self.layer, self.targets, self.comp = block, layer, targets, comp

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seed: Tensor) -> Tensor:
        a, mlp, salt = self.block.self_attn, self.block.mlp, 100 * (self.layer + 1)
        h = self.block.input_norm(x)
        q, k, v = _pamm_linears(h, [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], seed, salt, self.comp)
        o = a.attend(q, k, v, cos, sin)
        if self.targets == "all":
            (o,) = _pamm_linears(o, [a.o_proj.weight], seed, salt + 1, self.comp)
            x = x + o
            h = self.block.post_attention_norm(x)
            g, u = _pamm_linears(h, [mlp.gate_proj.weight, mlp.up_proj.weight], seed, salt + 2, self.comp)
            (d,) = _pamm_linears(F.silu(g) * u, [mlp.down_proj.weight], seed, salt + 3, self.comp)
            return x + d
        x = x + a.o_proj(o)
        return x + mlp(self.block.post_attention_norm(x))


class Layer(nn.Module):
    """One block, optionally under torch.utils.checkpoint (``ac`` "full" or "sac")."""

    def __init__(self, block: nn.Module, ac: str) -> None:
        super().__init__()
        self.block, self.ac = block, ac

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seed: Tensor) -> Tensor:
        args = (x, cos, sin, seed) if isinstance(self.block, InsideBlock) else (x, cos, sin)
        if self.ac == "full":
            return checkpoint(self.block, *args, use_reentrant=False)
        if self.ac == "sac":
            return checkpoint(self.block, *args, use_reentrant=False, context_fn=sac_context)
        return self.block(*args)


class Net(nn.Module):
    """The demo Llama's forward (shared modules) with per-block AC and an optional pamm-inside prototype."""

    def __init__(self, base: Llama, ac: str, inside: str | None, comp: Compression) -> None:
        super().__init__()
        self.embed, self.norm, self.lm_head = base.embed, base.norm, base.lm_head
        blocks = [InsideBlock(b, i, inside, comp) if inside else b for i, b in enumerate(base.layers)]
        self.layers = nn.ModuleList(Layer(b, ac) for b in blocks)
        self.register_buffer("rope_cos", base.rope_cos, persistent=False)
        self.register_buffer("rope_sin", base.rope_sin, persistent=False)

    def forward(self, tokens: Tensor, targets: Tensor, seed: Tensor) -> Tensor:
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, seed)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# --- variants ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    backend: str = "inductor"
    options: dict[str, Any] = field(default_factory=dict)
    inside: str | None = None  # prototype: pamm ops inside the checkpointed block ("qkv" or "all")


PAMM_VARIANTS = [
    Variant("plain"),
    Variant("pamm qkv", "pamm", {"targets": "qkv"}),
    Variant("pamm all", "pamm", {"targets": "all"}),
    Variant("pamm all mg16", "pamm", {"targets": "all", "min_generators": 16}),
]
INSIDE_VARIANTS = [
    Variant("inside qkv", "pamm", {"targets": "qkv"}, "qkv"),
    Variant("inside all mg16", "pamm", {"targets": "all", "min_generators": 16}, "all"),
]


def variants_for(mode: str) -> list[Variant]:
    return PAMM_VARIANTS + (INSIDE_VARIANTS if mode in ("full", "sac") else [])


def rewrite_summary(records: list[Any]) -> dict[str, Any]:
    """Groups the backend rewrote and linears it left exact, by category, over all captured graphs."""
    groups = [", ".join(p.weight_name.rsplit(".", 2)[-2] for p in g.projections)
              for r in records for g in r.plan.groups]
    cats = Counter(rej.category for r in records for rej in r.plan.rejections)
    reasons = {rej.category: rej.reason for r in records for rej in r.plan.rejections}
    return {"graphs": len(records), "groups": len(groups), "group_members": dict(Counter(groups)),
            "rejections": dict(cats), "reasons": reasons}


def saved_summary(tensors: list[tuple[tuple[int, ...], torch.dtype, int]], b: int, dims: dict[str, int]) -> dict:
    """Saved tensors grouped by their last dimension for b-row tensors (what kind of activation), else 'other'."""
    out: Counter = Counter()
    for shape, dtype, nbytes in tensors:
        rows = 1
        for s in shape[:-1]:
            rows *= s
        if shape and rows == b:
            kind = next((k for k, d in dims.items() if d == shape[-1]), f"b x {shape[-1]}")
            out[f"{kind} {str(dtype).replace('torch.', '')}"] += nbytes
        elif len(shape) == 4:  # attention (batch, heads, seq, head_dim) or logsumexp
            out["attention 4-D"] += nbytes
        else:
            out[f"other {str(dtype).replace('torch.', '')}"] += nbytes
    return dict(out)


# --- one AC mode ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    variant: Variant
    model: nn.Module
    fn: Callable[..., Tensor]
    opt: torch.optim.Optimizer
    seed_gen: torch.Generator
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _build_demo(mode: str, v: Variant, base: Llama, tag: str) -> tuple[nn.Module, Callable[..., Tensor]]:
    comp = Compression(min_generators=v.options.get("min_generators", 256))
    ac = mode if mode in ("full", "sac") else "none"
    model = Net(copy.deepcopy(base), ac, v.inside, comp)

    def run(tokens: Tensor, targets: Tensor, seed: Tensor) -> Tensor:
        return model(tokens, targets, seed)

    opts = dict(v.options, seed=0) if v.backend == "pamm" else None
    return model, compile_fresh(run, tag, v.backend, opts)


def _hf_llama(cfg: LlamaConfig) -> nn.Module:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, attention_dropout=0.0, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_cfg)


def _build_hf(mode: str, v: Variant, base: nn.Module, tag: str) -> tuple[nn.Module, Callable[..., Tensor]]:
    model = copy.deepcopy(base).train()
    if mode == "hf-gc":
        model.gradient_checkpointing_enable()

    def run(tokens: Tensor, targets: Tensor, seed: Tensor) -> Tensor:
        return model(input_ids=tokens, labels=targets).loss

    opts = dict(v.options, seed=0) if v.backend == "pamm" else None
    return model, compile_fresh(run, tag, v.backend, opts)


@torch.no_grad()
def _val_loss(r: Run, val: Tensor, batch: int, seq: int, hf: bool) -> float:
    gen = torch.Generator().manual_seed(1234)
    r.model.eval()
    losses = []
    for _ in range(4):
        x, y = batches(val, batch, seq, gen)
        if hf:  # HF shifts labels itself: give it the inputs as labels
            losses.append(r.model(input_ids=x, labels=x).loss.item())
        else:
            losses.append(r.model(x, y, torch.zeros((), dtype=torch.int64)).item())
    r.model.train()
    return sum(losses) / len(losses)


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    hf = mode.startswith("hf")
    cfg = demo_config(args.dim, args.layers, max_seq_len=args.seq)
    torch.manual_seed(0)
    base = _hf_llama(cfg) if hf else Llama(cfg)
    variants = PAMM_VARIANTS if hf else variants_for(mode)
    if args.variants:
        variants = [v for v in variants if v.name in args.variants.split(",")]
    train, val = byte_dataset()
    b = args.batch * args.seq
    dims = {"b x dim": cfg.dim, "b x hidden": cfg.hidden_dim, "b x vocab": cfg.vocab_size,
            "b x kv": cfg.dim * cfg.n_kv_heads // cfg.n_heads}
    runs: list[Run] = []
    for i, v in enumerate(variants):
        build = _build_hf if hf else _build_demo
        model, fn = build(mode, v, base, f"{mode.replace('-', '_')}_{i}")
        runs.append(Run(v, model, fn, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.Generator().manual_seed(7)))
    data_gen = torch.Generator().manual_seed(0)
    budget = {"activation_memory_budget": 0.5} if mode == "budget" else {}
    for step in range(args.steps):
        tokens, targets = batches(train, args.batch, args.seq, data_gen)
        if hf:
            targets = tokens  # HF's loss shifts the labels
        order = runs[step % len(runs):] + runs[: step % len(runs)]
        for r in order:
            seed = torch.randint(0, 2**62, (), generator=r.seed_gen, dtype=torch.int64)
            t0 = time.perf_counter()
            if step == 0:
                with capture_rewrites() as records, torch._functorch.config.patch(**budget):
                    loss = r.fn(tokens, targets, seed)
                    loss.backward()
                r.info["compile_s"] = time.perf_counter() - t0
                r.info["rewrites"] = rewrite_summary(records)
            elif step == args.warmup:  # measure what one (compiled, warm) forward saves
                m = saved_for_backward(lambda r=r, s=seed, x=tokens, y=targets: r.fn(x, y, s), r.model)
                loss = m.output
                r.info["saved_bytes"] = m.nbytes
                r.info["saved_kinds"] = saved_summary(m.tensors, b, dims)
                r.info["saved_tensors"] = [[list(s), str(d), n] for s, d, n in m.tensors]
                loss.backward()
            else:
                loss = r.fn(tokens, targets, seed)
                loss.backward()
            r.opt.step()
            r.opt.zero_grad(set_to_none=True)
            r.times.append(time.perf_counter() - t0)
            r.losses.append(loss.item())
        if step == 0 or (step + 1) % 5 == 0 or step + 1 == args.steps:
            line = "  ".join(f"{r.variant.name}={r.losses[-1]:.3f}/{r.times[-1] * 1e3:.0f}ms" for r in runs)
            print(f"  step {step + 1}/{args.steps}: {line}", flush=True)
    results = {}
    for r in runs:
        timed = [t for i, t in enumerate(r.times) if i > args.warmup]  # the saved-bytes step is not timed
        results[r.variant.name] = {
            "variant": {"backend": r.variant.backend, "options": r.variant.options, "inside": r.variant.inside},
            **r.info, "step_s": r.times, "median_s": statistics.median(timed), "losses": r.losses,
            "train_loss_last5": sum(r.losses[-5:]) / len(r.losses[-5:]),
            "val_loss": _val_loss(r, val, args.batch, args.seq, hf),
        }
        print(f"  {r.variant.name}: compile {r.info['compile_s']:.0f} s, saved {r.info['saved_bytes'] / 2**20:.2f} "
              f"MiB, median {results[r.variant.name]['median_s'] * 1e3:.0f} ms, groups "
              f"{r.info['rewrites']['groups']}, refused {r.info['rewrites']['rejections']}", flush=True)
    return {"mode": mode, "shape": {"dim": args.dim, "layers": args.layers, "batch": args.batch, "seq": args.seq,
                                    "tokens": b, "dtype": "fp32"},
            "params": sum(p.numel() for p in base.parameters()), "steps": args.steps, "warmup": args.warmup,
            "variants": results, "machine": machine()}


# --- report ----------------------------------------------------------------------------------------------------

MODE_TITLES = {
    "none": "no AC", "full": "full AC (checkpoint per block)", "sac": "selective AC (op-level, torchtitan policy)",
    "budget": "activation_memory_budget=0.5", "hf-none": "HF Llama, no AC",
    "hf-gc": "HF Llama, gradient_checkpointing_enable()",
}


def _rewrites(r: dict[str, Any], layers: int) -> str:
    rw = r.get("rewrites", {})
    if r["variant"]["backend"] != "pamm":
        return "-"
    text = f"{rw.get('groups', 0)} groups"
    if r["variant"].get("inside"):
        text += f" (+ {layers} layers x " + ("1" if r["variant"]["inside"] == "qkv" else "4") + " by hand, inside)"
    ck = rw.get("rejections", {}).get("checkpointed")
    if ck:
        text += f"; {ck} checkpointed"
    return text


def report(out: Path = OUT) -> str:
    files = sorted(out.glob("*.json"), key=lambda p: (MODES + HF_MODES).index(p.stem) if p.stem in MODES + HF_MODES
                   else 99)
    if not files:
        print("no results yet")
        return ""
    data = [read_json(p) for p in files]
    plain_none = {d["mode"].split("-")[0] if d["mode"].startswith("hf") else "": d["variants"].get("plain")
                  for d in data if d["mode"] in ("none", "hf-none")}
    rows = []
    for d in data:
        base = d["variants"].get("plain", {})
        ref = plain_none.get("hf" if d["mode"].startswith("hf") else "") or base
        for name, r in d["variants"].items():
            saved = r["saved_bytes"]
            rows.append([
                MODE_TITLES.get(d["mode"], d["mode"]), name, f"{saved / 2**20:.2f}",
                f"{saved / base['saved_bytes'] - 1:+.1%}" if name != "plain" else "-",
                f"{saved / ref['saved_bytes'] - 1:+.1%}" if ref else "-",
                f"{r['median_s'] * 1e3:.0f}", f"{r['median_s'] / base['median_s']:.3f}x" if name != "plain" else "-",
                f"{r['train_loss_last5']:.4f}", f"{r['val_loss']:.4f}", _rewrites(r, d["shape"]["layers"]),
            ])
    m = data[0]["machine"]
    sh = data[0]["shape"]
    head = (f"{sh['dim']}-dim, {sh['layers']} layers, {sh['batch']}x{sh['seq']} = {sh['tokens']} tokens/step, "
            f"{sh['dtype']}; {data[0]['steps']} AdamW steps (lr 1e-3), median step time over steps "
            f"{data[0]['warmup'] + 2}-{data[0]['steps']}; {m['nproc']}-core CPU ({m['cpu']}), "
            f"{m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}")
    table = markdown_table(["AC mode", "variant", "saved MiB", "vs plain (same AC)", "vs plain no AC",
                            "step ms", "time vs plain (same AC)", "train loss (last 5)", "val loss",
                            "pamm rewrote"], rows)
    text = head + "\n\n" + table
    print(text)
    (out / "table.md").write_text(text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"AC modes: {','.join(MODES + HF_MODES)}")
    p.add_argument("--hf", action="store_true", help="also run the HF modes (hf-none, hf-gc)")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (compile included)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--force", action="store_true", help="rerun modes that have results")
    args = parse_common_args(p, OUT)
    modes = args.modes.split(",") + (HF_MODES if args.hf else [])

    def run(mode: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        torch._dynamo.reset()
        result = run_mode(mode, args)
        torch._dynamo.reset()
        gc.collect()
        result["bench_wall_s"] = time.perf_counter() - t0
        return result

    if not args.report_only:
        run_resumable(modes, args.out, run, lambda r: f"{r['bench_wall_s']:.0f} s", force=args.force)
    report(args.out)


if __name__ == "__main__":
    main()
