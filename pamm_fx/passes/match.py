"""Form groups: candidates (structure) that pass every semantic check (the check table).

Works on Dynamo's torch-level graph (before AOTAutograd), after
:func:`pamm_fx.passes.normalize.normalize_linears`. Why that IR: there a projection is one
``linear`` node whose weight is a graph input or attribute that we can tell is a trainable
parameter, its consumers (views, splits, RoPE, attention) are still the user's torch calls,
and replacing it by an op with a registered backward makes AOTAutograd save exactly what that
backward needs. In the ATen graph the same projection is already split into ``t``/``mm``/
``addmm`` in the forward and a separate ``mm`` in the backward.

Matching never mutates the graph and never looks at module or parameter names:
:func:`pamm_fx.passes.structure.find_candidates` lists every linear with its region and site,
each :data:`pamm_fx.passes.checks.PROJECTION_CHECKS` entry may leave one exact (with its
reason), the survivors are grouped by (X, compute dtype, region, estimator at its ratio), and each
:data:`pamm_fx.passes.checks.GROUP_CHECKS` entry may leave a whole group exact.

Every group records its members' compute dtype, their output's (:func:`pamm_fx.passes.checks.compute_dtype`),
and is keyed on it: under ``torch.autocast`` that is autocast's bf16/f16 whatever X's dtype (a bf16 X read
by float32 weights and a float32 X alike), and the rewrite casts whichever of X, weights and biases are not
in it, because custom ops do not follow autocast.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from pamm_fx.config import SITES, PammConfig
from pamm_fx.estimators import Estimator
from pamm_fx.fxutil import Region, hint, val
from pamm_fx.names import param_name
from pamm_fx.passes import checks
from pamm_fx.passes.categories import Rejection
from pamm_fx.passes.structure import Candidate, find_candidates

__all__ = ["Projection", "Group", "Rejection", "MatchResult", "find_groups"]


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear node of a group; names as the user knows them, taken while Dynamo's metadata lasts."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_features: int
    site: str
    weight_name: str
    bias_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    """Trainable projections reading ``x`` in one region and compute dtype, compressed together.

    site: the first of :data:`pamm_fx.config.SITES` among its members' sites (``qkv`` if any feeds attention);
    dtype: the members' compute dtype (their output's: autocast's under autocast, else X's);
    estimator: every member's, at their ratio (:attr:`PammConfig.sites`): the checks, the rewrite, the
    estimates and the reports read what is kept, how and at what cost from it, never from the options.
    """

    x: fx.Node
    projections: tuple[Projection, ...]
    site: str
    region: Region
    dtype: torch.dtype
    estimator: Estimator


@dataclasses.dataclass
class MatchResult:
    groups: list[Group]
    rejections: list[Rejection]


def _first_failure(c: Candidate, gm: fx.GraphModule, config: PammConfig) -> tuple[checks.Check, str] | None:
    for check in checks.PROJECTION_CHECKS:
        reason = check.fn(c, gm, config)
        if reason is not None:
            return check, reason
    return None


def _keeps_x_saved(c: Candidate, gm: fx.GraphModule) -> bool:
    """An exact linear for which autograd saves its X: a trainable weight, with grad, not checkpointed."""
    return c.checkpoint is None and c.region.grad_enabled and checks.requires_grad(gm, c.weight)


def _site(members: list[Candidate]) -> str:
    sites = {c.site for c in members}
    return next(s for s in SITES if s in sites)


def _projection(c: Candidate) -> Projection:
    bias = c.bias if isinstance(c.bias, fx.Node) else None
    bias_name = param_name(bias) if bias is not None else None
    return Projection(c.node, c.weight, bias, hint(val(c.weight).shape[0]), c.site, c.weight_name, bias_name)


def find_groups(gm: fx.GraphModule, config: PammConfig, grad_enabled: bool = True) -> MatchResult:
    """Group the graph's projections by the X they read; say why each other linear is left alone.

    grad_enabled: the grad mode the graph starts in (Dynamo guards on it; regions inside may change it).
    """
    candidates = find_candidates(gm, grad_enabled)
    rejections: list[Rejection] = []
    drafts: dict[tuple, list[Candidate]] = {}
    exact: list[Candidate] = []
    for c in candidates:
        failure = _first_failure(c, gm, config)
        if failure is not None:
            rejections.append(Rejection(c.node, failure[1], failure[0].name, c.weight_name))
            if failure[0].known_linear and _keeps_x_saved(c, gm):
                exact.append(c)
            continue
        key = (c.x, checks.compute_dtype(c), c.region.index, config.estimator_at(c.site))
        drafts.setdefault(key, []).append(c)

    groups: list[Group] = []
    for (x, dtype, _, estimator), members in drafts.items():
        readers = tuple(c for c in exact if c.x is x)
        draft = checks.GroupDraft(gm, x, tuple(members), dtype, readers, estimator)
        failure = next(((k.name, r) for k in checks.GROUP_CHECKS if (r := k.fn(draft, config)) is not None), None)
        if failure is not None:
            rejections.extend(Rejection(c.node, failure[1], failure[0], c.weight_name) for c in members)
            continue
        projections = tuple(_projection(c) for c in members)
        groups.append(Group(x, projections, _site(members), members[0].region, dtype, estimator))
    return MatchResult(groups, rejections)
