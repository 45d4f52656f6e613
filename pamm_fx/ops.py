"""The ``pamm::`` custom ops and their autograd.

Two ops replace a group of projections that read the same X:

``pamm::compress(x, seed, ...) -> (C, f, alpha)``
    samples k generator rows of X and assigns every row to its nearest generator.
    No autograd: it only produces what the backward will need.

``pamm::linear_group(x, weights, biases, C, f, alpha) -> [Y_1, ..., Y_g]``
    the exact forward of every projection. Its registered backward saves only
    C, f, alpha and the weights (never X): dX and bias gradients are exact, weight
    gradients come from one PAMM contraction shared by the whole group.

The real work is in :mod:`pamm_fx.kernels`; the fake (meta) kernels give shapes
only, with k = min(b, max(min_generators, ceil(p * b / q))) evaluated on SymInts
so that dynamic batch/sequence sizes never force a recompile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pamm_fx import kernels
from pamm_fx.config import num_generators

__all__ = ["DoubleBackwardError", "compress", "linear_group", "num_generators", "sample_generators"]

_MASK63 = (1 << 63) - 1


def sample_generators(b: int, k: int, seed: int, salt: int) -> Tensor:
    """k distinct row indices in [0, b), sorted, drawn from a generator keyed on (seed, salt).

    Sorting keeps C in token order, so k == b gives C = X and f = identity.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(((seed & _MASK63) * 0x9E3779B97F4A7C15 + salt) & _MASK63)
    return torch.randperm(b, generator=gen)[:k].sort().values


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("pamm::compress", mutates_args=())
def compress(
    x: Tensor,
    seed: Tensor,
    ratio_num: int,
    ratio_den: int,
    min_generators: int,
    min_tokens: int,
    eps: float,
    salt: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compress X (..., n) into C (k, n, X's dtype), f (b,) int32, alpha (b,) float32.

    seed: an int64 scalar tensor (fresh every step); salt tells apart the groups of
    one graph so that they draw different rows from the same seed.
    """
    rows = _rows(x)
    b = rows.shape[0]
    k = num_generators(b, ratio_num, ratio_den, min_generators, min_tokens)
    if k == b:
        f = torch.arange(b, dtype=torch.int32, device=x.device)
        return rows.clone(), f, torch.ones(b, dtype=torch.float32, device=x.device)
    idx = sample_generators(b, k, int(seed.item()), salt).to(x.device)
    c = rows.index_select(0, idx)
    f, alpha = kernels.assign(rows, c, eps)
    return c, f, alpha


@compress.register_fake
def _(x, seed, ratio_num, ratio_den, min_generators, min_tokens, eps, salt):
    n = x.shape[-1]
    b = x.numel() // n if n != 0 else math.prod(x.shape[:-1])
    k = num_generators(b, ratio_num, ratio_den, min_generators, min_tokens)
    return (
        x.new_empty(k, n),
        x.new_empty(b, dtype=torch.int32),
        x.new_empty(b, dtype=torch.float32),
    )


def _compress_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(*output)


def _compress_backward(ctx: Any, *grads: Tensor) -> tuple:
    """Unreachable in practice: C, f and alpha are non-differentiable by construction."""
    return (None,) * 8


compress.register_autograd(_compress_backward, setup_context=_compress_setup_context)


@torch.library.custom_op("pamm::contract", mutates_args=())
def contract(grads: Sequence[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ (k, sum m_j) float32 = sum over rows i with f_i = j of alpha_i * [dY_1 | dY_2 | ...]_i."""
    return kernels.contract(list(grads), f, alpha, k)


@contract.register_fake
def _(grads, f, alpha, k):
    width = sum(g.shape[-1] for g in grads)
    return f.new_empty(k, width, dtype=torch.float32)


@torch.library.custom_op("pamm::linear_group", mutates_args=())
def linear_group(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    has_bias: Sequence[bool],
    c: Tensor,
    f: Tensor,
    alpha: Tensor,
) -> list[Tensor]:
    """Y_j = X W_j^T + b_j for every projection of the group (exact).

    biases holds only the projections that have one, in order; has_bias says which.
    (A list of optional tensors would lose per-element ``needs_input_grad``.)
    """
    if torch.autograd.forward_ad._current_level >= 0:
        # Custom ops drop tangents silently; refuse rather than return a wrong jvp.
        raise NotImplementedError(
            "pamm: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) through a PAMM-compressed "
            "projection is not supported; compile this model with backend='inductor' for forward-mode AD."
        )
    it = iter(biases)
    return [torch.nn.functional.linear(x, w, next(it) if hb else None) for w, hb in zip(weights, has_bias)]


@linear_group.register_fake
def _(x, weights, biases, has_bias, c, f, alpha):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    x, weights, biases, has_bias, c, f, alpha = inputs
    ctx.save_for_backward(c, f, alpha, *weights)
    ctx.has_bias = list(has_bias)


class DoubleBackwardError(RuntimeError):
    """Differentiating PAMM's backward would differentiate an approximation as if it were exact."""


def _backward(ctx: Any, grads: list[Tensor]) -> tuple:
    if torch.is_grad_enabled() and any(g.requires_grad for g in grads):
        raise DoubleBackwardError(
            "pamm: double backward (create_graph=True, gradient penalties, Hessian-vector products) through a "
            "PAMM-compressed projection is not supported: its weight gradient is an approximation. Compile this "
            "model with backend='inductor', or exclude the projection (e.g. freeze it)."
        )
    c, f, alpha, *weights = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    dx = None
    if needs_x:
        dx = grads[0].matmul(weights[0])
        for g, w in zip(grads[1:], weights[1:]):
            dx = dx + g.matmul(w)
    dweights: list[Tensor | None] = [None] * len(weights)
    if any(needs_w):
        if f.is_cuda and kernels.has_triton():
            # Traceable twin: AOTAutograd decomposes it, so Inductor sees the Triton kernel.
            from pamm_fx.kernels import triton_contract

            bt = triton_contract.contract_triton(grads, f, alpha, c.shape[0])
        else:
            bt = torch.ops.pamm.contract(grads, f, alpha, c.shape[0])
        dw_all = bt.t().mm(c.float())
        offset = 0
        for j, w in enumerate(weights):
            if needs_w[j]:
                dweights[j] = dw_all[offset : offset + w.shape[0]].to(w.dtype)
            offset += w.shape[0]
    with_bias = [g for g, hb in zip(grads, ctx.has_bias) if hb]
    dbiases = [_rows(g).sum(0) if need else None for g, need in zip(with_bias, needs_b)]
    return dx, dweights, dbiases, None, None, None, None


linear_group.register_autograd(_backward, setup_context=_setup_context)
