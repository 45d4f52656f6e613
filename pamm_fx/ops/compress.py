"""``pamm::compress(x, seed, ratio_num, ratio_den, min_generators, min_tokens, eps, salt) -> (C, f, alpha)``.

Samples k generator rows of X and assigns every row to its nearest generator; no autograd (it
only produces what the backward will need). This module owns the op's whole contract: the
schema, the fake kernel (k = min(b, max(min_generators, ceil(p * b / q))) on SymInts, so that
dynamic batch/sequence sizes never force a recompile), the decomposition Inductor compiles, the
autograd registration, the flop formula, and :class:`Compress`, the typed form of its arguments
that :func:`emit` writes into a graph and :func:`parse` reads back. The ratio travels as a
``Fraction`` everywhere else; only :meth:`Compress.op_args` splits it into the (p, q) ints the
schema carries (custom-op schemas have no rational type).

GPU-first rules:

* The rows are drawn on X's device from the int64 ``seed`` tensor by a counter-based
  hash (:func:`sample_generators`): no host synchronisation, no CPU RNG, and the
  draw is a pure function of (seed, salt, b, k), so a recomputation draws the same
  rows and seeded runs are bitwise reproducible across processes.
* Inductor sees the compression: a decomposition registered in Inductor's table
  turns the op into aten ops (CPU: the similarity GEMM and an argmax, measured
  faster than the chunked eager kernel) or into the traceable Triton assignment
  (CUDA), as :func:`pamm_fx.kernels.assign.traceable` decides. ``aot_eager`` and eager mode
  run the custom op as it is.
* The partitioner never recomputes it: the decomposition tags the nodes producing
  C, f and alpha ``MUST_SAVE``, so under any ``activation_memory_budget`` the small
  compressed tensors are saved rather than X plus a second compression.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils.flop_counter import register_flop_formula

from pamm_fx import _compat
from pamm_fx.config import num_generators
from pamm_fx.kernels import assign as assign_kernels
from pamm_fx.kernels.hashing import M32 as _M32
from pamm_fx.kernels.hashing import mix32 as _mix32
from pamm_fx.kernels.hashing import stream_key
from pamm_fx.ops.decompositions import decomposition
from pamm_fx.ops.forward_only import emit_outputs, register_non_differentiable

__all__ = ["Compress", "compress", "emit", "parse", "record_compressions", "sample_generators"]


def sample_generators(b: Any, k: Any, seed: Tensor, salt: int) -> Tensor:
    """k distinct row indices in [0, b), ascending, drawn on ``seed``'s device from (seed, salt).

    Counter-based: row i gets the key hash(seed, salt, i) (31 random bits above i, so keys are
    distinct and no tie is ever broken by an implementation), and the k smallest keys win: a
    uniform draw without replacement, with no host synchronisation and no RNG state. Sorting keeps
    C in token order, so k == b gives C = X and f = identity. ``seed`` is an int64 scalar tensor.
    """
    key = stream_key(seed, salt)
    rows = torch.arange(b, dtype=torch.int64, device=seed.device)
    keys = ((_mix32(_mix32(rows & _M32) ^ key) >> 1) << 32) | rows
    return (keys.topk(k, largest=False, sorted=False).values & _M32).sort().values


def rows_of(x: Tensor) -> Tensor:
    """X (..., n) as its (b, n) rows."""
    return x.reshape(-1, x.shape[-1])


@dataclasses.dataclass(frozen=True)
class Compress:
    """The arguments of one ``pamm::compress`` call, typed: tensors (or the FX nodes making them)
    and the options. The positional order of the schema exists only in :meth:`op_args` and
    :meth:`from_op_args`, so a new argument is a change in this module alone.

    seed: an int64 scalar tensor (fresh every step, ideally on X's device); salt tells apart the
    groups of one graph so that they draw different rows from the same seed.
    """

    x: Any
    seed: Any
    ratio: Fraction
    min_generators: int
    min_tokens: int
    eps: float
    salt: int

    def op_args(self) -> tuple[Any, ...]:
        """The op's positional arguments."""
        r = self.ratio
        return (self.x, self.seed, r.numerator, r.denominator, self.min_generators, self.min_tokens, self.eps,
                self.salt)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> Compress:
        x, seed, num, den, min_generators, min_tokens, eps, salt = args
        return cls(x, seed, Fraction(num, den), min_generators, min_tokens, eps, salt)

    def k(self, b: Any) -> Any:
        """Generators for b rows (b may be a SymInt)."""
        r = self.ratio
        return num_generators(b, r.numerator, r.denominator, self.min_generators, self.min_tokens)


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
    call: Compress, assign: Callable[[Tensor, Tensor, float], Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """C, f, alpha of X's rows; k == b is the exact branch (C = X, f = identity).

    Shared by the eager op and the decomposition Inductor compiles, which differ only in ``assign``.
    """
    rows = rows_of(call.x)
    b = rows.shape[0]
    k = call.k(b)
    if k == b:
        f = torch.arange(b, dtype=torch.int32, device=rows.device)
        return rows.clone(), f, torch.ones(b, dtype=torch.float32, device=rows.device)
    c = rows.index_select(0, sample_generators(b, k, call.seed.to(rows.device), call.salt))
    f, alpha = assign(rows, c, call.eps)
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
    """Compress X (..., n) into C (k, n, X's dtype), f (b,) int32, alpha (b,) float32 (see :class:`Compress`)."""
    call = Compress(x, seed, Fraction(ratio_num, ratio_den), min_generators, min_tokens, eps, salt)
    c, f, alpha = _compress_rows(call, assign_kernels.assign)
    for seen in _recorders:
        seen.append((rows_of(x).clone(), c.clone(), f.clone(), alpha.clone()))
    return c, f, alpha


@compress.register_fake
def _(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    call = Compress.from_op_args(args)
    x = call.x
    n = x.shape[-1]
    b = x.numel() // n if n != 0 else math.prod(x.shape[:-1])
    return x.new_empty(call.k(b), n), x.new_empty(b, dtype=torch.int32), x.new_empty(b, dtype=torch.float32)


register_non_differentiable(compress)


def _compress_decomposition(*args: Any) -> Any:
    """What Inductor compiles for ``pamm::compress`` (same arguments): the draw, the gather and the
    assignment in traceable ops (aten, or the Triton kernel on CUDA), with C, f, alpha tagged MUST_SAVE."""
    c, f, alpha = _compress_rows(Compress.from_op_args(args), assign_kernels.traceable)
    # Without MUST_SAVE the partitioner prices the compression by its tiny outputs and, under an
    # activation_memory_budget, keeps X and compresses again in the backward.
    _compat.tag_must_save(c, f, alpha)
    return c, f, alpha


decomposition(torch.ops.pamm.compress.default)(_compress_decomposition)


# The flop formula, so that FlopCounterMode (and with it the partitioner's runtime estimator under an
# activation_memory_budget) prices the op instead of counting it as free.
@register_flop_formula(torch.ops.pamm.compress)
def _compress_flops(x_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """The similarity GEMM: 2 * b * n * k."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * out_shape[0][0]


def emit(graph: fx.Graph, call: Compress) -> tuple[fx.Node, tuple[fx.Node, fx.Node, fx.Node]]:
    """The op node for ``call`` (whose x and seed are nodes) at the graph's insertion point, and its
    C, f, alpha outputs; with example values when X has one (fake), so later passes see shapes."""
    node, parts = emit_outputs(graph, torch.ops.pamm.compress.default, call.op_args(), call.x, 3)
    return node, tuple(parts)  # type: ignore[return-value]


def parse(node: fx.Node) -> Compress | None:
    """The arguments of a ``pamm::compress`` node (FX nodes where the graph has them), else None."""
    if node.op == "call_function" and node.target is torch.ops.pamm.compress.default:
        return Compress.from_op_args(node.args)
    return None
