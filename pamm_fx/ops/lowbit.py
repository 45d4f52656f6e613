"""The low-bit payload of a group: ``pamm::quantize`` (forward) and ``pamm::dequant_weight_grad`` (backward).

An estimator that keeps a low-bit payload (:mod:`pamm_fx.estimators`) keeps X, or PAMM's residual
R = X - X~ relative to the base X~ = alpha C_f, in the low-bit format (:mod:`pamm_fx.kernels.lowbit`):
``bits`` per element with stochastic rounding, so that its weight gradient is unbiased. Under ``"sr"`` the
codes hold X itself (no base: C, f, alpha are None, no ``pamm::compress`` runs) and
``dW_j = dY_j^T deq(q(X))``; under ``"pamm_sr"`` they hold R and ``dW_j = dY_j^T X^``,
``X^ = X~ + deq(q(R))``, unbiased given C (per element variance at most scale_i^2 / 4: far below row
sampling's at the same bytes).

``quantize(x, C?, f?, alpha?, seed, salt, bits) -> (q, lo, scale)`` runs in the forward, right after
``pamm::compress`` where there is one (same seed and salt; the noise stream is separated from the generator
draw), and ``pamm::linear_group`` saves its outputs for the backward (:class:`Quantized`).
``dequant_weight_grad(dY, q, lo, scale, C?, f?, alpha?, bits, n, out_dtype) -> dW`` runs there once per
projection that needs its weight gradient: dY_j^T X^ with X^ decoded inside the reduction over the b rows
(:mod:`pamm_fx.kernels.dequant_matmul`), so no b x n X^ is in memory (eagerly, under ``aot_eager``, and on
CUDA; Inductor's CPU form is X^ then one GEMM). n says X^'s width, which without C nothing else carries.
Under ``pamm_sr`` at ratio 1 X^ is X bit for bit, and the CPU path sums a batch of up to ROW_CHUNK rows in
one GEMM, as plain's.

Like ``pamm::compress``: eager and ``aot_eager`` run the custom ops (the chunked reference, or Triton on
CUDA); Inductor compiles their decompositions on CPU (whole-tensor aten ops), and the quantized payload is
tagged ``MUST_SAVE`` so the partitioner never keeps X to quantize again. The noise is the format's hashed
noise keyed by ``pamm::stream_key``: no host synchronisation, no RNG state, a recomputation gives the same
bits. :func:`quantize_rotated` is the same format with the rotated noise, for the tensors ``saved``
compresses (:mod:`pamm_fx.saved`).

This module owns both ops' schemas, fake kernels, decompositions, flop formulas, the typed forms of their
arguments (:class:`Quantize`, :class:`DequantWeightGrad`, :class:`Quantized`) with :func:`emit` and
:func:`parse`.
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
from pamm_fx.kernels import lowbit
from pamm_fx.kernels.dequant_matmul import KERNELS as WEIGHT_GRAD
from pamm_fx.kernels.device import rows_of, work_dtype
from pamm_fx.kernels.quantize import KERNELS as QUANTIZE
from pamm_fx.ops.decompositions import decomposition
from pamm_fx.ops.forward_only import emit_outputs, register_non_differentiable
from pamm_fx.ops.noise import rotation_phases, stream_key

__all__ = [
    "DequantWeightGrad",
    "Quantize",
    "Quantized",
    "dequant_weight_grad",
    "emit",
    "parse",
    "quantize",
    "quantize_rotated",
    "weight_grad",
]


@dataclasses.dataclass(frozen=True)
class Quantized:
    """The low-bit payload a ``pamm::linear_group`` saves for its backward (tensors or FX nodes)."""

    q: Any
    lo: Any
    scale: Any
    bits: int


@dataclasses.dataclass(frozen=True)
class Quantize:
    """The arguments of one ``pamm::quantize`` call; the schema's order lives here alone.

    c, f, alpha: the base X~ = alpha C_f the codes are relative to (``pamm_sr``), or all None (``sr``: X).
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
    def from_op_args(cls, args: Sequence[Any]) -> Quantize:
        return cls(*args)


