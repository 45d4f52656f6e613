"""One plan per graph, read by everyone: the backend, ``explain()``, the test helpers and the CLI.

::

    Dynamo graph ──plan()──> Plan ──apply()──> rewritten graph ──> Inductor (or aot_eager)
                              │
                              └──> explain() report, capture_rewrites() records, CLI, logs

:func:`plan` copies the captured graph and runs the passes on the copy, in this order (each in its own
module, none importing a later one):

1. :func:`~pamm_fx.passes.mha.decompose_attention`: ``nn.MultiheadAttention``'s opaque call written out;
2. :func:`~pamm_fx.passes.normalize.normalize_linears`: every projection as ``linear(x, w, b)``;
3. :func:`~pamm_fx.passes.unrecognised.unrecognised_products`: a scan naming parameters read in any
   other form (changes nothing);
4. :func:`~pamm_fx.passes.match.find_groups`: candidates (:mod:`~pamm_fx.passes.structure`), the check
   table (:mod:`~pamm_fx.passes.checks`), groups;

then fixes everything the rewrite will do (groups, salts, k as a formula, estimated bytes and FLOPs).
:func:`apply` carries it out on another copy (5. :func:`~pamm_fx.passes.rewrite.rewrite_groups`).
Nothing else matches or rewrites, so what ``explain()`` prints is what the backend does.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat, seed
from pamm_fx.config import PammConfig
from pamm_fx.fxutil import copy_graph_module, hint, is_parameter, is_static, requires_grad, rows, val
from pamm_fx.names import fmt_value
from pamm_fx.passes.categories import Rejection
from pamm_fx.passes.match import Group, find_groups
from pamm_fx.passes.mha import decompose_attention
from pamm_fx.passes.normalize import normalize_linears
from pamm_fx.passes.rewrite import rewrite_groups
from pamm_fx.passes.unrecognised import unrecognised_products

__all__ = ["Estimate", "Plan", "apply", "plan", "salt_base"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What a group changes, at the example sizes (``dynamic``: b differs from call to call).

    Before: X (b x n) saved, dW = dY^T X in 2*b*n*m FLOPs. After: what the group's estimator says it keeps
    (:meth:`~pamm_fx.estimators.Estimator.saved_bytes`: generators C (k x n) with f and alpha per row, a
    low-bit payload of ``lowbit_bytes``, or both) and its weight-gradient FLOPs
    (:meth:`~pamm_fx.estimators.Estimator.wgrad_flops`). ``k_formula`` is k as a report prints it: the
    estimator's formula of b and its value here (:meth:`~pamm_fx.estimators.Estimator.k_text`).
    """

    b: int
    n: int
    m: int
    k: int
    dynamic: bool
    b_expr: str
    k_formula: str
    saved_bytes_before: int
    saved_bytes_after: int
    wgrad_flops_before: int
    wgrad_flops_after: int
    lowbit_bytes: int = 0


