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

GPU-first rules for ``compress``:

* The rows are drawn on X's device from the int64 ``seed`` tensor by a counter-based
  hash (:func:`sample_generators`): no host synchronisation, no CPU RNG, and the
  draw is a pure function of (seed, salt, b, k), so a recomputation draws the same
  rows and seeded runs are bitwise reproducible across processes.
* Inductor sees the compression: a decomposition registered in Inductor's table
  turns the op into aten ops (CPU: the similarity GEMM and an argmax, measured
  faster than the chunked eager kernel) or into the traceable Triton assignment
  (CUDA). ``aot_eager`` and eager mode run the custom op as it is.
* The partitioner never recomputes it: the decomposition tags the nodes producing
  C, f and alpha ``MUST_SAVE``, so under any ``activation_memory_budget`` the small
  compressed tensors are saved rather than X plus a second compression.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pamm_fx import _compat, kernels
from pamm_fx.config import num_generators
from pamm_fx.kernels import reference

__all__ = [
    "DoubleBackwardError",
    "compress",
    "linear_group",
    "num_generators",
    "record_compressions",
    "sample_generators",
]

log = logging.getLogger(__name__)

_M32 = (1 << 32) - 1
#: Odd 27-bit multiplier of a 32-bit integer hash (x ^= x >> 16; x *= H; ...): a 32-bit value times it
#: stays below 2^59, so int64 arithmetic never overflows on any device or compiler.
_HASH_MUL = 0x45D9F3B


def _mix32(x: Tensor | int) -> Any:
    """A 32-bit integer hash on int64 values in [0, 2^32) (tensors or Python ints alike)."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def sample_generators(b: Any, k: Any, seed: Tensor, salt: int) -> Tensor:
    """k distinct row indices in [0, b), ascending, drawn on ``seed``'s device from (seed, salt).

    Counter-based: row i gets the key hash(seed, salt, i) (31 random bits above i, so keys are
    distinct and no tie is ever broken by an implementation), and the k smallest keys win: a
    uniform draw without replacement, with no host synchronisation and no RNG state. Sorting keeps
    C in token order, so k == b gives C = X and f = identity. ``seed`` is an int64 scalar tensor.
    """
    s = seed.to(torch.int64)
    lo = _mix32((s & _M32) ^ _mix32(salt & _M32))
    key = _mix32(((s >> 32) & _M32) ^ _mix32(lo ^ ((salt >> 32) & _M32)))
    rows = torch.arange(b, dtype=torch.int64, device=seed.device)
    keys = ((_mix32(_mix32(rows & _M32) ^ key) >> 1) << 32) | rows
    return (keys.topk(k, largest=False, sorted=False).values & _M32).sort().values


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


_recorders: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = []


@contextlib.contextmanager
def record_compressions() -> Iterator[list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
    """Collect ``(x_rows, C, f, alpha)`` (clones) of every compression the eager kernel computes.

    A test hook for eager calls and ``backend="pamm_aot_eager"``, where every ``pamm::compress`` runs
    its eager kernel. Under ``backend="pamm"`` Inductor compiles the op's decomposition instead
    (Inductor refuses an op that has both), so nothing is recorded there: read the saved C, f, alpha.
    """
    seen: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def _compress_rows(
    rows: Tensor, seed: Tensor, k: Any, eps: float, salt: int, assign: Callable[[Tensor, Tensor, float], Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """C, f, alpha of (b, n) rows with k generators; k == b is the exact branch (C = X, f = identity).

    Shared by the eager op and the decomposition Inductor compiles, which differ only in ``assign``.
    """
    b = rows.shape[0]
    if k == b:
        f = torch.arange(b, dtype=torch.int32, device=rows.device)
        return rows.clone(), f, torch.ones(b, dtype=torch.float32, device=rows.device)
    c = rows.index_select(0, sample_generators(b, k, seed.to(rows.device), salt))
    f, alpha = assign(rows, c, eps)
    return c, f, alpha


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

    seed: an int64 scalar tensor (fresh every step, ideally on X's device); salt tells apart the
    groups of one graph so that they draw different rows from the same seed.
    """
    rows = _rows(x)
    c, f, alpha = _compress_rows(rows, seed, num_generators(rows.shape[0], ratio_num, ratio_den, min_generators,
                                                            min_tokens), eps, salt, kernels.assign)
    for seen in _recorders:
        seen.append((rows.clone(), c.clone(), f.clone(), alpha.clone()))
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


