"""The low-bit payload of ``estimator="pamm_sr"`` and ``"sr"``: ``pamm::quantize_residual`` and
``pamm::reconstruct_residual``.

PAMM keeps X~_i = alpha_i C_f(i) for every row, a biased estimate of X_i. ``pamm_sr`` also keeps
R = X - X~ at ``bits`` bits per element with stochastic rounding (format and guarantees:
:mod:`pamm_fx.kernels.residual`), so that the weight gradient
``dW_j = B~_j^T C + dY_j^T deq(q(R)) = dY_j^T X^`` with ``X^ = X~ + deq(q(R))`` is unbiased given
C. Its variance per element is at most scale_i^2 / 4, where scale_i is row i's residual range
over 2^bits - 1: far below row sampling's at the same bytes. ``sr`` has no PAMM base (C, f, alpha
are None, no ``pamm::compress`` runs): R is X itself, and ``dW_j = dY_j^T deq(q(X))`` is unbiased.

``quantize_residual(x, C?, f?, alpha?, seed, salt, bits) -> (q, lo, scale)`` runs in the forward,
right after ``pamm::compress`` where there is one (same seed and salt; the noise stream is separated
from the generator draw), and ``pamm::linear_group`` saves its outputs for the backward
(:class:`Residual`). ``reconstruct_residual(q, lo, scale, C?, f?, alpha?, bits, n, dtype) -> X^`` runs
there (n and dtype say X^'s width and dtype, which without C nothing else carries),
once per group and only when a projection of the group needs its weight gradient: each dW_j is
then one GEMM dY_j^T X^, as plain's (no contraction, no second GEMM), and under ``pamm_sr`` at
ratio 1 X^ is X bit for bit, so the weight gradients are plain's bit for bit. X^ is a transient b x n
in X's (compute) dtype.
Like ``pamm::compress``:
eager and ``aot_eager`` run the custom ops (the chunked reference, or Triton on CUDA); Inductor
compiles their decompositions (whole-tensor aten ops, or the traceable Triton ops), and the
quantized payload is tagged ``MUST_SAVE`` so the partitioner never keeps X to quantize again.
The noise is a counter-based hash of (seed, salt, row, column): no host synchronisation, no
RNG state, and a recomputation gives the same bits.

This module owns both ops' schemas, fake kernels, decompositions, flop formulas, the typed
forms of their arguments (:class:`QuantizeResidual`, :class:`Reconstruct`, :class:`Residual`)
with :func:`emit` and :func:`parse`; the format and its size per row
(:func:`~pamm_fx.kernels.residual.payload_bytes_per_row`) belong to :mod:`pamm_fx.kernels.residual`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils.flop_counter import register_flop_formula

from pamm_fx import _compat
from pamm_fx.kernels import residual as residual_kernels
from pamm_fx.ops.compress import rows_of
from pamm_fx.ops.forward_only import emit_outputs, register_non_differentiable

__all__ = [
    "QuantizeResidual",
    "Reconstruct",
    "Residual",
    "emit",
    "parse",
    "quantize_residual",
    "reconstruct_residual",
    "reconstructed",
]


@dataclasses.dataclass(frozen=True)
class Residual:
    """The quantized residual a ``pamm::linear_group`` saves for its backward (tensors or FX nodes)."""

    q: Any
    lo: Any
    scale: Any
    bits: int


@dataclasses.dataclass(frozen=True)
class QuantizeResidual:
    """The arguments of one ``pamm::quantize_residual`` call; the schema's order lives here alone.

    c, f, alpha: the PAMM base X~ = alpha C_f (``pamm_sr``), or all None (``sr``: R is X).
    """

    x: Any
    c: Any | None
    f: Any | None
    alpha: Any | None
    seed: Any
    salt: int
    bits: int

    def op_args(self) -> tuple[Any, ...]:
        return (self.x, self.c, self.f, self.alpha, self.seed, self.salt, self.bits)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> QuantizeResidual:
        return cls(*args)


@dataclasses.dataclass(frozen=True)
class Reconstruct:
    """The arguments of one ``pamm::reconstruct_residual`` call: the payload, the compression it refines
    (c, f, alpha, or all None under ``sr``), and X^'s width n and dtype."""

    residual: Residual
    c: Any | None
    f: Any | None
    alpha: Any | None
    n: Any
    dtype: torch.dtype

    def op_args(self) -> tuple[Any, ...]:
        r = self.residual
        return (r.q, r.lo, r.scale, self.c, self.f, self.alpha, r.bits, self.n, self.dtype)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> Reconstruct:
        q, lo, scale, c, f, alpha, bits, n, dtype = args
        return cls(Residual(q, lo, scale, bits), c, f, alpha, n, dtype)


