"""Weight-gradient estimators: what a group keeps of X for its backward, and how its dW is formed from it.

Each estimator is a frozen dataclass of one site's options (its ratio, bits, generator floors), in the
manner of torchao's config objects: the type knows its transform. :class:`PammConfig` resolves the
``estimator`` option once into one object per site (:meth:`pamm_fx.config.PammConfig.estimator_at`); the
match puts it on each :class:`~pamm_fx.passes.match.Group`, and everything downstream reads its
properties, never its name:

======================  =======================================================================
reader                  what it asks the estimator
======================  =======================================================================
config                  :func:`names` (option validation), :meth:`Estimator.at` (a site's object)
check table             :attr:`~Estimator.generators` (min_tokens, all_rows_kept), bytes per row
                        (small_rows), :meth:`~Estimator.inexact_at_full_ratio` (exact_ratio)
plan (``Estimate``)     k and its formula, saved bytes, weight-gradient FLOPs, the low-bit bytes
rewrite                 :meth:`~Estimator.emit`: the ops that keep the payload, in the graph
report                  :func:`settings`, :meth:`~Estimator.note`, :meth:`~Estimator.summary`
======================  =======================================================================

What an estimator keeps is composed from two payloads: PAMM's generators (C, f, alpha;
:class:`~pamm_fx.ops.compress.Generators` says how many) and a low-bit copy in the format of
:mod:`pamm_fx.kernels.lowbit` (:class:`~pamm_fx.kernels.lowbit.LowBit`), the same format ``saved``
applies to any tensor the partitioner keeps (:mod:`pamm_fx.saved`).

Adding an estimator: a subclass here with its ``name`` (that registers it) and what differs from the
base (its payload, FLOPs, ``emit``, report note), its kernels if it needs any, its tests
(``docs/architecture.md``, "How to add an estimator").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import fx

from pamm_fx.kernels.lowbit import LowBit
from pamm_fx.ops.compress import Compress, Generators
from pamm_fx.ops.compress import emit as emit_compress
from pamm_fx.ops.lowbit import Quantize, Quantized
from pamm_fx.ops.lowbit import emit as emit_quantize

__all__ = ["INDEX_BYTES_PER_ROW", "REGISTRY", "Estimator", "Kept", "Pamm", "PammSR", "SR", "names", "settings"]

#: Bytes PAMM keeps per row of X whatever the ratio: f (int32) and alpha (float32).
INDEX_BYTES_PER_ROW = 8

#: Every estimator class by its option name, in definition order.
REGISTRY: dict[str, type[Estimator]] = {}


def names() -> tuple[str, ...]:
    """The valid values of the ``estimator`` option (besides ``"auto"`` and the per-site dict)."""
    return tuple(REGISTRY)


def settings(name: str, bits: int | None, ratio: str) -> str:
    """An estimator's options as a report's group line prints them, from the report's data (a report read
    from JSON has the name, not the object)."""
    cls = REGISTRY.get(name)
    text = f"estimator={name}" + (f" bits={bits}" if bits is not None else "")
    return text + (f"  ratio={ratio}" if cls is None or cls.shows_ratio else "")


@dataclasses.dataclass(frozen=True)
class Kept:
    """The payload nodes an estimator wrote for one group: what ``pamm::linear_group`` saves for the backward
    (C, f, alpha: PAMM's generators, or None; ``quantized``: a low-bit copy, or None)."""

    c: fx.Node | None = None
    f: fx.Node | None = None
    alpha: fx.Node | None = None
    quantized: Quantized | None = None


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One estimator at one site's options; subclasses register under :attr:`name`.

    ratio: generators per row of X where there are generators; where there are none, only whether it is 1
    (every row as it is) counts.
    """

    #: The ``estimator`` option's value that selects it.
    name: ClassVar[str] = ""
    #: Bits of its low-bit payload when the ``bits`` option is None (None: it keeps no low-bit payload).
    default_bits: ClassVar[int | None] = None
    #: Whether its ratio sets what it keeps, so that a report prints it.
    shows_ratio: ClassVar[bool] = True

    ratio: Fraction

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    @classmethod
    def at(cls, ratio: Fraction, options: Mapping[str, Any]) -> Estimator:
        """The estimator at a site's ``ratio`` with the config's other options (``bits``, ``min_generators``,
        ``min_tokens``, ``eps``), taking what it uses."""
        return cls(ratio)

    # --- what it keeps ---------------------------------------------------------------------------

    @property
    def generators(self) -> Generators | None:
        """How many generator rows it keeps (None: no generators, k = 0)."""
        return None

    @property
    def lowbit(self) -> LowBit | None:
        """The low-bit format of its payload (None: none)."""
        return None

    @property
    def bits(self) -> int | None:
        """Bits per element of its low-bit payload (None: none)."""
        return self.lowbit.bits if self.lowbit is not None else None

    def kept_bytes_per_row(self, n: int, dtype: torch.dtype) -> int:
        """Bytes kept per row of X whatever the ratio, besides the generators C: f and alpha where there are
        generators, plus the low-bit payload's codes, lo and scale."""
        payload = self.lowbit.bytes_per_row(n, dtype) if self.lowbit is not None else 0
        return payload + (INDEX_BYTES_PER_ROW if self.generators is not None else 0)

    def k(self, b: Any) -> Any:
        """Generator rows kept of b rows (b may be a SymInt)."""
        return self.generators.k(b) if self.generators is not None else 0

    def k_formula(self) -> str:
        """k as a formula of b (the one formula, :meth:`pamm_fx.ops.compress.Generators.formula`)."""
        return self.generators.formula() if self.generators is not None else "no generators, k = 0"

    def k_text(self, k: int) -> str:
        """What a report prints for k: the formula and its value."""
        return f"{self.k_formula()} = {k}" if self.generators is not None else self.k_formula()

    def saved_bytes(self, b: int, n: int, dtype: torch.dtype) -> int:
        """Bytes kept for the backward of a (b, n) X of ``dtype``: the generators and the per-row payload."""
        return self.k(b) * n * dtype.itemsize + b * self.kept_bytes_per_row(n, dtype)

    def lowbit_bytes(self, b: int, n: int, dtype: torch.dtype) -> int:
        """Bytes of the low-bit payload alone (0 without one)."""
        return b * self.lowbit.bytes_per_row(n, dtype) if self.lowbit is not None else 0

    def wgrad_flops(self, b: int, n: int, m: int) -> int:
        """FLOPs of the weight gradients of projections of total width m: plain's GEMM on what it decodes."""
        return 2 * b * n * m

    def inexact_at_full_ratio(self) -> str | None:
        """None when ratio 1 gives plain's weight gradients exactly; else what it keeps instead (ratio 1 then
        leaves the group exact, as plain)."""
        return None

    # --- the graph --------------------------------------------------------------------------------

    def emit(self, graph: fx.Graph, x: fx.Node, seed: fx.Node, salt: int) -> Kept:
        """Write the ops that compute its payload from ``x`` (X detached, in the compute dtype) at the graph's
        insertion point, with the per-call ``seed`` and the group's ``salt``."""
        raise NotImplementedError

    # --- the report -------------------------------------------------------------------------------

    def note(self, lowbit_bytes: str) -> str | None:
        """A report's note on what it keeps (``lowbit_bytes``: the payload's size, formatted), or None."""
        return None

    def summary(self, k: int) -> str:
        """A few words on what it keeps, as the demo's table prints them."""
        return f"k={k}"


@dataclasses.dataclass(frozen=True)
class Pamm(Estimator):
    """The paper: k generator rows C and, per row of X, its generator f and scale alpha; dW = B~^T C, biased.

    The weight-gradient GEMM shrinks from b to k rows plus one pass over dY. At ratio 1 (k = b) C = X and the
    weight gradients are plain's.
    """

    name: ClassVar[str] = "pamm"

    min_generators: int = 1
    min_tokens: int = 1
    eps: float = math.inf

    @classmethod
    def at(cls, ratio: Fraction, options: Mapping[str, Any]) -> Estimator:
        return cls(ratio, options["min_generators"], options["min_tokens"], options["eps"])

    @property
    def generators(self) -> Generators:
        return Generators(self.ratio, self.min_generators, self.min_tokens)

    def wgrad_flops(self, b: int, n: int, m: int) -> int:
        """B~ = P^T dY (b * m adds), then B~^T C: 2 * k * n * m + 2 * b * m."""
        return 2 * self.k(b) * n * m + 2 * b * m

    def emit(self, graph: fx.Graph, x: fx.Node, seed: fx.Node, salt: int) -> Kept:
        _, (c, f, alpha) = emit_compress(graph, Compress(x, seed, self.generators, self.eps, salt))
        return Kept(c, f, alpha)


@dataclasses.dataclass(frozen=True)
class PammSR(Pamm):
    """PAMM plus its residual R = X - alpha C_f at ``bits`` bits with stochastic rounding: dW = dY^T X^ with
    X^ = X~ + deq(q(R)), unbiased given C, at plain's weight-gradient FLOPs."""

    name: ClassVar[str] = "pamm_sr"
    default_bits: ClassVar[int | None] = 4

    residual_bits: int = 4

    @classmethod
    def at(cls, ratio: Fraction, options: Mapping[str, Any]) -> Estimator:
        bits = options["bits"] if options.get("bits") is not None else cls.default_bits
        return cls(ratio, options["min_generators"], options["min_tokens"], options["eps"], bits)

    @property
    def lowbit(self) -> LowBit:
        return LowBit(self.residual_bits)

    def wgrad_flops(self, b: int, n: int, m: int) -> int:
        """Plain's GEMM on X^ = X~ + deq(R): 2 * b * n * m."""
        return 2 * b * n * m

    def emit(self, graph: fx.Graph, x: fx.Node, seed: fx.Node, salt: int) -> Kept:
        kept = super().emit(graph, x, seed, salt)
        _, quantized = emit_quantize(graph, Quantize(x, kept.c, kept.f, kept.alpha, seed, salt, self.residual_bits))
        return dataclasses.replace(kept, quantized=quantized)

    def note(self, lowbit_bytes: str) -> str | None:
        return (f"estimator {self.name}: the saved bytes include the residual at {self.bits} bits, {lowbit_bytes} "
                "(codes, lo and scale per row); its weight gradients are plain's GEMMs on X^ = X~ + deq(R)")


@dataclasses.dataclass(frozen=True)
class SR(Estimator):
    """No generators: X alone at ``bits`` bits with stochastic rounding, dW = dY^T deq(q(X)), unbiased, at
    plain's weight-gradient FLOPs. It has no exact branch: at ratio 1 the group stays exact, as plain."""

    name: ClassVar[str] = "sr"
    default_bits: ClassVar[int | None] = 8
    shows_ratio: ClassVar[bool] = False  # no generators: only ratio 1 (left exact) matters

    x_bits: int = 8

    @classmethod
    def at(cls, ratio: Fraction, options: Mapping[str, Any]) -> Estimator:
        return cls(ratio, options["bits"] if options.get("bits") is not None else cls.default_bits)

    @property
    def lowbit(self) -> LowBit:
        return LowBit(self.x_bits)

    def inexact_at_full_ratio(self) -> str | None:
        return f"it keeps X at {self.bits} bits"

    def emit(self, graph: fx.Graph, x: fx.Node, seed: fx.Node, salt: int) -> Kept:
        _, quantized = emit_quantize(graph, Quantize(x, None, None, None, seed, salt, self.x_bits))
        return Kept(quantized=quantized)

    def note(self, lowbit_bytes: str) -> str | None:
        return (f"estimator {self.name}: keeps only X at {self.bits} bits with stochastic rounding, {lowbit_bytes} "
                "(codes, lo and scale per row; no generators); its weight gradients are plain's GEMMs on "
                "deq(q(X)), unbiased")

    def summary(self, k: int) -> str:
        return f"X at {self.bits} bits"
