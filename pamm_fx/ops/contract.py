"""``pamm::contract(grads, f, alpha, k) -> B~``: the backward contraction, opaque to tracing.

B~ (k, sum m_j) = sum over rows i with f_i = j of alpha_i * [dY_1 | dY_2 | ...]_i. Called
only from :mod:`pamm_fx.ops.linear_group`'s backward (no graph pass writes it, so it has no
``emit``); :func:`weight_contraction` is that call. This module owns the schema, the fake kernel,
the flop formula and :class:`Contract`, the typed form of its arguments that :func:`parse` reads
from a traced backward graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils.flop_counter import register_flop_formula

from pamm_fx.kernels.contract import KERNELS, accumulation_dtype

__all__ = ["Contract", "contract", "parse", "weight_contraction"]


@dataclasses.dataclass(frozen=True)
class Contract:
    """The arguments of one ``pamm::contract`` call; the schema's order lives in :meth:`op_args` alone."""

    grads: Sequence[Any]
    f: Any
    alpha: Any
    k: Any

    def op_args(self) -> tuple[Any, ...]:
        return (list(self.grads), self.f, self.alpha, self.k)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> Contract:
        grads, f, alpha, k = args
        return cls(grads, f, alpha, k)


@torch.library.custom_op("pamm::contract", mutates_args=())
def contract(grads: Sequence[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ (k, sum m_j) = sum over rows i with f_i = j of alpha_i * [dY_1 | dY_2 | ...]_i, accumulated in
    float32 (float64 when a dY is float64)."""
    return KERNELS.eager(list(grads), f, alpha, k)


@contract.register_fake
def _(*args: Any) -> Tensor:
    call = Contract.from_op_args(args)
    dtype = accumulation_dtype([g.dtype for g in call.grads])
    return call.f.new_empty(call.k, sum(g.shape[-1] for g in call.grads), dtype=dtype)


@register_flop_formula(torch.ops.pamm.contract)
def _contract_flops(g_shapes: Sequence[Sequence[int]], *args: Any, **kwargs: Any) -> int:
    """A scale and an add per element of every dY."""
    return sum(2 * math.prod(s) for s in g_shapes)


def weight_contraction(call: Contract) -> Tensor:
    """B~ as the backward should trace it: where the kernels run in Triton, the Triton launcher itself (its
    ``wrap_triton`` calls trace into kernel wrappers in the functionalized backward, so Inductor schedules the
    launches), else this opaque op (whose eager body is the reference)."""
    args = call.op_args()
    return KERNELS.triton()(*args) if KERNELS.uses_triton(*args) else torch.ops.pamm.contract(*args)


def parse(node: fx.Node) -> Contract | None:
    """The arguments of a ``pamm::contract`` node, else None."""
    if node.op == "call_function" and node.target is torch.ops.pamm.contract.default:
        return Contract.from_op_args(node.args)
    return None