@dataclasses.dataclass(frozen=True)
class DequantWeightGrad:
    """The arguments of one ``pamm::dequant_weight_grad`` call: dY (b, m) as rows, the payload, the base
    it is relative to (c, f, alpha, or all None under ``sr``), X's width n and dW's dtype."""

    dy: Any
    quantized: Quantized
    c: Any | None
    f: Any | None
    alpha: Any | None
    n: Any
    out_dtype: torch.dtype

    def op_args(self) -> tuple[Any, ...]:
        p = self.quantized
        return (self.dy, p.q, p.lo, p.scale, self.c, self.f, self.alpha, p.bits, self.n, self.out_dtype)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> DequantWeightGrad:
        dy, q, lo, scale, c, f, alpha, bits, n, out_dtype = args
        return cls(dy, Quantized(q, lo, scale, bits), c, f, alpha, n, out_dtype)


def _key(seed: Tensor, salt: int, device: torch.device) -> Tensor:
    """The noise stream's key, from the opaque ``pamm::stream_key`` (computed once per call)."""
    return stream_key(seed.to(device), salt ^ lowbit.NOISE_DOMAIN)


@torch.library.custom_op("pamm::quantize", mutates_args=())
def quantize(x: Tensor, c: Tensor | None, f: Tensor | None, alpha: Tensor | None, seed: Tensor, salt: int,
             bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (b, ceil(n * bits / 8)) uint8, lo (b,), scale (b,) of X (..., n) as rows, or of R = X - alpha * C[f]
    with a base."""
    rows = rows_of(x)
    return QUANTIZE.eager(rows, c, f, alpha, _key(seed, salt, x.device), bits)


@quantize.register_fake
def _(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    call = Quantize.from_op_args(args)
    x = call.x
    n = x.shape[-1]
    b = math.prod(x.shape[:-1])
    wd = work_dtype(x.dtype)
    return (x.new_empty(b, lowbit.packed_bytes(n, call.bits), dtype=torch.uint8),
            x.new_empty(b, dtype=wd), x.new_empty(b, dtype=wd))


# X's gradient flows through pamm::linear_group; the payload itself is never differentiated.
register_non_differentiable(quantize)


def _quantize_decomposition(*args: Any) -> Any:
    """What Inductor compiles for ``pamm::quantize``: aten ops, with the payload tagged MUST_SAVE (else,
    under a memory budget, X would be kept to quantize again); NotImplemented where the Triton kernel runs
    (the op stays whole)."""
    call = Quantize.from_op_args(args)
    rows = rows_of(call.x)
    if QUANTIZE.uses_triton(rows, call.c, call.f, call.alpha, call.seed, call.bits):
        return NotImplemented
    out = QUANTIZE.aten(rows, call.c, call.f, call.alpha, _key(call.seed, call.salt, rows.device), call.bits)
    _compat.tag_must_save(*out)
    return out


decomposition(torch.ops.pamm.quantize.default)(_quantize_decomposition)


def quantize_rotated(x: Tensor, seed: Tensor, salt: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of X (b, n) in the low-bit format with the rotated noise (:func:`pamm_fx.kernels.lowbit.rotated_noise`,
    phases from the opaque ``pamm::rotation_phases``), in traceable ops: what ``saved`` compresses with.

    For every element the noise is uniform on [0, 1), so E[deq(q)] = X as with the hashed noise; rows are
    independent, and within a row the offsets are one random rotation of the call's column offsets. It costs
    three float operations per element instead of a 32-bit hash (about halving the quantization's time on a
    CPU); the estimators keep the hashed noise their Triton kernels reproduce.
    """
    lowbit.check_bits(bits)
    b, n = x.shape
    phases = rotation_phases(seed.to(x.device), salt ^ lowbit.NOISE_DOMAIN, b, n)
    return lowbit.encode(x.to(work_dtype(x.dtype)), lambda: lowbit.rotated_noise(phases), bits)


@torch.library.custom_op("pamm::dequant_weight_grad", mutates_args=())
def dequant_weight_grad(dy: Tensor, q: Tensor, lo: Tensor, scale: Tensor, c: Tensor | None, f: Tensor | None,
                        alpha: Tensor | None, bits: int, n: int, out_dtype: torch.dtype) -> Tensor:
    """dW = dY^T X^, X^ = alpha[:, None] * C[f] + deq(q) (deq(q) without C, f, alpha), (m, n) of ``out_dtype``,
    without X^ in memory (see :class:`DequantWeightGrad`)."""
    return WEIGHT_GRAD.eager(dy, q, lo, scale, c, f, alpha, bits, n, out_dtype)


@dequant_weight_grad.register_fake
def _(*args: Any) -> Tensor:
    call = DequantWeightGrad.from_op_args(args)
    return call.dy.new_empty(call.dy.shape[1], call.n, dtype=call.out_dtype)


def _weight_grad_decomposition(*args: Any) -> Any:
    """What Inductor compiles for ``pamm::dequant_weight_grad`` on CPU: aten ops (X^ in whole, then one GEMM:
    CPU Inductor has no kernel that decodes inside a GEMM); NotImplemented where the Triton kernel runs."""
    return WEIGHT_GRAD.traced(*args)


decomposition(torch.ops.pamm.dequant_weight_grad.default)(_weight_grad_decomposition)


# Flop formulas, so that FlopCounterMode (and the partitioner's runtime estimator under an
# activation_memory_budget) prices the ops instead of counting them as free. Both are memory bound.
@register_flop_formula(torch.ops.pamm.quantize)
def _quantize_flops(x_shape: Sequence[int], c_shape: Sequence[int] | None, *args: Any, **kwargs: Any) -> int:
    """A multiply-add per element for R (none without a base), one for the code: 4 (2) * b * n."""
    return (4 if c_shape is not None else 2) * math.prod(x_shape)


@register_flop_formula(torch.ops.pamm.dequant_weight_grad)
def _weight_grad_flops(dy_shape: Sequence[int], q_shape: Any, lo_shape: Any, scale_shape: Any,
                       c_shape: Sequence[int] | None, f_shape: Any, alpha_shape: Any, bits: int, n: int,
                       *args: Any, **kwargs: Any) -> int:
    """The GEMM, 2 * b * m * n, plus decoding X^ (a multiply-add per element for lo + q * scale, one for
    alpha * C_f, none without a base): (4 or 2) * b * n."""
    b, m = dy_shape
    return 2 * b * m * n + (4 if c_shape is not None else 2) * b * n


def weight_grad(call: DequantWeightGrad) -> Tensor:
    """dW as the backward traces it: the custom op (Inductor swaps in its decomposition)."""
    return torch.ops.pamm.dequant_weight_grad(*call.op_args())


def emit(graph: fx.Graph, call: Quantize) -> tuple[fx.Node, Quantized]:
    """The op node for ``call`` (whose tensors are nodes) at the graph's insertion point, and the
    :class:`Quantized` of its outputs; with example values when X has one (fake)."""
    node, parts = emit_outputs(graph, torch.ops.pamm.quantize.default, call.op_args(), call.x, 3)
    return node, Quantized(*parts, call.bits)


def parse(node: fx.Node) -> Quantize | DequantWeightGrad | None:
    """The arguments of a ``pamm::quantize`` or ``pamm::dequant_weight_grad`` node, else None."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.pamm.quantize.default:
        return Quantize.from_op_args(node.args)
    if node.target is torch.ops.pamm.dequant_weight_grad.default:
        return DequantWeightGrad.from_op_args(node.args)
    return None
