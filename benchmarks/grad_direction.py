"""How far PAMM's approximate weight gradient is from the exact one, on the quality benchmark's model.

Same weights and batch, at initialisation and after 200 plain training steps: the
norm of the Q/K/V weight gradients and of all gradients (does PAMM change what
gradient clipping sees?) and the cosine between the exact and the PAMM gradient of
layer 0's q_proj, for three draws of the generator rows per ratio.

    /work/venv/bin/python benchmarks/grad_direction.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama, LlamaConfig

QKV = ("q_proj", "k_proj", "v_proj")
PROBE = "layers.0.self_attn.q_proj.weight"


def grads(
    model: Llama, fn: Callable[..., torch.Tensor], t: torch.Tensor, y: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    """(QKV gradient norm, total gradient norm, gradient of ``PROBE``) for one forward/backward."""
    model.zero_grad(set_to_none=True)
    fn(t, y).backward()
    named = dict(model.named_parameters())
    qkv = sum(p.grad.norm() ** 2 for n, p in named.items() if any(s in n for s in QKV)) ** 0.5
    total = sum(p.grad.norm() ** 2 for p in named.values()) ** 0.5
    return float(qkv), float(total), named[PROBE].grad.clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, _ = byte_dataset()
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=688))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for stage in (0, 200):
        for _ in range(stage):
            t, y = batches(train, 8, 256, gen)
            model(t, y).backward()
            opt.step()
            opt.zero_grad()
        t, y = batches(train, 8, 256, gen)
        exact = copy.deepcopy(model)
        q_ref, tot_ref, g_ref = grads(exact, exact, t, y)
        for ratio in ("1/8", "1/64", "1/512"):
            torch._dynamo.reset()
            c = copy.deepcopy(model)
            fn = torch.compile(c, backend="pamm", options={"ratio": ratio})
            res = [grads(c, fn, t, y) for _ in range(3)]
            cos = [float(torch.nn.functional.cosine_similarity(r[2].flatten(), g_ref.flatten(), dim=0)) for r in res]
            print(f"after {stage} steps, ratio {ratio}: QKV grad norm exact {q_ref:.4f} pamm "
                  f"{[round(r[0], 4) for r in res]}; total exact {tot_ref:.4f} pamm {[round(r[1], 4) for r in res]}; "
                  f"cos(layer-0 q_proj dW) {[round(c, 3) for c in cos]}", flush=True)


if __name__ == "__main__":
    main()
