"""Run by tests/test_decompositions.py in a fresh interpreter: compile plain Inductor first (before
pamm_fx is imported), then pamm models, and print, per compile, how many calls of our ops that have an
Inductor decomposition the compiled code makes opaque (each should be 0)."""

from __future__ import annotations

import json
import sys

import torch
from torch._inductor.utils import run_and_get_code

OPTIONS = {"targets": "all", "estimator": {"qkv": "pamm", "all": "sr"}, "min_generators": 8, "min_tokens": 8}


class Block(torch.nn.Module):
    """Attention inputs (paper PAMM) and an MLP (8-bit X), so every op with a decomposition appears."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, 2, d // 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return x + self.down(torch.relu(self.up(x)))


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def opaque(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    from pamm_fx.ops.decompositions import DECOMPOSITIONS

    _, codes = run_and_get_code(step, model, x)
    code = "\n".join(codes)
    return {str(op): code.count(f"torch.ops.{op}(") for op in DECOMPOSITIONS}


def main(scenario: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    out: dict[str, dict[str, int]] = {}
    if scenario == "plain_first":
        step(torch.compile(Block(), backend="inductor"), x)  # before pamm_fx is imported
        assert "pamm_fx" not in sys.modules
    out["first pamm"] = opaque(torch.compile(Block(), backend="pamm", options=OPTIONS), x)
    out["same structure again"] = opaque(torch.compile(Block(), backend="pamm", options=OPTIONS), x)
    # torchtitan compiles each block on its own, and the loss too
    stack = torch.nn.Sequential(Block(), Block())
    for block in stack:
        block.compile(backend="pamm", options=OPTIONS)
    out["per-block"] = opaque(stack, x)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
