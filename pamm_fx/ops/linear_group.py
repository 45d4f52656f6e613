"""``pamm::linear_group(x, weights, biases, has_bias, C?, f?, alpha?, q?, lo?, scale?, bits) -> [Y_1, ..., Y_g]``.

The exact forward of every projection of a group. Its registered backward saves only C, f,
alpha and the weights (never X): dX and bias gradients are exact, weight gradients come from
one PAMM contraction (:mod:`pamm_fx.ops.contract`) shared by the whole group. Under
``estimator="pamm_sr"`` it also saves the quantized residual (:mod:`pamm_fx.ops.lowbit`) and
forms each weight gradient as dY_j^T X^, X^ = X~ + deq(q(R)) (= B~_j^T C + dY_j^T deq(q(R))).
Under ``estimator="sr"`` there is no PAMM payload (C, f, alpha are None): it saves the quantized
X alone and dW_j = dY_j^T deq(q(X)).

Dtypes: the weights (and biases) share one dtype, the group's compute dtype, and X may be in another
(under autocast: a float32 X with bf16-cast weights). The op then computes as autocast computes each
linear: X cast to the weights' dtype, Y_j and dW_j in that dtype, and each member's dX contribution
``dY_j W_j`` cast back to X's dtype before the contributions are summed (in X's dtype, as autograd
sums the gradients of autocast's per-linear casts of X). Without autocast all dtypes are X's and the
casts are no-ops.
This module owns
the schema, the fake kernel, the autograd, the flop formula and :class:`LinearGroup`, the typed
form of its arguments that :func:`emit` writes into a graph and :func:`parse` reads back.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils.flop_counter import register_flop_formula

from pamm_fx import _compat
from pamm_fx.kernels.device import rows_of
from pamm_fx.ops.contract import Contract, weight_contraction
from pamm_fx.ops.lowbit import DequantWeightGrad, Quantized, weight_grad

__all__ = ["DoubleBackwardError", "LinearGroup", "emit", "linear_group", "parse"]


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """The arguments of one ``pamm::linear_group`` call, typed: one bias (or None) per weight.

    The schema carries the biases present plus a ``has_bias`` mask instead (a list of optional
    tensors would lose per-element ``needs_input_grad``); only :meth:`op_args` and
    :meth:`from_op_args` know that form and the positional order. ``quantized`` (``pamm_sr``, ``sr``)
    rides in trailing optional arguments, absent for plain PAMM, so PAMM's graphs are unchanged;
    c, f, alpha are None under ``sr`` (then the payload is the quantized X and must be there).
    """

    x: Any
    weights: Sequence[Any]
    biases: Sequence[Any | None]
    c: Any | None
    f: Any | None
    alpha: Any | None
    quantized: Quantized | None = None

    def __post_init__(self) -> None:
        if self.c is None and self.quantized is None:
            raise ValueError("pamm::linear_group needs a PAMM payload (C, f, alpha), a quantized X, or both")

    def op_args(self) -> tuple[Any, ...]:
        present = [b for b in self.biases if b is not None]
        args = (self.x, list(self.weights), present, [b is not None for b in self.biases], self.c, self.f,
                self.alpha)
        r = self.quantized
        return args if r is None else (*args, r.q, r.lo, r.scale, r.bits)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> LinearGroup:
        x, weights, present, has_bias, c, f, alpha, *rest = args
        q, lo, scale, bits = (*rest, *(None, None, None, 0)[len(rest):])
        it = iter(present)
        quantized = Quantized(q, lo, scale, bits) if q is not None else None
        return cls(x, list(weights), [next(it) if hb else None for hb in has_bias], c, f, alpha, quantized)


@torch.library.custom_op("pamm::linear_group", mutates_args=())
def linear_group(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    has_bias: Sequence[bool],
    c: Tensor | None,
    f: Tensor | None,
    alpha: Tensor | None,
    q: Tensor | None = None,
    lo: Tensor | None = None,
    scale: Tensor | None = None,
    bits: int = 0,
) -> list[Tensor]:
    """Y_j = X W_j^T + b_j for every projection of the group (exact); see :class:`LinearGroup`."""
    if _compat.forward_ad_active():
        # Custom ops drop tangents silently; refuse rather than return a wrong jvp.
        raise NotImplementedError(
            "pamm: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) through a PAMM-compressed "
            "projection is not supported; compile this model with backend='inductor' for forward-mode AD."
        )
    call = LinearGroup.from_op_args((x, weights, biases, has_bias, c, f, alpha, q, lo, scale, bits))
    xc = x.to(call.weights[0].dtype)
    return [torch.nn.functional.linear(xc, w, b) for w, b in zip(call.weights, call.biases)]


@linear_group.register_fake
def _(*args: Any) -> list[Tensor]:
    call = LinearGroup.from_op_args(args)
    return [call.x.new_empty(*call.x.shape[:-1], w.shape[0], dtype=w.dtype) for w in call.weights]


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    call = LinearGroup.from_op_args(inputs)
    r = call.quantized
    ctx.save_for_backward(call.c, call.f, call.alpha, *call.weights, *((r.q, r.lo, r.scale) if r else ()))
    ctx.num_weights = len(call.weights)
    ctx.x_dtype = call.x.dtype
    ctx.bits = r.bits if r else 0
    ctx.has_bias = [b is not None for b in call.biases]
    # An output that gets no gradient (detached, unused, non-differentiable use) must arrive as None, not
    # zeros: its weight and bias gradients then stay None, exactly as plain leaves them (zeros would let
    # AdamW's weight decay and moments move weights plain training leaves untouched).
    ctx.set_materialize_grads(False)


class DoubleBackwardError(RuntimeError):
    """Differentiating PAMM's backward would differentiate an approximation as if it were exact."""


