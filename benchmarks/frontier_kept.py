"""What ``saved="all"`` still keeps under a memory budget: ``pamm_fx.explain`` of a frontier model, per budget.

The frontier's smallest pamm points are set by what the min-cut partitioner keeps under the budget; this
prints, for each budget, every saved tensor with its choice (compressed, or kept and why) and bytes, from the
same partition step the backend's Inductor compile runs (no code generated, nothing trained).

    python benchmarks/frontier_kept.py d512-L2-b4096-fp32-mha 0.3,1.0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import pamm_fx
from pamm_fx.demo.llama import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_config, parse_size  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("size", help="a frontier size label, e.g. d512-L2-b4096-fp32-mha")
    p.add_argument("budgets", help="comma-separated activation_memory_budget values (1.0: no budget)")
    args = p.parse_args()
    size = parse_size(args.size)
    torch.manual_seed(0)
    model = Llama(model_config(size)).to(size["dtype"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    targets = torch.randint(0, 256, (size["batch"], size["seq"]), generator=gen)
    for budget in (float(b) for b in args.budgets.split(",")):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            report = pamm_fx.explain(model, tokens, targets, targets="none", saved="all")
        print(f"===== {args.size}, activation_memory_budget={budget}\n{report}", flush=True)


if __name__ == "__main__":
    main()
