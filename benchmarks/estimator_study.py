"""Issue 19: which weight-gradient estimator holds plain's quality, on an eager prototype.

DUPLICATES LIBRARY MATH: the prototype re-implements in eager PyTorch what pamm_fx implements for the backend
(PAMM's k and dW = B~^T C, the low-bit format with stochastic rounding of X or of PAMM's residual:
``pamm_fx/estimators.py``, ``pamm_fx/ops/``, ``pamm_fx/kernels/lowbit.py``). A change to the library does not
reach this script; its numbers are the prototype's (docs/estimator_study.md).

Every nn.Linear of the demo's LLaMA-style model (q, k, v, o, gate, up, down, LM head; or only
q/k/v) is routed through :class:`_EstimatedLinear`, an autograd.Function that computes the exact
forward and exact dX, but saves only what an estimator keeps of X and forms dW from it. Projections
of the same X (q/k/v, gate/up) share one compression, as the backend does. No torch.compile: compile
time would eat a 2-core budget, and PAMM changes only the weight gradients, so eager is the same math.

Estimators (``--runs`` labels ``<estimator>[-qkv]-b<2|8>k-s<seed>``; all sites unless ``-qkv``):

- ``exact``: plain (saves X).
- ``pamm``: the paper; k = max(256, b/64) generators drawn uniformly (pamm_fx.ops.sample_generators),
  nearest by |cos|, alpha scale (pamm_fx.kernels.assign.reference); dW = B~^T C. Biased.
- ``pamm-r8`` / ``pamm-r4``: the same with k = b/8 / b/4 (k scaled with b).
- ``d2``: PAMM with D^2 (k-means++-style) seeding in 4 rounds of k/4 rows (each round draws rows
  with probability ~ the squared residual left by the generators chosen so far). Biased.
- ``rows``: PAMM + s = 256 residual rows, Poisson-sampled with pi_i = min(1, c ||R_i||), sum pi = s
  (rows with pi = 1 are kept deterministically, WTA-CRS style); dW += sum (1/pi_i) dY_i^T R_i. Unbiased.
- ``sketch``: PAMM + a count-sketch of the residual along tokens: s = 256 hashed buckets with random
  signs, regenerated from a saved seed in backward; dW += (S dY)^T (S R). Unbiased, no rescaling.
- ``sr2`` / ``sr4``: PAMM + R stored at 2 / 4 bits, per-row min/max, stochastic rounding; dW += dY^T deq(q(R)).
  Unbiased. ``sr2-only`` / ``sr4-only`` / ``sr8-only``: no PAMM, X itself quantised (ActNN-style). Unbiased.
- ``mix8`` / ``mix4``: per site (item e): ``pamm`` at q/k/v, ``sr8-only`` / ``sr4-only`` at every other linear;
  ``mix84``: ``pamm`` at q/k/v, ``sr4-only`` at the MLP down-projection, ``sr8-only`` elsewhere; ``sr84``: the same
  without PAMM (``sr8-only`` at q/k/v too).

Bytes saved for backward are counted per row against X in fp32 (C fp32, f int32, alpha fp32, residual
payload at its bit width, fp32 scales, row indices int32 and 1/pi fp32), over the compressed groups.

Protocol: for each seed, every estimator starts from the same initial weights and sees the same batches
as the exact run of that seed (the estimators draw from their own generator, never the global RNG);
the final validation loss is over the whole held-out split. The report gives the mean paired difference
to exact and its spread over seeds, next to exact's own seed-to-seed spread.

    python benchmarks/estimator_study.py --check            # smoke run + unbiasedness check
    python benchmarks/estimator_study.py --runs exact-b2k-s0,pamm-b2k-s0,...   # resumable
    python benchmarks/estimator_study.py --report-only
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    DOCS,
    RESULTS,
    machine,
    markdown_table,
    parse_common_args,
    read_json,
    run_resumable,
    write_json,
)
from torch import Tensor

from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.kernels.assign import reference as assign
from pamm_fx.ops import sample_generators

OUT = RESULTS / "estimator_study"


class Estimator:
    """What is kept of X (b x n) in forward, and dW (m x n) from it and dY (b x m) in backward."""

    def __init__(self, name: str, gen: torch.Generator) -> None:
        self.name = name
        self.gen = gen
        base = name.removesuffix("-only")
        self.only = name.endswith("-only")
        self.kind = "sr" if base.startswith("sr") else base.split("-")[0]
        self.bits = int(base[2:]) if self.kind == "sr" else 0
        self.k_div = int(base.split("-r")[1]) if "-r" in base else 0
        self.s = 256
        #: (payload bytes, X fp32 bytes), summed over the compressions of the step being counted
        self.count: list[float] | None = None
        #: (salt, X, dY) of every exact weight gradient, when recording (the gradient-quality check)
        self.record: list[tuple[int, Tensor, Tensor]] | None = None

    def k(self, b: int) -> int:
        return min(b, b // self.k_div if self.k_div else max(256, math.ceil(b / 64)))

    def _rand_seed(self) -> Tensor:
        return torch.randint(0, 2**62, (), generator=self.gen, dtype=torch.int64)

    def _pamm(self, x: Tensor, salt: int) -> tuple[Tensor, Tensor, Tensor]:
        b = x.shape[0]
        k = self.k(b)
        if self.kind == "d2":
            c = self._d2_generators(x, k)
        else:
            c = x[sample_generators(b, k, self._rand_seed(), salt)]
        f, alpha = assign(x, c)
        return c, f, alpha

    def _d2_generators(self, x: Tensor, k: int, rounds: int = 4) -> Tensor:
        """k rows in ``rounds`` batches, each drawn ~ the squared residual left by the rows chosen so far."""
        d2 = (x * x).sum(1)
        chosen: list[Tensor] = []
        for r in range(rounds):
            m = k // rounds + (k % rounds if r == rounds - 1 else 0)
            w = d2.clamp_min(0)
            if chosen:
                w[torch.cat(chosen)] = 0
            if float(w.sum()) <= 0:
                w = torch.ones_like(w)
                if chosen:
                    w[torch.cat(chosen)] = 0
            idx = torch.multinomial(w, m, replacement=False, generator=self.gen)
            chosen.append(idx)
            c = x[idx]
            cn = c / torch.linalg.vector_norm(c, dim=1, keepdim=True).clamp_min(1e-30)
            best = (x @ cn.T).abs().amax(1)
            d2 = torch.minimum(d2, (x * x).sum(1) - best * best)
        return x[torch.cat(chosen).sort().values]

    def compress(self, x: Tensor, salt: int) -> tuple[Any, ...]:
        """The saved payload for X (b x n, fp32); counts its bytes when counting is on."""
        b, n = x.shape
        x = x.detach()
        if self.kind == "exact":
            self._add(4.0 * b * n, b, n)
            return (x, salt)
        if self.only:
            q, lo, scale = self._quant(x)
            self._add(b * (n * self.bits / 8 + 8), b, n)
            return (None, q, lo, scale)
        c, f, alpha = self._pamm(x, salt)
        nbytes = c.shape[0] * n * 4.0 + b * 8
        if self.kind in ("pamm", "d2") or c.shape[0] == b:
            self._add(nbytes, b, n)
            return ((c, f, alpha),)
        r = x - alpha[:, None] * c[f.long()]
        if self.kind == "rows":
            pi = _inclusion(torch.linalg.vector_norm(r, dim=1), self.s)
            keep = (torch.rand(b, generator=self.gen) < pi).nonzero().squeeze(1)
            self._add(nbytes + keep.numel() * (4.0 * n + 8), b, n)
            return ((c, f, alpha), keep, r[keep], 1.0 / pi[keep])
        if self.kind == "sketch":
            seed = int(self._rand_seed())
            h, sign = _hash(b, self.s, seed)
            sr = torch.zeros(self.s, n).index_add_(0, h, r * sign[:, None])
            self._add(nbytes + self.s * n * 4.0 + 8, b, n)
            return ((c, f, alpha), seed, sr)
        if self.kind == "sr":
            q, lo, scale = self._quant(r)
            self._add(nbytes + b * (n * self.bits / 8 + 8), b, n)
            return ((c, f, alpha), q, lo, scale)
        raise ValueError(self.name)

    def grad_w(self, payload: tuple[Any, ...], dy: Tensor) -> Tensor:
        if self.kind == "exact":
            if self.record is not None:
                self.record.append((payload[1], payload[0], dy.detach()))
            return dy.T @ payload[0]
        pamm = payload[0]
        if pamm is None:  # srN-only
            return dy.T @ _dequant(*payload[1:])
        c, f, alpha = pamm
        bt = torch.zeros(c.shape[0], dy.shape[1]).index_add_(0, f.long(), dy * alpha[:, None])
        dw = bt.T @ c
        if len(payload) == 1:
            return dw
        if self.kind == "rows":
            keep, r, inv_pi = payload[1:]
            return dw + (dy[keep] * inv_pi[:, None]).T @ r
        if self.kind == "sketch":
            seed, sr = payload[1:]
            h, sign = _hash(dy.shape[0], self.s, seed)
            sdy = torch.zeros(self.s, dy.shape[1]).index_add_(0, h, dy * sign[:, None])
            return dw + sdy.T @ sr
        return dw + dy.T @ _dequant(*payload[1:])

    def _quant(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row min/max scaling to 2^bits - 1 levels, stochastic rounding (E[deq(q(r))] = r)."""
        levels = 2**self.bits - 1
        lo = r.amin(1, keepdim=True)
        scale = (r.amax(1, keepdim=True) - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        u = torch.rand(r.shape, generator=self.gen)
        q = torch.floor((r - lo) / scale + u).clamp_(0, levels).to(torch.uint8)
        return q, lo, scale

    def _add(self, nbytes: float, b: int, n: int) -> None:
        if self.count is not None:
            self.count[0] += nbytes
            self.count[1] += 4.0 * b * n


def _dequant(q: Tensor, lo: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale + lo


def _inclusion(norms: Tensor, s: int) -> Tensor:
    """pi_i = min(1, c * norms_i) with sum pi = min(s, #nonzero) (water-filling: the largest are certain)."""
    pi = torch.zeros_like(norms)
    free = norms > 0
    budget = float(min(s, int(free.sum())))
    for _ in range(64):
        if budget <= 0 or not free.any():
            break
        p = norms * free * (budget / float((norms * free).sum()))
        over = free & (p >= 1)
        if not over.any():
            pi = torch.where(free, p, pi)
            break
        pi[over] = 1.0
        free &= ~over
        budget -= float(over.sum())
    return pi


def _hash(b: int, s: int, seed: int) -> tuple[Tensor, Tensor]:
    """Bucket and sign of each of b rows, regenerated from ``seed`` (nothing per row is stored)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, s, (b,), generator=g)
    sign = torch.randint(0, 2, (b,), generator=g).float() * 2 - 1
    return h, sign


class _EstimatedLinear(torch.autograd.Function):
    """y = x @ w.T with exact forward and dX; dW from what ``est`` saved of x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, est: Estimator, salt: int) -> Tensor:
        ctx.payload = est.compress(x.reshape(-1, x.shape[-1]), salt)
        ctx.est = est
        ctx.save_for_backward(w)
        return x @ w.T

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        (w,) = ctx.saved_tensors
        dw = ctx.est.grad_w(ctx.payload, gy.reshape(-1, gy.shape[-1]))
        ctx.payload = None
        return gy @ w, dw, None, None


def _group(x: Tensor, linears: list[torch.nn.Linear], est: Estimator | None, salt: int) -> list[Tensor]:
    """The outputs of linears that read the same x, with one compression for all of them."""
    if est is None:
        return [F.linear(x, lin.weight) for lin in linears]
    w = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
    y = _EstimatedLinear.apply(x, w, est, salt)
    return list(y.split([lin.weight.shape[0] for lin in linears], dim=-1))


#: per-site estimators (item e), (q/k/v, other linears, MLP down-projection): ``mixN`` keeps PAMM
#: (k = max(256, b/64)) at q/k/v and X at N bits elsewhere; ``mix84`` X at 4 bits at the down-projection;
#: ``sr84``: no PAMM, X at 8 bits, 4 at the down-projection.
MIXES = {"mix8": ("pamm", "sr8-only", "sr8-only"), "mix4": ("pamm", "sr4-only", "sr4-only"),
         "mix84": ("pamm", "sr8-only", "sr4-only"), "sr84": ("sr8-only", "sr8-only", "sr4-only")}


def estimators(name: str, gen: torch.Generator) -> tuple[Estimator, Estimator, Estimator]:
    """The estimators of the q/k/v groups, of the other linears and of the down-projection (one unless ``mix*``)."""
    if name in MIXES:
        qkv, other, down = (Estimator(n, gen) for n in MIXES[name])
        other.k = down.k = qkv.k  # type: ignore[method-assign]  # the run's k is its PAMM sites'
        return qkv, other, down
    est = Estimator(name, gen)
    return est, est, est


def install(model: Llama, est: Estimator, qkv_only: bool, rest: Estimator | None = None,
            down: Estimator | None = None) -> None:
    """Route the model's linears through ``est`` at q/k/v, ``down`` at the MLP down-projection and ``rest`` at
    every other linear (both default to ``est``), or through nothing there under ``qkv_only``, by patching
    forwards."""
    other = None if qkv_only else (rest or est)
    down_est = None if qkv_only else (down or other)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp

        def attn_forward(self: Any, x: Tensor, cos: Tensor, sin: Tensor, i: int = i) -> Tensor:
            q, k, v = _group(x, [self.q_proj, self.k_proj, self.v_proj], est, 10 * i)
            return _group(self.attend(q, k, v, cos, sin), [self.o_proj], other, 10 * i + 1)[0]

        def mlp_forward(self: Any, x: Tensor, i: int = i) -> Tensor:
            gate, up = _group(x, [self.gate_proj, self.up_proj], other, 10 * i + 2)
            return _group(F.silu(gate) * up, [self.down_proj], down_est, 10 * i + 3)[0]

        attn.forward = types.MethodType(attn_forward, attn)
        mlp.forward = types.MethodType(mlp_forward, mlp)
    if not qkv_only:
        head = model.lm_head
        head.forward = lambda x: _group(x, [head], other, 999)[0]  # type: ignore[method-assign]


def parse_run(label: str) -> tuple[str, bool, int, int]:
    """``sr4-b2k-s0`` -> ("sr4", False, 2048, 0); ``pamm-qkv-b8k-s1`` -> ("pamm", True, 8192, 1)."""
    head, seed = label.rsplit("-s", 1)
    head, b = head.rsplit("-b", 1)
    qkv = head.endswith("-qkv")
    return head.removesuffix("-qkv"), qkv, int(b.removesuffix("k")) * 1024, int(seed)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def val_loss(model: Llama, val: Tensor, seq: int, windows: int | None = None, batch: int = 64) -> float:
    """Mean loss over fixed consecutive windows of the validation split (all of them by default)."""
    n = (len(val) - 1) // seq if windows is None else windows
    rows = val[: n * seq + 1]
    x, y = rows[:-1].view(n, seq).long(), rows[1:].view(n, seq).long()
    model.eval()
    total = sum(model(x[i : i + batch], y[i : i + batch]).item() * len(x[i : i + batch]) for i in range(0, n, batch))
    model.train()
    return total / n


def train_one(label: str, args: argparse.Namespace) -> dict[str, Any]:
    name, qkv_only, tokens, seed = parse_run(label)
    train, val = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(seed)
    model = Llama(cfg)
    est, rest, down = estimators(name, torch.Generator().manual_seed(seed + 1000))
    install(model, est, qkv_only, rest, down)  # exact too: the same code path, so only the estimator differs
    batch = tokens // args.seq
    scale = 2048 / tokens  # other batch sizes see the same tokens in total (train_quality.py's convention)
    steps, warmup, val_every = (max(1, round(v * scale)) for v in (args.steps, args.warmup, args.val_every))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed)  # the batches of this seed, the same for every estimator
    val_curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    saved = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, warmup)
        x, y = batches(train, batch, args.seq, gen)
        est.count = rest.count = down.count = [0.0, 0.0] if step == 0 else None
        loss = model(x, y)
        if step == 0:
            saved = list(est.count)  # type: ignore[arg-type]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{label}: loss {loss.item()} at step {step}")
        if (step + 1) % val_every == 0 or step + 1 == steps:
            val_curve.append((step + 1, val_loss(model, val, args.seq, windows=64)))
            print(f"  {label}: step {step + 1}/{steps} train {loss.item():.4f} val64 {val_curve[-1][1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    final = val_loss(model, val, args.seq)
    assert saved is not None
    return {
        "label": label, "estimator": name, "targets": "qkv" if qkv_only else "all", "seed": seed,
        "tokens_per_step": tokens, "k": est.k(tokens), "steps": steps,
        "payload_bytes": saved[0], "x_bytes": saved[1], "saved_fraction": saved[0] / saved[1],
        "final_val_loss": final, "val_curve": val_curve, "wall_s": time.perf_counter() - t0,
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(),
    }


# ----------------------------------------------------------------------------------------------- checks


def check_unbiased(draws: int = 300) -> None:
    """Mean of many dW draws vs exact, on structured X; and exactness when k = b."""
    g = torch.Generator().manual_seed(0)
    b, n, m = 1024, 64, 48
    basis = torch.randn(8, n, generator=g)
    x = torch.randn(b, 8, generator=g) @ basis + 0.3 * torch.randn(b, n, generator=g)
    dy = torch.randn(b, m, generator=g)
    exact = dy.T @ x
    names = ["pamm", "d2", "rows", "sketch", "sr2", "sr4", "sr2-only", "sr4-only"]
    rows = []
    for name in names:
        est = Estimator(name, torch.Generator().manual_seed(1))
        est.s = 64
        est.k_div = 16  # k = 64 of 1,024 rows
        ds = [est.grad_w(est.compress(x, 0), dy) for _ in range(draws)]
        mean = torch.stack(ds).mean(0)
        single = statistics.fmean(float((d - exact).norm() / exact.norm()) for d in ds)
        err = float((mean - exact).norm() / exact.norm())
        rows.append([name, f"{single:.4f}", f"{err:.4f}", f"{single / math.sqrt(draws):.4f}",
                     "unbiased" if err < 3 * single / math.sqrt(draws) else "BIASED"])
    print(f"relative error of dW (b={b}, n={n}, k=s=64, {draws} draws):")
    print(markdown_table(["estimator", "one draw", "mean of draws", "1 draw / sqrt(draws)", "verdict"], rows))
    for name in ["pamm", "rows", "sketch", "sr2", "d2"]:
        est = Estimator(name, torch.Generator().manual_seed(2))
        est.k_div = 1  # k = b
        err = float((est.grad_w(est.compress(x, 0), dy) - exact).norm() / exact.norm())
        print(f"k = b, {name}: relative error {err:.2e}")
        assert err < 1e-5, name


SITES = {0: "qkv", 1: "attn_out", 2: "mlp_up", 3: "mlp_down"}
GQ_NAMES = ["pamm", "pamm-r4", "d2", "rows", "sketch", "sr2", "sr4", "sr2-only", "sr4-only", "sr8-only"]


def grad_quality(args: argparse.Namespace, tokens: int = 2048, names: list[str] = GQ_NAMES, train_steps: int = 100,
                 draws: int = 16) -> None:
    """Bias and noise of each estimator's dW on real (X, dY) of the proxy after ``train_steps`` exact steps.

    The error of one draw, ||dW^ - dW|| / ||dW||, and of the mean of ``draws`` draws: an unbiased
    estimator's mean error falls as 1/sqrt(draws), a biased one's stays near its bias.
    """
    train, _ = byte_dataset()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, hidden_dim=int(args.dim * 2.6875))
    torch.manual_seed(0)
    model = Llama(cfg)
    est = Estimator("exact", torch.Generator().manual_seed(0))
    install(model, est, False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(0)
    for step in range(train_steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = batches(train, (2048 if step < train_steps else tokens) // args.seq, args.seq, gen)
        est.record = [] if step == train_steps else None
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    captured = est.record or []
    result: dict[str, dict[str, list[float]]] = {}
    for name in names:
        e = Estimator(name, torch.Generator().manual_seed(1))
        for salt, xs, dy in captured:
            exact = dy.T @ xs
            ds = [e.grad_w(e.compress(xs, salt), dy) for _ in range(draws)]
            one = statistics.fmean(float((d - exact).norm() / exact.norm()) for d in ds)
            mean = float((torch.stack(ds).mean(0) - exact).norm() / exact.norm())
            site = SITES.get(salt % 10, "head") if salt != 999 else "head"
            result.setdefault(name, {}).setdefault(site, []).append((one, mean))  # type: ignore[arg-type]
        print(f"  grad quality: {name} done", flush=True)
    sites = ["qkv", "attn_out", "mlp_up", "mlp_down", "head"]
    rows = [[name] + [
        "{:.3f} / {:.3f}".format(*(statistics.fmean(v[i] for v in result[name][site]) for i in (0, 1)))
        for site in sites] for name in names]
    print(f"relative error of dW at {tokens:,} tokens, one draw / mean of {draws} draws, after {train_steps} exact "
          "steps at 2,048 tokens:")
    print(markdown_table(["estimator", *sites], rows))
    write_json(OUT / "grad_quality" / f"grad_quality_b{tokens}.json",
               {"tokens": tokens, "train_steps": train_steps, "draws": draws, "result": result, "machine": machine()})


def smoke(args: argparse.Namespace) -> None:
    settings = argparse.Namespace(**{**vars(args), "steps": 20, "val_every": 20})
    for name in ["exact", "pamm", "rows", "sketch", "sr2", "sr4-only", "d2", "pamm-r8"]:
        r = train_one(f"{name}-b2k-s0", settings)
        print(f"smoke {name}: val {r['final_val_loss']:.4f}, saved fraction {r['saved_fraction']:.3f}, "
              f"{r['wall_s']:.1f} s / 20 steps")


# ----------------------------------------------------------------------------------------------- report


def load(out: Path) -> list[dict[str, Any]]:
    return [read_json(p) for p in sorted(out.glob("*.json"))]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (estimator, targets, tokens): paired differences to exact of the same seed."""
    base = {(r["seed"], r["tokens_per_step"]): r["final_val_loss"] for r in runs if r["estimator"] == "exact"}
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["estimator"], r["targets"], r["tokens_per_step"]), []).append(r)
    out = []
    for (name, targets, tokens), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        rs = sorted(rs, key=lambda r: r["seed"])
        paired = [(r["final_val_loss"] / base[(r["seed"], tokens)] - 1) * 100
                  for r in rs if (r["seed"], tokens) in base]
        losses = [r["final_val_loss"] for r in rs]
        out.append({
            "estimator": name, "targets": targets, "tokens": tokens, "k": rs[0]["k"],
            "seeds": [r["seed"] for r in rs], "losses": losses, "paired": paired,
            "saved_fraction": rs[0]["saved_fraction"], "min": statistics.fmean(r["wall_s"] for r in rs) / 60,
        })
    return out


def table(summary: list[dict[str, Any]]) -> str:
    rows = []
    for s in summary:
        paired, losses = s["paired"], s["losses"]
        spread = (max(losses) - min(losses)) / statistics.fmean(losses) * 100 if len(losses) > 1 else None
        exact = s["estimator"] == "exact"
        rows.append([
            s["estimator"], s["targets"], f"{s['tokens']:,}",
            "-" if exact or s["estimator"].endswith("-only") or MIXES.get(s["estimator"], ("pamm",))[0] != "pamm"
            else s["k"],
            f"{s['saved_fraction']:.3f}", ",".join(map(str, s["seeds"])),
            " ".join(f"{v:.4f}" for v in losses),
            "-" if exact or not paired else f"{statistics.fmean(paired):+.2f}%",
            "-" if exact or not paired else " ".join(f"{v:+.2f}" for v in paired),
            "-" if exact or len(paired) < 2 else f"{max(paired) - min(paired):.2f}",
            f"{spread:.2f}%" if spread is not None and exact else "",
            f"{s['min']:.1f}",
        ])
    header = ["estimator", "targets", "tokens/step", "k", "saved bytes / X", "seeds", "final val loss per seed",
              "paired vs exact (mean)", "paired per seed (%)", "paired spread (max-min, points)",
              "exact's seed spread", "min/run"]
    return markdown_table(header, rows)


#: result folders (the d=128 proxy, the d=256 confirmation) and how the plot marks them
MODELS = {"": "d=128, 2 layers (proxy)", "d256": "d=256, 4 layers"}


def report(out: Path, plot: bool) -> None:
    series = {}
    for sub, title in MODELS.items():
        runs = load(out / sub) if (out / sub).is_dir() else []
        if runs:
            series[title] = summarise(runs)
            print(f"### {title}\n\n{table(series[title])}\n")
    if not series:
        print("no results yet")
    elif plot:
        frontier(series, DOCS / "estimator_frontier.png")


def frontier(series: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Paired loss difference against saved bytes: one point per estimator, model, tokens and targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(6.5 * len(series), 5), squeeze=False)
    for ax, (title, summary) in zip(axes[0], series.items()):
        for s in summary:
            if s["estimator"] == "exact" or not s["paired"]:
                continue
            mean = statistics.fmean(s["paired"])
            colour = "C0" if s["tokens"] == 2048 else "C3"
            ax.errorbar(s["saved_fraction"], mean, yerr=[[mean - min(s["paired"])], [max(s["paired"]) - mean]],
                        fmt="o" if s["targets"] == "all" else "s", color=colour,
                        mfc=colour if s["targets"] == "all" else "none", capsize=2)
            ax.annotate(f"{s['estimator']}{'/qkv' if s['targets'] == 'qkv' else ''} ({len(s['paired'])})",
                        (s["saved_fraction"], mean), fontsize=6, xytext=(3, 2), textcoords="offset points")
        for tokens, colour in ((2048, "C0"), (8192, "C3")):
            if any(s["tokens"] == tokens for s in summary):
                ax.plot([], [], "o", color=colour, label=f"{tokens:,} tokens/step, all linears")
        ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="+0.5% goal")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set(xlabel="bytes kept for dW / bytes of X in fp32", ylabel="final val loss vs exact, paired (%)",
               title=f"{title}; mean and min-max over (n) seeds")
        ax.legend(fontsize=7)
    fig.suptitle("weight-gradient estimators, eager prototype, 2-core CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="steps at 2,048 tokens (other sizes: the same tokens)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--runs", default="exact-b2k-s0,pamm-b2k-s0")
    p.add_argument("--check", action="store_true", help="unbiasedness check and a 20-step smoke run")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--grad-quality", action="store_true", help="bias and noise of each estimator's dW on real X, dY")
    p.add_argument("--gq-tokens", type=int, default=2048, help="tokens of the batch --grad-quality measures")
    p.add_argument("--gq-names", default=",".join(GQ_NAMES), help="estimators --grad-quality measures")
    args = parse_common_args(p, OUT)
    if args.grad_quality:
        grad_quality(args, args.gq_tokens, args.gq_names.split(","))
        return
    if args.check:
        check_unbiased()
        smoke(args)
        return
    if not args.report_only:
        settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "out"})
        run_resumable(args.runs.split(","), args.out, lambda label: train_one(label, settings),
                      lambda r: f"final val loss {r['final_val_loss']:.4f}, saved {r['saved_fraction']:.3f} "
                      f"({r['wall_s']:.0f} s)")
    report(args.out, plot=not args.no_plot)


if __name__ == "__main__":
    main()
