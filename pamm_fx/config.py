"""Validated options of the ``pamm`` backend.

``torch.compile(model, backend="pamm", options={...})`` hands us a plain dict; this
module turns it into a frozen :class:`PammConfig` or raises one ``ValueError`` that
names the bad key or value and what would be valid. Validation happens when the
backend is created, so a typo fails at ``torch.compile`` time, not mid-training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch

__all__ = ["num_generators", "PammConfig", "SITES", "TARGETS"]

#: Valid values of the ``targets`` option (also the keys of its dict form): ``"qkv"`` the inputs of
#: attention's Q/K/V projections, ``"mlp"`` the inputs of an MLP's up/gate and down projections,
#: ``"all"`` every trainable linear (in a dict: every site not named otherwise).
TARGETS = ("qkv", "mlp", "all")
#: The site a group is classified as (:attr:`pamm_fx.passes.match.Group.site`); "other" is any
#: trainable linear that is neither, compressed only by ``"all"``.
SITES = ("qkv", "mlp", "other")

# Ratios are kept as exact fractions p/q so that k = ceil(p*b/q) is integer
# arithmetic on (possibly symbolic) b; floats like 1/3 are snapped to the nearest
# fraction with a denominator below this bound.
_MAX_DENOMINATOR = 1 << 20


def _parse_ratio(value: Any, what: str = "option 'ratio'") -> Fraction:
    if isinstance(value, bool):
        raise ValueError(f"pamm {what} must be a number in (0, 1], got {value!r}")
    if isinstance(value, str):
        try:
            frac = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"pamm {what} must be a number in (0, 1] such as 0.015625 or '1/64', got {value!r}"
            ) from None
    elif isinstance(value, (int, float, Fraction)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"pamm {what} must be a number in (0, 1], got {value!r}")
        frac = Fraction(value).limit_denominator(_MAX_DENOMINATOR)
    else:
        raise ValueError(f"pamm {what} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not 0 < frac <= 1:
        raise ValueError(f"pamm {what} must be in (0, 1], got {value!r}")
    return frac


def _parse_targets(value: Any) -> str | tuple[tuple[str, float | None], ...]:
    """A target name stays a string; a dict or a list of names becomes sorted (site, ratio) pairs.

    Pairs rather than a dict keep the config hashable; ``None`` means "the global ratio".
    """
    valid = list(TARGETS)
    if isinstance(value, str):
        if value not in TARGETS:
            raise ValueError(f"pamm option 'targets' must be one of {valid} or a dict of them to ratios, got {value!r}")
        return value
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple, set, frozenset)) and value:
        items = [item if isinstance(item, tuple) and len(item) == 2 else (item, None) for item in value]
    else:
        raise ValueError(
            f"pamm option 'targets' must be one of {valid}, a list of them, or a dict of them to ratios such as "
            f"{{'qkv': 1/256, 'mlp': 1/32}}, got {value!r}"
        )
    if not items:
        raise ValueError(f"pamm option 'targets' must name at least one of {valid}, got {value!r}")
    pairs: dict[str, float | None] = {}
    for site, ratio in items:
        if site not in TARGETS:
            raise ValueError(f"pamm option 'targets' has an unknown site {site!r}; valid sites are {valid}")
        what = f"ratio of targets[{site!r}]"
        pairs[site] = None if ratio is None else float(_parse_ratio(ratio, what))
    return tuple(sorted(pairs.items()))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"pamm option {name!r} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"pamm option {name!r} must be an int >= {minimum}, got {value!r}")
    return value


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
class PammConfig:
    """Options of the PAMM rewrite.

    ratio: fraction of the b token rows kept as generators, k = ceil(ratio * b).
    seed: ``None`` draws each step's generator rows from torch's global RNG (so
        ``torch.manual_seed`` makes runs reproducible); an int uses a private
        generator seeded once, still giving different rows at every step.
    eps: neighbourhood tolerance; a row whose relative projection error exceeds it
        is dropped from the weight gradient (``inf`` keeps every row, the paper's best).
    min_tokens: groups whose X has fewer rows than this stay exact (compressing a
        handful of rows saves nothing and only adds noise).
    min_generators: floor on k, so small batches do not collapse to a few rows. Quality
        follows k, not the ratio: at 2,048 tokens per step, k = 16-32 cost 3-4% validation
        loss and k = 256 none (docs/benchmarks.md), hence 256; from 16,384 tokens per
        step on, ratio 1/64 alone gives k >= 256.
    targets: which projection sites to compress: one of :data:`TARGETS`, a list of
        them, or a dict of them to per-site ratios (``{"qkv": 1/256, "mlp": 1/32}``;
        a dict's ``"all"`` covers every site not named). Stored as given for a name,
        else as sorted ``(site, ratio_or_None)`` pairs.
    """

    ratio: float = 1 / 64
    seed: int | None = None
    eps: float = math.inf
    min_tokens: int = 128
    min_generators: int = 256
    targets: str | tuple[tuple[str, float | None], ...] = "qkv"

    def __post_init__(self) -> None:
        frac = _parse_ratio(self.ratio)
        object.__setattr__(self, "ratio", float(frac))
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or math.isnan(self.eps):
            raise ValueError(f"pamm option 'eps' must be a float >= 0 (inf keeps every row), got {self.eps!r}")
        if self.eps < 0:
            raise ValueError(f"pamm option 'eps' must be a float >= 0 (inf keeps every row), got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        _check_int("min_tokens", self.min_tokens, 1)
        _check_int("min_generators", self.min_generators, 1)
        object.__setattr__(self, "targets", _parse_targets(self.targets))

    @property
    def ratio_fraction(self) -> Fraction:
        """The ratio as p/q, the form the graph carries."""
        return Fraction(self.ratio).limit_denominator(_MAX_DENOMINATOR)

    def site_ratio(self, site: str) -> Fraction | None:
        """The ratio for groups of ``site`` (one of :data:`SITES`), or None where it is not a target."""
        named = {self.targets: None} if isinstance(self.targets, str) else dict(self.targets)
        if site in named:
            ratio = named[site]
        elif "all" in named:
            ratio = named["all"]
        else:
            return None
        return self.ratio_fraction if ratio is None else Fraction(ratio).limit_denominator(_MAX_DENOMINATOR)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PammConfig:
        """Build a config from a ``torch.compile(options=...)`` dict."""
        if options is None:
            return cls()
        if isinstance(options, PammConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"pamm options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown pamm option(s) {unknown}; valid options are {valid}")
        return cls(**options)

    def num_generators(self, b: int, site: str | None = None) -> int:
        """k for b rows at ``site``'s ratio (the formula the graph evaluates on SymInts)."""
        frac = (self.site_ratio(site) if site is not None else None) or self.ratio_fraction
        return num_generators(b, frac.numerator, frac.denominator, self.min_generators, self.min_tokens)
