"""Is PAMM's weight-gradient error noise or bias? One batch, 24 draws of the generator rows.

DUPLICATES LIBRARY MATH: X~ = alpha C_f and dW = dY^T X~ are written out here in eager PyTorch (k fixed at 256)
from the library's reference assign and sampler, not taken from ``pamm::linear_group``'s backward.

The demo model after 30 eager AdamW steps; for layer 1's projections and the LM head, the exact
dW = dY^T X against PAMM's dY^T X~ (the reference kernels, k = 256 of b = 2,048 rows): the mean
relative error of one draw, and the relative error of the mean of 24 draws. If the second is as
large as the first, the error is a bias and does not average out over training steps.

    OMP_NUM_THREADS=1 python benchmarks/grad_bias.py
"""

from __future__ import annotations

import torch
from _common import demo_config

from pamm_fx.demo.data import batches, byte_dataset
from pamm_fx.demo.llama import Llama
from pamm_fx.kernels.assign import reference as assign
from pamm_fx.ops import sample_generators


def main() -> None:
    torch.manual_seed(0)
    m = Llama(demo_config(256, 4))
    train, _ = byte_dataset()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(30):
        t, y = batches(train, 8, 256, gen)
        m(t, y).backward()
        opt.step()
        opt.zero_grad()
    acts: dict[str, list[torch.Tensor]] = {}

    def hook_for(name: str):  # noqa: ANN202
        def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
            acts[name] = [inp[0].detach().reshape(-1, inp[0].shape[-1])]
            out.register_hook(lambda g: acts[name].append(g.detach().reshape(-1, g.shape[-1])))
        return hook

    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ("layers.1" in n or n == "lm_head"):
            mod.register_forward_hook(hook_for(n))
    t, y = batches(train, 8, 256, gen)
    m(t, y).backward()
    for n, (x, g) in acts.items():
        exact = g.t() @ x
        ests = []
        for d in range(24):
            idx = sample_generators(x.shape[0], 256, torch.tensor(d), 1)
            c = x[idx]
            f, a = assign(x, c)
            ests.append(g.t() @ (a[:, None] * c[f.long()]))
        single = sum(((e - exact).norm() / exact.norm()).item() for e in ests) / len(ests)
        mean = torch.stack(ests).mean(0)
        cos = torch.nn.functional.cosine_similarity(mean.flatten(), exact.flatten(), dim=0).item()
        print(f"{n:28s} single-draw rel err {single:.3f}  rel err of 24-draw mean "
              f"{((mean - exact).norm() / exact.norm()).item():.3f}  cos(mean, exact) {cos:.4f}")


if __name__ == "__main__":
    main()