@torch.library.custom_op("pamm::quantize_residual", mutates_args=())
def quantize_residual(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, seed: Tensor,
                      salt: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (b, ceil(n * bits / 8)) uint8, lo (b,), scale (b,) of R = X - alpha * C[f] (R = X without C, f,
    alpha), X (..., n) as rows."""
    return residual_kernels.quantize(rows_of(x), c, f, alpha, seed, salt, bits)


@quantize_residual.register_fake
def _(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    call = QuantizeResidual.from_op_args(args)
    x = call.x
    n = x.shape[-1]
    b = math.prod(x.shape[:-1])
    wd = residual_kernels.work_dtype(x.dtype)
    return (x.new_empty(b, residual_kernels.packed_bytes(n, call.bits), dtype=torch.uint8),
            x.new_empty(b, dtype=wd), x.new_empty(b, dtype=wd))


# X's gradient flows through pamm::linear_group; the payload itself is never differentiated.
register_non_differentiable(quantize_residual)


def _quantize_decomposition(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """What Inductor compiles for ``pamm::quantize_residual``: aten ops, or the Triton op on CUDA,
    with the payload tagged MUST_SAVE (else, under a memory budget, X would be kept to quantize again)."""
    call = QuantizeResidual.from_op_args(args)
    out = residual_kernels.quantize_traceable(rows_of(call.x), call.c, call.f, call.alpha, call.seed, call.salt,
                                              call.bits)
    _compat.tag_must_save(*out)
    return out


_compat.register_inductor_decomposition(torch.ops.pamm.quantize_residual.default, _quantize_decomposition)


@torch.library.custom_op("pamm::reconstruct_residual", mutates_args=())
def reconstruct_residual(q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
                         alpha: Tensor | None, bits: int, n: int, dtype: torch.dtype) -> Tensor:
    """X^ = alpha[:, None] * C[f] + deq(q) (deq(q) without C, f, alpha), (b, n) of ``dtype`` (see
    :class:`Reconstruct`)."""
    return residual_kernels.reconstruct(q, lo, scale, c, f, alpha, bits, n, dtype)


@reconstruct_residual.register_fake
def _(*args: Any) -> Tensor:
    call = Reconstruct.from_op_args(args)
    return call.residual.q.new_empty(call.residual.q.shape[0], call.n, dtype=call.dtype)


_compat.register_inductor_decomposition(torch.ops.pamm.reconstruct_residual.default,
                                        residual_kernels.reconstruct_traceable)


# Flop formulas, so that FlopCounterMode (and the partitioner's runtime estimator under an
# activation_memory_budget) prices the ops instead of counting them as free. Both are memory bound.
@register_flop_formula(torch.ops.pamm.quantize_residual)
def _quantize_flops(x_shape: Sequence[int], c_shape: Sequence[int] | None, *args: Any, **kwargs: Any) -> int:
    """A multiply-add per element for R (none without a base), one for the code: 4 (2) * b * n."""
    return (4 if c_shape is not None else 2) * math.prod(x_shape)


@register_flop_formula(torch.ops.pamm.reconstruct_residual)
def _reconstruct_flops(q_shape: Sequence[int], lo_shape: Any, scale_shape: Any, c_shape: Sequence[int] | None,
                       f_shape: Any, alpha_shape: Any, bits: int, n: int, *args: Any, **kwargs: Any) -> int:
    """A multiply-add per element for lo + q * scale, one for alpha * C_f (none without a base): 4 (2) * b * n."""
    return (4 if c_shape is not None else 2) * q_shape[0] * n


def reconstructed(call: Reconstruct) -> Tensor:
    """X^ as the backward traces it: the custom op (Inductor swaps in its decomposition)."""
    return torch.ops.pamm.reconstruct_residual(*call.op_args())


def emit(graph: fx.Graph, call: QuantizeResidual) -> tuple[fx.Node, Residual]:
    """The op node for ``call`` (whose tensors are nodes) at the graph's insertion point, and the
    :class:`Residual` of its outputs; with example values when X has one (fake)."""
    node, parts = emit_outputs(graph, torch.ops.pamm.quantize_residual.default, call.op_args(), call.x, 3)
    return node, Residual(*parts, call.bits)


def parse(node: fx.Node) -> QuantizeResidual | Reconstruct | None:
    """The arguments of a ``pamm::quantize_residual`` or ``pamm::reconstruct_residual`` node, else None."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.pamm.quantize_residual.default:
        return QuantizeResidual.from_op_args(node.args)
    if node.target is torch.ops.pamm.reconstruct_residual.default:
        return Reconstruct.from_op_args(node.args)
    return None