def _assign_aten(rows: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`pamm_fx.kernels.reference.assign` in whole-tensor aten ops, for Inductor to fuse.

    The b x k float32 similarity exists transiently (Inductor fuses |.|, the argmax and the gather
    into one pass over it); the chunked eager kernel avoids it but measured slower on CPU.
    """
    b = rows.shape[0]
    work = reference.compute_dtype(rows.dtype)
    cf = c.to(work)
    norms = torch.linalg.vector_norm(cf, dim=1)
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    xf = rows.to(work)
    sim = xf @ (cf * inv[:, None]).t()
    arg = sim.abs().argmax(dim=1)
    signed = sim.gather(1, arg[:, None]).squeeze(1)
    alpha = signed * inv[arg]
    finite = torch.isfinite(sim).all(dim=1)
    if math.isfinite(eps):
        row_sq = (xf * xf).sum(dim=1)
        keep = (row_sq - signed * signed).clamp_min(0) <= (eps * eps) * row_sq
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        dropped = (~keep).sum()
        beta = torch.where((dropped > 0) & (dropped < b), b / (b - dropped).double(), 1.0)
        alpha = alpha * beta.to(work)
    return arg.to(torch.int32), reference.poison_non_finite(alpha, finite)


def _traceable_assign(rows: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The assignment Inductor can see: the Triton op on CUDA, whole-tensor aten ops elsewhere."""
    if kernels.use_triton(rows, rows.dtype):
        from pamm_fx.kernels import triton_assign

        return triton_assign.assign_triton(rows, c, eps)
    return _assign_aten(rows, c, eps)


def _compress_decomposition(*args: Any) -> Any:
    """What Inductor compiles for ``pamm::compress`` (same arguments): the draw, the gather and the
    assignment in traceable ops (aten, or the Triton kernel on CUDA), with C, f, alpha tagged MUST_SAVE."""
    x, seed, ratio_num, ratio_den, min_generators, min_tokens, eps, salt = args
    rows = _rows(x)
    k = num_generators(rows.shape[0], ratio_num, ratio_den, min_generators, min_tokens)
    c, f, alpha = _compress_rows(rows, seed, k, eps, salt, _traceable_assign)
    # Without MUST_SAVE the partitioner prices the compression by its tiny outputs and, under an
    # activation_memory_budget, keeps X and compresses again in the backward.
    _compat.tag_must_save(c, f, alpha)
    return c, f, alpha


_compat.register_inductor_decomposition(torch.ops.pamm.compress.default, _compress_decomposition)


@torch.library.custom_op("pamm::contract", mutates_args=())
def contract(grads: Sequence[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ (k, sum m_j) = sum over rows i with f_i = j of alpha_i * [dY_1 | dY_2 | ...]_i, accumulated in
    float32 (float64 when a dY is float64)."""
    return kernels.contract(list(grads), f, alpha, k)


@contract.register_fake
def _(grads, f, alpha, k):
    width = sum(g.shape[-1] for g in grads)
    return f.new_empty(k, width, dtype=reference.accumulation_dtype([g.dtype for g in grads]))


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
    if _compat.forward_ad_active():
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
    # An output that gets no gradient (detached, unused, non-differentiable use) must arrive as None, not
    # zeros: its weight and bias gradients then stay None, exactly as plain leaves them (zeros would let
    # AdamW's weight decay and moments move weights plain training leaves untouched).
    ctx.set_materialize_grads(False)


class DoubleBackwardError(RuntimeError):
    """Differentiating PAMM's backward would differentiate an approximation as if it were exact."""


def _weight_grads(grads: list[Tensor | None], c: Tensor, f: Tensor, alpha: Tensor, weights: list[Tensor],
                  needs_w: Sequence[bool]) -> list[Tensor | None]:
    """dW_j = B~_j^T C per projection that needs it, in C's dtype (float32 accumulation in the GEMM).

    Only the projections that need a gradient are contracted, each dY is read as it is, and
    neither C nor a (sum m) x n product is ever copied to float32.
    """
    wanted = [g for g, need in zip(grads, needs_w) if need]
    if all(kernels.use_triton(f, g.dtype) for g in wanted):
        # Traceable twin: AOTAutograd decomposes it, so Inductor sees the Triton kernel.
        from pamm_fx.kernels import triton_contract

        bt = triton_contract.contract_triton(wanted, f, alpha, c.shape[0])
    else:
        bt = torch.ops.pamm.contract(wanted, f, alpha, c.shape[0])
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
    c, f, alpha, *weights = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    live = [g is not None for g in grads]
    dx = None
    if needs_x:
        # Last member first: the order autograd accumulates the separate linears' dX in, so ratio 1 is
        # bitwise plain.
        for g, w in reversed(list(zip(grads, weights))):
            if g is not None:
                dx = g.matmul(w) if dx is None else dx + g.matmul(w)
    dweights: list[Tensor | None] = [None] * len(weights)
    wanted_w = [need and ok for need, ok in zip(needs_w, live)]
    if any(wanted_w):
        dweights = _weight_grads(grads, c, f, alpha, weights, wanted_w)
    with_bias = [g for g, hb in zip(grads, ctx.has_bias) if hb]
    dbiases = [_rows(g).sum(0) if need and g is not None else None for g, need in zip(with_bias, needs_b)]
    return dx, dweights, dbiases, None, None, None, None


linear_group.register_autograd(_backward, setup_context=_setup_context)


# Flop formulas, so that FlopCounterMode (and with it the partitioner's runtime estimator under an
# activation_memory_budget) prices the pamm ops instead of counting them as free.
@register_flop_formula(torch.ops.pamm.compress)
def _compress_flops(x_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """The similarity GEMM: 2 * b * n * k."""
    n = x_shape[-1]
    k = out_shape[0][0]
    b = math.prod(x_shape[:-1])
    return 2 * b * n * k


@register_flop_formula(torch.ops.pamm.linear_group)
def _linear_group_flops(x_shape: Sequence[int], w_shapes: Sequence[Sequence[int]], *args: Any,
                        **kwargs: Any) -> int:
    """One GEMM per projection: 2 * b * n * m_j."""
    b = math.prod(x_shape[:-1])
    return sum(2 * b * w[0] * w[1] for w in w_shapes)


@register_flop_formula(torch.ops.pamm.contract)
def _contract_flops(g_shapes: Sequence[Sequence[int]], *args: Any, **kwargs: Any) -> int:
    """A scale and an add per element of every dY."""
    return sum(2 * math.prod(s) for s in g_shapes)
