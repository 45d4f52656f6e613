"""The low-bit payload of ``estimator="pamm_sr"`` and ``"sr"``: ``pamm::quantize_residual`` and
``pamm::residual_weight_grad``.

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
(:class:`Residual`). ``residual_weight_grad(dY, q, lo, scale, C?, f?, alpha?, bits, n, out_dtype) -> dW``
runs there once per projection that needs its weight gradient: dY_j^T X^ with X^ decoded inside the
reduction over the b rows (:mod:`pamm_fx.kernels.dequant_matmul`), so no b x n X^ is in memory
(eagerly, under ``aot_eager``, and in Inductor's CUDA form; its CPU form is X^ then one GEMM). n says
X^'s width, which without C nothing else carries. Under ``pamm_sr`` at ratio 1 X^ is X bit
for bit, and the CPU path sums a batch of up to ROW_CHUNK rows in one GEMM, as plain's.
Like ``pamm::compress``:
eager and ``aot_eager`` run the custom ops (the chunked reference, or Triton on CUDA); Inductor
compiles their decompositions (whole-tensor aten ops, or the traceable Triton ops), and the
quantized payload is tagged ``MUST_SAVE`` so the partitioner never keeps X to quantize again.
The noise is a counter-based hash of (seed, salt, row, column): no host synchronisation, no
RNG state, and a recomputation gives the same bits.

This module owns both ops' schemas, fake kernels, decompositions, flop formulas, the typed
forms of their arguments (:class:`QuantizeResidual`, :class:`WeightGrad`, :class:`Residual`)
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
from pamm_fx.kernels import dequant_matmul
from pamm_fx.kernels import residual as residual_kernels
from pamm_fx.ops.compress import rows_of
from pamm_fx.ops.decompositions import decomposition
from pamm_fx.ops.forward_only import emit_outputs, register_non_differentiable

__all__ = [
    "QuantizeResidual",
    "Residual",
    "WeightGrad",
    "emit",
    "parse",
    "quantize_residual",
    "residual_weight_grad",
    "weight_grad",
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
class WeightGrad:
    """The arguments of one ``pamm::residual_weight_grad`` call: dY (b, m) as rows, the payload, the
    compression it refines (c, f, alpha, or all None under ``sr``), X's width n and dW's dtype."""

    dy: Any
    residual: Residual
    c: Any | None
    f: Any | None
    alpha: Any | None
    n: Any
    out_dtype: torch.dtype

    def op_args(self) -> tuple[Any, ...]:
        r = self.residual
        return (self.dy, r.q, r.lo, r.scale, self.c, self.f, self.alpha, r.bits, self.n, self.out_dtype)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> WeightGrad:
        dy, q, lo, scale, c, f, alpha, bits, n, out_dtype = args
        return cls(dy, Residual(q, lo, scale, bits), c, f, alpha, n, out_dtype)


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


decomposition(torch.ops.pamm.quantize_residual.default)(_quantize_decomposition)


@torch.library.custom_op("pamm::residual_weight_grad", mutates_args=())
def residual_weight_grad(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
                         alpha: Tensor | None, bits: int, n: int, out_dtype: torch.dtype) -> Tensor:
    """dW = dY^T X^, X^ = alpha[:, None] * C[f] + deq(q) (deq(q) without C, f, alpha), (m, n) of ``out_dtype``,
    without X^ in memory (see :class:`WeightGrad`)."""
    return dequant_matmul.weight_grad(dy, q, lo, scale, bits, n, c, f, alpha, out_dtype)


@residual_weight_grad.register_fake
def _(*args: Any) -> Tensor:
    call = WeightGrad.from_op_args(args)
    return call.dy.new_empty(call.dy.shape[1], call.n, dtype=call.out_dtype)


def _weight_grad_decomposition(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None,
                               f: Tensor | None, alpha: Tensor | None, bits: int, n: int,
                               out_dtype: torch.dtype) -> Tensor:
    """What Inductor compiles for ``pamm::residual_weight_grad``: the Triton op on CUDA, else aten ops
    (X^ in whole, then one GEMM: CPU Inductor has no kernel that decodes inside a GEMM)."""
    return dequant_matmul.weight_grad_traceable(dy, q, lo, scale, bits, n, c, f, alpha, out_dtype)


decomposition(torch.ops.pamm.residual_weight_grad.default)(_weight_grad_decomposition)


# Flop formulas, so that FlopCounterMode (and the partitioner's runtime estimator under an
# activation_memory_budget) prices the ops instead of counting them as free. Both are memory bound.
@register_flop_formula(torch.ops.pamm.quantize_residual)
def _quantize_flops(x_shape: Sequence[int], c_shape: Sequence[int] | None, *args: Any, **kwargs: Any) -> int:
    """A multiply-add per element for R (none without a base), one for the code: 4 (2) * b * n."""
    return (4 if c_shape is not None else 2) * math.prod(x_shape)


@register_flop_formula(torch.ops.pamm.residual_weight_grad)
def _weight_grad_flops(dy_shape: Sequence[int], q_shape: Any, lo_shape: Any, scale_shape: Any,
                       c_shape: Sequence[int] | None, f_shape: Any, alpha_shape: Any, bits: int, n: int,
                       *args: Any, **kwargs: Any) -> int:
    """The GEMM, 2 * b * m * n, plus decoding X^ (a multiply-add per element for lo + q * scale, one for
    alpha * C_f, none without a base): (4 or 2) * b * n."""
    b, m = dy_shape
    return 2 * b * m * n + (4 if c_shape is not None else 2) * b * n


def weight_grad(call: WeightGrad) -> Tensor:
    """dW as the backward traces it: the custom op (Inductor swaps in its decomposition)."""
    return torch.ops.pamm.residual_weight_grad(*call.op_args())


def emit(graph: fx.Graph, call: QuantizeResidual) -> tuple[fx.Node, Residual]:
    """The op node for ``call`` (whose tensors are nodes) at the graph's insertion point, and the
    :class:`Residual` of its outputs; with example values when X has one (fake)."""
    node, parts = emit_outputs(graph, torch.ops.pamm.quantize_residual.default, call.op_args(), call.x, 3)
    return node, Residual(*parts, call.bits)


def parse(node: fx.Node) -> QuantizeResidual | WeightGrad | None:
    """The arguments of a ``pamm::quantize_residual`` or ``pamm::residual_weight_grad`` node, else None."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.pamm.quantize_residual.default:
        return QuantizeResidual.from_op_args(node.args)
    if node.target is torch.ops.pamm.residual_weight_grad.default:
        return WeightGrad.from_op_args(node.args)
    return None