def _weight_grads(grads: list[Tensor | None], c: Tensor | None, f: Tensor | None, alpha: Tensor | None,
                  weights: list[Tensor], needs_w: Sequence[bool], quantized: Quantized | None) -> list[Tensor | None]:
    """dW_j per projection that needs it, in the weights' (compute) dtype (float32 accumulation in the GEMMs).

    PAMM: B~_j^T C, with only the projections that need a gradient contracted, each dY read as it
    is, and neither C nor a (sum m) x n product ever copied to float32. ``pamm_sr``: dY_j^T X^, with
    X^ = alpha * C_f + deq(q(R)) decoded inside the GEMM's reduction (``pamm::dequant_weight_grad``), so
    no b x n X^ exists and each projection costs one GEMM's reads, as under plain; ``sr``: the same on
    X^ = deq(q(X)). dY is cast to the weights' dtype first (X's compute dtype, as the GEMM on X^ was).
    """
    if quantized is not None:
        dtype, n = weights[0].dtype, weights[0].shape[1]
        return [weight_grad(DequantWeightGrad(rows_of(g).to(dtype), quantized, c, f, alpha, n, w.dtype)) if need
                else None
                for g, w, need in zip(grads, weights, needs_w)]
    bt = weight_contraction(Contract([g for g, need in zip(grads, needs_w) if need], f, alpha, c.shape[0]))
    out: list[Tensor | None] = []
    offset = 0
    for w, need in zip(weights, needs_w):
        if not need:
            out.append(None)
            continue
        m = w.shape[0]
        out.append(bt[:, offset : offset + m].t().to(c.dtype).mm(c).to(w.dtype))
        offset += m
    return out


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple:
    if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
        raise DoubleBackwardError(
            "pamm: double backward (create_graph=True, gradient penalties, Hessian-vector products) through a "
            "PAMM-compressed projection is not supported: its weight gradient is an approximation. Compile this "
            "model with backend='inductor', or exclude the projection (e.g. freeze it)."
        )
    c, f, alpha, *rest = ctx.saved_tensors
    weights, payload = rest[: ctx.num_weights], rest[ctx.num_weights :]
    quantized = Quantized(*payload, ctx.bits) if payload else None
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    dx = None
    if needs_x:
        # Last member first: the order autograd accumulates the separate linears' dX in, so ratio 1 is
        # bitwise plain. Each contribution is cast to X's dtype before the sum, as autocast's per-linear
        # casts of X are (a no-op without autocast).
        for g, w in reversed(list(zip(grads, weights))):
            if g is not None:
                part = g.matmul(w).to(ctx.x_dtype)
                dx = part if dx is None else dx + part
    dweights: list[Tensor | None] = [None] * len(weights)
    wanted_w = [need and g is not None for need, g in zip(needs_w, grads)]
    if any(wanted_w):
        dweights = _weight_grads(grads, c, f, alpha, weights, wanted_w, quantized)
    with_bias = [g for g, hb in zip(grads, ctx.has_bias) if hb]
    dbiases = [rows_of(g).sum(0) if need and g is not None else None for g, need in zip(with_bias, needs_b)]
    # One entry per argument the caller passed: the dispatcher drops trailing ones equal to their
    # defaults (plain PAMM passes no low-bit payload), while setup_context sees them filled in.
    return (dx, dweights, dbiases) + (None,) * (len(ctx.needs_input_grad) - 3)


linear_group.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.pamm.linear_group)
def _linear_group_flops(x_shape: Sequence[int], w_shapes: Sequence[Sequence[int]], *args: Any,
                        **kwargs: Any) -> int:
    """One GEMM per projection: 2 * b * n * m_j."""
    b = math.prod(x_shape[:-1])
    return sum(2 * b * w[0] * w[1] for w in w_shapes)


def emit(graph: fx.Graph, call: LinearGroup) -> tuple[fx.Node, list[fx.Node]]:
    """The op node for ``call`` (whose tensors are nodes) at the graph's insertion point, and one
    output node per projection, in the order of ``call.weights``."""
    node = graph.call_function(torch.ops.pamm.linear_group.default, call.op_args())
    return node, [graph.call_function(operator.getitem, (node, i)) for i in range(len(call.weights))]


def parse(node: fx.Node) -> LinearGroup | None:
    """The arguments of a ``pamm::linear_group`` node (FX nodes where the graph has them), else None."""
    if node.op == "call_function" and node.target is torch.ops.pamm.linear_group.default:
        return LinearGroup.from_op_args(node.args)
    return None
