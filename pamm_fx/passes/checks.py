"""The semantic checks, as a table: each named check either passes a candidate or says why not.

Structure (:mod:`pamm_fx.passes.structure`) finds candidates; these checks decide which may be
compressed. A check's name is the stable ``category`` that logs, ``explain()`` and tools see (each row
declares it in :mod:`pamm_fx.passes.categories`, with the categories decided elsewhere), and its reason
is the sentence for people. The rules they enforce:

- only a *parameter*'s weight gradient may be approximated: a weight that is an activation
  (a graph input after a graph break, a computed tensor) is left exact;
- a projection computed without grad (``torch.no_grad``) is never a member, and a group never
  spans a grad-mode or autocast boundary (candidates are grouped per region);
- size decisions must hold for every call the graph serves: the size checks apply only where
  the size is static (the graph is guarded on it); a dynamic size is decided inside the op on
  every call (``k`` is symbolic, and ``k == b`` is the exact branch).

:data:`PROJECTION_CHECKS` run on each candidate in order; :data:`GROUP_CHECKS` on each would-be
group (the candidates that passed, keyed by X, compute dtype, region and ratio).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import fx

from pamm_fx import _compat
from pamm_fx.config import PammConfig
from pamm_fx.estimators import Estimator
from pamm_fx.fxutil import hint, is_parameter, is_static, op_name, requires_grad, rows, storage, val, written
from pamm_fx.passes.categories import CATEGORIES, declare
from pamm_fx.passes.structure import Candidate, attention_output_of

__all__ = [
    "AUTOCAST_DTYPES",
    "NO_ATTENTION",
    "GROUP_CHECKS",
    "PROJECTION_CHECKS",
    "Check",
    "GroupDraft",
    "cast_inputs",
    "compute_dtype",
    "disabled",
]

#: Dtypes autocast computes linears in; a cast of X, weight or bias to any other dtype is not autocast's.
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
@dataclasses.dataclass(frozen=True)
class GroupDraft:
    """The candidates that passed every projection check and read the same X in one region."""

    gm: fx.GraphModule
    x: fx.Node
    members: tuple[Candidate, ...]
    #: The members' compute dtype (:func:`compute_dtype`: their output's).
    dtype: torch.dtype
    #: Linears of the graph that stay exact and still make autograd save X (for their own dW).
    exact_readers: tuple[Candidate, ...]
    #: The members' estimator at their ratio (:attr:`PammConfig.sites`): the group checks ask it what it keeps.
    estimator: Estimator


@dataclasses.dataclass(frozen=True)
class Check:
    """A named rule: ``fn`` returns None to pass, else the reason the projection stays exact.

    known_linear: whether a candidate this check refuses is still a well-formed linear of the graph (its X
    and weight graph values of known shapes), so that the match may ask whether autograd keeps its X saved.
    """

    name: str
    fn: Callable[..., str | None]
    doc: str
    known_linear: bool = True


#: Checks run on each candidate, in registration order: (candidate, graph, config) -> reason or None.
PROJECTION_CHECKS: list[Check] = []
#: Checks run on each would-be group, in registration order: (draft, config) -> reason or None.
GROUP_CHECKS: list[Check] = []


def _check(table: list[Check], name: str, doc: str,
           known_linear: bool = True) -> Callable[[Callable[..., str | None]], Callable[..., str | None]]:
    """Register a function as the next row of ``table`` (and its name as a category), like Inductor's
    pattern registrations."""
    declare(name, doc, "projection" if table is PROJECTION_CHECKS else "group")

    def register(fn: Callable[..., str | None]) -> Callable[..., str | None]:
        table.append(Check(name, fn, doc, known_linear))
        return fn

    return register


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Run without the named checks, for measuring what a rule is worth (benchmarks, tests); never
    for training: the checks that guard correctness (grad mode, parameters, sizes) exist for a reason."""
    known = {c.name for c in PROJECTION_CHECKS + GROUP_CHECKS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown pamm check(s) {unknown}; valid checks are {sorted(known)}")
    saved = list(PROJECTION_CHECKS), list(GROUP_CHECKS)
    PROJECTION_CHECKS[:] = [c for c in saved[0] if c.name not in names]
    GROUP_CHECKS[:] = [c for c in saved[1] if c.name not in names]
    try:
        yield
    finally:
        PROJECTION_CHECKS[:], GROUP_CHECKS[:] = saved


def compute_dtype(c: Candidate) -> torch.dtype:
    """The dtype the linear computes in: its output's. Under autocast that is autocast's dtype whatever
    X's, the weight's and the bias' dtypes are (each is cast to it, as autocast casts them); elsewhere
    it is X's, which the weight's and bias' must then equal."""
    out = val(c.node)
    return out.dtype if isinstance(out, torch.Tensor) else val(c.x).dtype


def cast_inputs(c: Candidate) -> list[str]:
    """Which of X, the weight and the bias are not in the compute dtype (autocast casts them)."""
    dtype = compute_dtype(c)
    named = (("X", c.x), ("weight", c.weight), ("bias", c.bias))
    return [name for name, node in named if isinstance(v := val(node), torch.Tensor) and v.dtype != dtype]


# --- projection checks: (candidate, graph, config) -> reason or None ---------------------------


@_check(PROJECTION_CHECKS, "checkpointed", "not inside a torch.utils.checkpoint region (X is not saved there)")
def _checkpointed(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if c.checkpoint is None:
        return None
    return (f"inside an activation-checkpoint region ({c.checkpoint}): autograd recomputes X in the backward "
            "instead of saving it, so compressing X would save no memory (and measured no speed gain, "
            "docs/checkpointing.md); left exact. To stack PAMM with activation savings use "
            "torch._functorch.config.activation_memory_budget instead of checkpointing")


@_check(PROJECTION_CHECKS, "not_graph_value", "X and the weight are graph values", known_linear=False)
def _graph_value(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if isinstance(c.x, fx.Node) and isinstance(c.weight, fx.Node):
        return None
    return "input or weight is not a graph value"


@_check(PROJECTION_CHECKS, "shape", "known shapes, a 2-D weight", known_linear=False)
def _shape(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    xv, wv = val(c.x), val(c.weight)
    if isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor) and xv.dim() >= 1 and wv.dim() == 2:
        return None
    return "unknown shapes or a weight that is not 2-D"


@_check(PROJECTION_CHECKS, "dtype", "a floating-point X")
def _dtype(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    xv = val(c.x)
    return None if xv.is_floating_point() else f"input dtype {xv.dtype} is not floating point"


@_check(PROJECTION_CHECKS, "not_parameter", "the weight is a parameter of the model")
def _parameter(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if is_parameter(gm, c.weight):
        return None
    return ("weight is not a parameter (an activation or a plain tensor input, e.g. after a graph break): "
            "only parameters' weight gradients may be approximated")


@_check(PROJECTION_CHECKS, "frozen", "the weight requires grad")
def _trainable(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if requires_grad(gm, c.weight):
        return None
    return "frozen weight: no weight gradient, so X is not saved for it"


@_check(PROJECTION_CHECKS, "no_grad", "the projection runs with grad enabled")
def _grad_mode(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if c.region.grad_enabled:
        return None
    return "computed without grad (a torch.no_grad region): no weight gradient to approximate"


@_check(PROJECTION_CHECKS, "autocast", "X, weight and bias are in its output's dtype, or that dtype is "
        "autocast's bf16/f16 (which the rewrite casts them to)")
def _autocast(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    dtype = compute_dtype(c)
    casts = cast_inputs(c)
    if not casts or dtype in AUTOCAST_DTYPES:
        return None
    return f"computes in {dtype}, which {' and '.join(casts)} are not in, and not as autocast would (bf16/f16)"


@_check(PROJECTION_CHECKS, "no_attention", "under targets='qkv', its output feeds attention")
def _attention(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if config.targets != "qkv" or c.site == "qkv":
        return None
    return "output does not feed attention (targets='qkv')"


#: The category ``explain()`` re-reads once it knows the graph breaks (a projection whose X leaves the graph).
NO_ATTENTION = CATEGORIES["no_attention"]


@_check(PROJECTION_CHECKS, "not_target", "its site (pamm_fx.config.SITES) is one of the targets")
def _target(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if config.estimator_at(c.site) is not None:
        return None
    return f"site '{c.site}' is not in targets={config.targets!r}"




@_check(PROJECTION_CHECKS, "lora_b", "it is not a LoRA B, whose X is its A's r-wide output")
def _lora_b(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> str | None:
    if not c.adapter_b:
        return None
    return ("a LoRA B: its X is A's r-wide output, small next to A's X, and its gradient is the adapter's "
            "update (measured in docs/benchmarks.md, LoRA)")


# --- group checks: (draft, config) -> reason or None --------------------------------------------


@_check(GROUP_CHECKS, "min_tokens", "a static X has at least min_tokens rows (dynamic: decided per call; "
        "estimator 'sr' quantizes any b)")
def _min_tokens(d: GroupDraft, config: PammConfig) -> str | None:
    b = rows(val(d.x))
    # A dynamic b is decided per call inside pamm::compress. An estimator without generators has no per-call
    # exact branch, so it ignores min_tokens whether b is static or not (one decision for every call): a few
    # rows at 8 bits still save.
    gens = d.estimator.generators
    if gens is None or not is_static(b) or hint(b) >= gens.min_tokens:
        return None
    return f"X has {hint(b)} rows, below min_tokens={gens.min_tokens}"


@_check(GROUP_CHECKS, "exact_ratio", "under estimator 'sr', the ratio is below 1")
def _exact_ratio(d: GroupDraft, config: PammConfig) -> str | None:
    est = d.estimator
    if est.ratio < 1 or (kept := est.inexact_at_full_ratio()) is None:
        return None
    return (f"ratio 1 asks for every row of X as it is, and estimator {est.name!r} has no exact branch ({kept}): "
            "left exact, as plain")


@_check(GROUP_CHECKS, "small_rows", "a row of X is larger than what the estimator keeps per row whatever the "
        "ratio (f and alpha; the residual under pamm_sr; the quantized X under sr)")
def _row_bytes(d: GroupDraft, config: PammConfig) -> str | None:
    n, dtype = hint(val(d.x).shape[-1]), d.dtype
    row_bytes, kept = n * dtype.itemsize, d.estimator.kept_bytes_per_row(n, dtype)
    if row_bytes > kept:
        return None
    return f"a row of X is {row_bytes} bytes, no more than the {kept} estimator {d.estimator.name} keeps per row"


@_check(GROUP_CHECKS, "all_rows_kept", "a static X has more rows than k (dynamic: decided per call; "
        "estimator 'sr' has no k)")
def _all_rows_kept(d: GroupDraft, config: PammConfig) -> str | None:
    b = rows(val(d.x))
    gens = d.estimator.generators
    if gens is None or gens.ratio == 1 or not is_static(b):
        return None
    b = hint(b)
    if gens.k(b) < b:
        return None
    return f"X has {b} rows, not more than min_generators={gens.min_generators}: every row would be kept"


@_check(GROUP_CHECKS, "saved_anyway", "no exact trainable linear keeps X saved anyway")
def _saved_anyway(d: GroupDraft, config: PammConfig) -> str | None:
    if not d.exact_readers:
        return None
    names = ", ".join(sorted({c.weight_name for c in d.exact_readers}))
    return (f"X is saved for backward anyway, for the weight gradient of {names} (left exact), so compressing "
            "it would add memory instead of saving it")


@_check(GROUP_CHECKS, "attention_output", "X is not an attention output that attention's backward saves anyway "
        "(without an activation_memory_budget)")
def _attention_output(d: GroupDraft, config: PammConfig) -> str | None:
    attention = attention_output_of(d.x)
    if attention is None or _compat.activation_memory_budget() < 1:
        # Under a memory budget the partitioner may recompute the attention in the backward; then
        # the output is not kept and compressing X does save memory (measured: docs/benchmarks.md).
        return None
    return (f"X is the attention output ({attention.name}) up to transposes and reshapes; the attention's "
            "backward saves it anyway, so compressing it would save no memory")


def _writes(gm: fx.GraphModule) -> list[tuple[int, fx.Node, object]]:
    """(position, writing node, storage key) for every write to a tensor's storage in the graph."""
    return [(i, node, key) for i, node in enumerate(gm.graph.nodes) for t in written(node)
            if (key := storage(t)) is not None]


@_check(GROUP_CHECKS, "written_between", "X's storage is not written after the group's first projection reads "
        "it, nor a member's weight or bias between the first projection and that member")
def _written_between(d: GroupDraft, config: PammConfig) -> str | None:
    order = {n: i for i, n in enumerate(d.gm.graph.nodes)}
    first = min(order[c.node] for c in d.members)
    x_key = storage(d.x)
    for pos, node, key in _writes(d.gm):
        if pos <= first:
            continue
        if key == x_key or (x_key is None and d.x in written(node)):
            readers = ", ".join(c.weight_name for c in d.members if order[c.node] < pos)
            return (f"X's storage is written by {node.name} ({op_name(node)}) after {readers} read it: plain "
                    "autograd computes their weight gradients from the written X (or refuses the in-place "
                    "write), and a fused op would compute every member before the write; left exact")
        for c in d.members:
            params = [p for p in (c.weight, c.bias) if isinstance(p, fx.Node)]
            if pos < order[c.node] and any(storage(p) == key for p in params):
                return (f"a weight or bias of {c.weight_name} is written by {node.name} ({op_name(node)}) between "
                        "the group's first projection and its own: a fused op would read it before the write; "
                        "left exact")
    return None