@dataclasses.dataclass
class Plan:
    """Everything the rewrite of one graph will do, and why each other linear stays exact.

    graph: the normalized copy of ``original`` that groups and rejections refer to;
    salt_base: group i draws its rows with salt ``salt_base + i``;
    error: why matching failed (then there are no groups and the graph compiles as captured).
    """

    original: fx.GraphModule
    graph: fx.GraphModule
    config: PammConfig
    groups: list[Group]
    rejections: list[Rejection]
    salt_base: int
    compile_id: str | None
    error: str | None = None

    @property
    def seed_device(self) -> torch.device:
        """Where the per-call seed lives (:func:`pamm_fx.seed.device_of` the groups' X, else the graph's
        tensor inputs: the saved-tensor pass needs it on the model's device too)."""
        xs = [val(g.x) for g in self.groups] or [val(n) for n in self.graph.graph.find_nodes(op="placeholder")]
        return seed.device_of(x for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point())

    @property
    def needs_seed(self) -> bool:
        """Whether the compiled graph takes the per-call seed: it has groups, or compresses saved tensors."""
        return bool(self.groups) or self.config.saved != "exact"

    @property
    def weight_grad_inputs(self) -> frozenset[int]:
        """Positions of the graph's inputs that are trainable parameters (whose gradients are weight
        gradients): the saved-tensor pass's ``"wgrad"`` mode compresses only what feeds those alone."""
        inputs = self.original.graph.find_nodes(op="placeholder")
        return frozenset(i for i, n in enumerate(inputs)
                         if is_parameter(self.original, n) and requires_grad(self.original, n))

    def estimate(self, group: Group) -> Estimate:
        xv = val(group.x)
        b_sym, n = rows(xv), hint(xv.shape[-1])
        b = hint(b_sym)
        m = sum(p.out_features for p in group.projections)
        dtype = group.dtype  # plain saves X as its linears read it: cast to the compute dtype under autocast
        est = group.estimator
        k = est.k(b)
        return Estimate(
            b=b, n=n, m=m, k=k,
            dynamic=not is_static(b_sym),
            b_expr=str(b_sym),
            k_formula=est.k_text(k),
            saved_bytes_before=b * n * dtype.itemsize,
            saved_bytes_after=est.saved_bytes(b, n, dtype),
            wgrad_flops_before=2 * b * n * m,
            wgrad_flops_after=est.wgrad_flops(b, n, m),
            lowbit_bytes=est.lowbit_bytes(b, n, dtype),
        )


def salt_base() -> int:
    """Tell apart the graphs of one program (graph breaks, recompiles) so that, with a fixed ``seed``,
    their groups still sample different rows; Dynamo's compile id is stable across processes."""
    cid = _compat.compile_id()
    if cid is None:
        return 0
    return (cid[0] << 24 | cid[1] << 16) & ((1 << 62) - 1)


def plan(gm: fx.GraphModule, example_inputs: Sequence[Any], config: PammConfig) -> Plan:
    """Decide the rewrite of ``gm`` (a Dynamo graph); ``gm`` itself is never modified.

    The graph's starting grad mode is the current one (Dynamo guards on it); ``example_inputs`` are
    accepted for the backend signature and future use of their fake mode.
    """
    del example_inputs  # shapes come from the nodes' example values
    work, _ = copy_graph_module(gm)
    grad_enabled = torch.is_grad_enabled()
    result = Plan(gm, work, config, [], [], salt_base(), _compat.compile_id_text())
    try:  # every stage of planning, estimates included: never fail a user's compile because of us
        with _compat.observe_pass(work, "pamm_decompose_attention"):
            decompose_attention(work, grad_enabled)
        with _compat.observe_pass(work, "pamm_normalize_linears"):
            normalize_linears(work)
        unrecognised = unrecognised_products(work)
        match = find_groups(work, config, grad_enabled)
        rejections = [*unrecognised, *match.rejections]
        for g in match.groups:
            log.info("pamm %s group (%s): X=%s %s -> %s", g.site, g.estimator, g.x.name, fmt_value(val(g.x)),
                     [p.weight_name for p in g.projections])
        for r in rejections:
            log.info("pamm leaves %s exact [%s]: %s", r.weight_name, r.category, r.reason)
        for g in match.groups:
            est = result.estimate(g)
            if est.dynamic:
                log.info("pamm: X=%s %s has a dynamic row count b=%s: k is decided on every call (%s)",
                         g.x.name, fmt_value(val(g.x)), est.b_expr, g.estimator.k_formula())
    except Exception:
        log.warning("pamm: planning failed; compiling the captured graph untouched", exc_info=True)
        result.error = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return result
    result.groups, result.rejections = match.groups, rejections
    return result


def apply(p: Plan) -> fx.GraphModule | None:
    """The rewritten copy of the planned graph (its groups fused, the per-call seed added), or None when
    the plan needs neither."""
    if not p.needs_seed:
        return None
    # Without groups only the seed is added: to the graph as captured (normalization is for matching).
    return rewrite_groups(p.graph if p.groups else p.original, p.groups, salt_base=p.salt_base,
                          seed_device=p.seed_device)
