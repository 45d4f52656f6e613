"""A trivial Triton kernel, launched once by :func:`pamm_fx.kernels.has_triton` to prove Triton works."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["probe"]


@triton.jit
def _add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def probe(device: str) -> None:
    """Compile, launch and check one kernel on ``device``; raises if any step fails."""
    x = torch.arange(5, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    _add_one_kernel[(1,)](x, out, 5, BLOCK=8)
    if out.tolist() != [1.0, 2.0, 3.0, 4.0, 5.0]:
        raise RuntimeError(f"probe kernel returned {out.tolist()}")
