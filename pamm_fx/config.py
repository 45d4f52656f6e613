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

__all__ = ["PammConfig", "TARGETS"]

#: Which projection sites are compressed. Only attention inputs for now.
TARGETS = ("qkv",)

# Ratios are kept as exact fractions p/q so that k = ceil(p*b/q) is integer
# arithmetic on (possibly symbolic) b; floats like 1/3 are snapped to the nearest
# fraction with a denominator below this bound.
_MAX_DENOMINATOR = 1 << 20


def _parse_ratio(value: Any) -> Fraction:
    if isinstance(value, bool):
        raise ValueError(f"pamm option 'ratio' must be a number in (0, 1], got {value!r}")
    if isinstance(value, str):
        try:
            frac = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"pamm option 'ratio' must be a number in (0, 1] such as 0.015625 or '1/64', got {value!r}"
            ) from None
    elif isinstance(value, (int, float, Fraction)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"pamm option 'ratio' must be a number in (0, 1], got {value!r}")
        frac = Fraction(value).limit_denominator(_MAX_DENOMINATOR)
    else:
        raise ValueError(
            f"pamm option 'ratio' must be a number in (0, 1], got {type(value).__name__} {value!r}"
        )
    if not 0 < frac <= 1:
        raise ValueError(f"pamm option 'ratio' must be in (0, 1], got {value!r}")
    return frac


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"pamm option {name!r} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"pamm option {name!r} must be an int >= {minimum}, got {value!r}")
    return value


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
    min_generators: floor on k, so small batches do not collapse to a few rows.
    targets: which projection sites to compress; one of :data:`TARGETS`.
    """

    ratio: float = 1 / 64
    seed: int | None = None
    eps: float = math.inf
    min_tokens: int = 128
    min_generators: int = 16
    targets: str = "qkv"

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
        if self.targets not in TARGETS:
            raise ValueError(f"pamm option 'targets' must be one of {list(TARGETS)}, got {self.targets!r}")

    @property
    def ratio_fraction(self) -> Fraction:
        """The ratio as p/q, the form the graph carries."""
        return Fraction(self.ratio).limit_denominator(_MAX_DENOMINATOR)

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

    def num_generators(self, b: int) -> int:
        """k for b rows (concrete ints; the graph uses the same formula on SymInts)."""
        frac = self.ratio_fraction
        return min(b, max(self.min_generators, -(-frac.numerator * b // frac.denominator)))
