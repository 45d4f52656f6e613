"""``pamm::compress(x, seed, ratio_num, ratio_den, min_generators, min_tokens, eps, salt) -> (C, f, alpha)``.

Samples k generator rows of X and assigns every row to its nearest generator; no autograd (it
only produces what the backward will need). This module owns the op's whole contract: the
schema, the fake kernel (k = min(b, max(min_generators, ceil(p * b / q))) on SymInts, so that
dynamic batch/sequence sizes never force a recompile), the decomposition Inductor compiles, the
autograd registration, the flop formula, and :class:`Compress`, the typed form of its arguments
that :func:`emit` writes into a graph and :func:`parse` reads back. It also owns k: :class:`Generators`
is the one formula (and the one text of it) that the op, the estimators, the checks and the reports use.
The ratio travels as a ``Fraction`` everywhere else; only :meth:`Compress.op_args` splits it into the
(p, q) ints the schema carries (custom-op schemas have no rational type).

GPU-first rules:

* The rows are drawn on X's device from the int64 ``seed`` tensor by a counter-based
  hash (:func:`sample_generators`): no host synchronisation, no CPU RNG, and the
  draw is a pure function of (seed, salt, b, k), so a recomputation draws the same
  rows and seeded runs are bitwise reproducible across processes.
* Inductor sees the compression on CPU: the decomposition the backend hands it
  (:mod:`pamm_fx.ops.decompositions`) turns the op into aten ops (the similarity GEMM and an
  argmax, measured faster than the chunked eager kernel). Where the Triton assignment runs
  (CUDA) the op stays whole and its eager body launches the kernel
  (:class:`pamm_fx.kernels.device.Kernels`). ``aot_eager`` and eager mode run the custom op as it is.
* The partitioner never recomputes it: the decomposition tags the nodes producing
  C, f and alpha ``MUST_SAVE`` (a whole op's outputs are never recomputed anyway), so under any
  ``activation_memory_budget`` the small compressed tensors are saved rather than X plus a second
  compression.
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
from pamm_fx.kernels.assign import KERNELS as ASSIGN
from pamm_fx.kernels.device import rows_of
from pamm_fx.kernels.hashing import M32 as _M32
from pamm_fx.kernels.hashing import mix32 as _mix32
from pamm_fx.ops.decompositions import decomposition
from pamm_fx.ops.forward_only import emit_outputs, register_non_differentiable
from pamm_fx.ops.noise import stream_key

__all__ = ["Compress", "Generators", "compress", "emit", "num_generators", "parse", "record_compressions",
           "sample_generators"]


def num_generators(b: Any, ratio_num: int, ratio_den: int, min_generators: int, min_tokens: int = 1) -> Any:
    """k for b rows: b (exact) when b < min_tokens, else min(b, max(min_generators, ceil(ratio * b))).

    b may be an int or a SymInt. The "stay exact below min_tokens" branch is integer arithmetic
    (``b // min_tokens`` is 0 exactly when b < min_tokens), so on a SymInt it is part of the symbolic
    k rather than a guard: a graph compiled for dynamic sizes takes the decision again on every call.
    """
    k = (ratio_num * b + ratio_den - 1) // ratio_den
    below = b - b * torch.sym_min(1, b // min_tokens)  # b if b < min_tokens else 0
    return torch.sym_min(b, torch.sym_max(torch.sym_max(min_generators, k), below))


@dataclasses.dataclass(frozen=True)
class Generators:
    """How many generator rows a compression keeps: the one k formula, evaluated here and printed from here.

    ratio: generators per row of X; min_generators: the floor on k; min_tokens: below it every row is kept
    (k = b: the exact branch).
    """

    ratio: Fraction
    min_generators: int
    min_tokens: int

    def k(self, b: Any) -> Any:
        """Generators for b rows (b may be a SymInt)."""
        r = self.ratio
        return num_generators(b, r.numerator, r.denominator, self.min_generators, self.min_tokens)

    def formula(self) -> str:
        """k as a formula of b, as reports print it."""
        text = f"k = min(b, max({self.min_generators}, ceil(b*{self.ratio})))"
        return text + (f", b if b < {self.min_tokens}" if self.min_tokens > 1 else "")


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
    generators: Generators
    eps: float
    salt: int

    def op_args(self) -> tuple[Any, ...]:
        """The op's positional arguments."""
        g = self.generators
        return (self.x, self.seed, g.ratio.numerator, g.ratio.denominator, g.min_generators, g.min_tokens, self.eps,
                self.salt)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> Compress:
        x, seed, num, den, min_generators, min_tokens, eps, salt = args
        return cls(x, seed, Generators(Fraction(num, den), min_generators, min_tokens), eps, salt)

    def k(self, b: Any) -> Any:
        """Generators for b rows (b may be a SymInt)."""
        return self.generators.k(b)


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
    call = Compress.from_op_args((x, seed, ratio_num, ratio_den, min_generators, min_tokens, eps, salt))
    c, f, alpha = _compress_rows(call, ASSIGN.eager)
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
    assignment in aten ops, with C, f, alpha tagged MUST_SAVE; NotImplemented where the assignment runs
    in Triton (the op then stays whole: its eager body launches the kernel)."""
    call = Compress.from_op_args(args)
    rows = rows_of(call.x)
    if ASSIGN.uses_triton(rows, None, call.eps):
        return NotImplemented
    c, f, alpha = _compress_rows(call, ASSIGN.aten)
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
