"""Validated options of the ``pamm`` backend, and where they come from.

``torch.compile(model, backend="pamm", options={...})`` hands us a plain dict; this
module turns it into a frozen :class:`PammConfig` or raises one ``ValueError`` that
names the bad key or value and what would be valid. Validation happens when the
backend is created, so a typo fails at ``torch.compile`` time, not mid-training.

Trainers such as torchtitan take a backend name only, so options can also come from
``PAMM_<OPTION>`` environment variables and from :data:`defaults`, a process-wide object
in the manner of ``torch._inductor.config``; :func:`resolve` merges them (docs/options.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from fractions import Fraction
from typing import Any

from pamm_fx import estimators
from pamm_fx.estimators import Estimator
from pamm_fx.kernels.lowbit import BITS
from pamm_fx.ops.compress import Generators

__all__ = ["PammConfig", "check_option_names", "AUTO_ESTIMATOR", "BITS", "DEFAULT_BITS", "DEFAULT_ESTIMATOR",
           "ESTIMATORS", "SITES", "SITE_FAMILIES", "SAVED_MODES", "TARGETS", "OPTIONS", "defaults", "resolve"]

#: The site a projection is classified as (:mod:`pamm_fx.passes.structure`): attention's Q/K/V
#: projections, attention's output projection, an MLP's up/gate and down projections, a head
#: feeding the loss (LM head, classifier), anything else.
SITES = ("qkv", "attn_out", "mlp_up", "mlp_down", "head", "other")
#: Names that stand for several sites in ``targets``.
SITE_FAMILIES = {"mlp": ("mlp_up", "mlp_down"), "all": SITES}
#: Valid values of the ``targets`` option (also the keys of its dict form): a site, ``"mlp"`` (both
#: MLP sites), ``"all"`` (every trainable linear; in a dict, every site not named otherwise) or ``"none"``
#: (no projection is rewritten: for ``saved`` alone, which compresses what the partitioner keeps).
TARGETS = ("qkv", "attn_out", "mlp", "mlp_up", "mlp_down", "head", "other", "all", "none")
#: Weight-gradient estimators of a group, by name (:mod:`pamm_fx.estimators`, where each is defined):
#: ``"pamm"`` (the paper: dW = B~^T C, biased), ``"pamm_sr"`` (PAMM plus the residual X - X~ at ``bits`` bits
#: with stochastic rounding: unbiased given C) and ``"sr"`` (no generators: X alone at ``bits`` bits with
#: stochastic rounding, dW = dY^T deq(q(X)), unbiased).
ESTIMATORS = estimators.names()
#: The estimator of every group the ``estimator`` option does not name otherwise.
DEFAULT_ESTIMATOR = "pamm"
#: What ``estimator="auto"`` means: PAMM at attention's Q/K/V, X at 8 bits everywhere else: a little less
#: saved than ``"sr"`` everywhere, at a step time within noise of it, but it keeps PAMM's biased q/k/v
#: gradient, which moved a proxy's loss by up to 3.6% in either direction (docs/estimator_study.md, round 2);
#: ``"sr"`` is the recommendation for ``targets="all"``. Resolved per site into :attr:`PammConfig.sites`.
AUTO_ESTIMATOR: Mapping[str, str] = types.MappingProxyType({"qkv": "pamm", "all": "sr"})
#: Values of ``saved``: the partitioner's saved tensors kept as they are, those read only for weight
#: gradients at ``saved_bits``, or every saved activation at ``saved_bits`` (dX approximate).
SAVED_MODES = ("exact", "wgrad", "all")
#: ``bits`` when the option is None, per estimator that keeps a low-bit payload (each estimator's own default).
DEFAULT_BITS: Mapping[str, int] = types.MappingProxyType(
    {name: cls.default_bits for name, cls in estimators.REGISTRY.items() if cls.default_bits is not None})

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
    valid = [t for t in TARGETS if t != "none"]  # in a list or dict
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and "none" in value:
        raise ValueError(f"pamm option 'targets': 'none' stands alone, not in a list or dict, got {value!r}")
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


def _parse_estimator(value: Any) -> str | tuple[tuple[str, str], ...]:
    """A name stays a string (``"auto"`` included); a dict of sites/families to names (or its stored form, the
    pairs) becomes sorted pairs, hashable like ``targets``' dict form."""
    names = [*ESTIMATORS, "auto"]
    if isinstance(value, (tuple, list)) and value and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        value = dict(value)
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"pamm option 'estimator' must be one of {names} or a dict of sites to "
                             f"{list(ESTIMATORS)} such as {dict(AUTO_ESTIMATOR)}, got {value!r}")
        return value
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"pamm option 'estimator' must be one of {names} or a non-empty dict of sites to "
                         f"{list(ESTIMATORS)} such as {dict(AUTO_ESTIMATOR)}, got {value!r}")
    for site, name in value.items():
        if site not in TARGETS:
            raise ValueError(f"pamm option 'estimator' has an unknown site {site!r}; valid sites are {list(TARGETS)}")
        if name not in ESTIMATORS:
            raise ValueError(f"pamm option 'estimator' maps {site!r} to {name!r}; valid estimators in a dict are "
                             f"{list(ESTIMATORS)}")
    return tuple(sorted(value.items()))


def _most_specific(named: Mapping[str, Any], site: str) -> Any:
    """``named``'s entry for ``site``: the site itself, else a family holding it, else ``"all"``; None if none."""
    for name in (site, *(f for f, members in SITE_FAMILIES.items() if site in members and f != "all"), "all"):
        if name in named:
            return named[name]
    return None


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
    seed: ``None`` derives each step's generator rows from ``torch.initial_seed()``
        (so ``torch.manual_seed`` makes runs reproducible) without ever drawing from
        torch's generators (dropout masks and the user's later random numbers are
        plain's); an int roots the same private per-step stream at that value.
    eps: neighbourhood tolerance; a row whose relative projection error exceeds it
        is dropped from the weight gradient (``inf`` keeps every row, the paper's best).
    min_tokens: groups whose X has fewer rows than this stay exact (compressing a
        handful of rows saves nothing and only adds noise); not under ``estimator="sr"``.
    min_generators: floor on k, so small batches do not collapse to a few rows. Quality
        follows k, not the ratio: at 2,048 tokens per step, k = 16-32 cost 3-4% validation
        loss and k = 256 none (docs/benchmarks.md), hence 256; from 16,384 tokens per
        step on, ratio 1/64 alone gives k >= 256.
    targets: which projection sites to compress: one of :data:`TARGETS`, a list of
        them, or a dict of them to per-site ratios (``{"qkv": 1/256, "mlp": 1/32}``;
        a dict's ``"all"`` covers every site not named). Stored as given for a name,
        else as sorted ``(site, ratio_or_None)`` pairs.
    estimator: how a group's weight gradient is formed from what the forward kept: one of
        :data:`ESTIMATORS` for every group, ``"auto"`` (:data:`AUTO_ESTIMATOR`), or a dict of
        sites/families (the keys of ``targets``) to names, most specific first, sites it does not
        name taking ``"pamm"`` (stored as sorted pairs). ``"pamm"`` (the paper) keeps C, f, alpha;
        ``"pamm_sr"`` also keeps the residual R = X - alpha C_f at ``bits`` bits per element with
        stochastic rounding and adds dY^T deq(R), so dW is unbiased given C, for ceil(n * bits / 8)
        + 8 more bytes per row of X; ``"sr"`` keeps X alone at ``bits`` bits (ceil(n * bits / 8) + 8
        bytes per row, no generators), dW = dY^T deq(q(X)), unbiased. Both quantized estimators
        cost plain's weight-gradient FLOPs (docs/options.md). Resolved per site into ``sites``.
    bits: bits per element of the quantized payload (the residual under ``"pamm_sr"``, X under
        ``"sr"``), one of :data:`BITS`; None takes each estimator's :data:`DEFAULT_BITS`.
    saved: what happens to the tensors the partitioner keeps for the backward, after it has chosen them
        (:mod:`pamm_fx.saved`): ``"exact"`` keeps them; ``"wgrad"`` keeps those the backward reads only for
        parameters' weight gradients at ``saved_bits`` with stochastic rounding (dX exact); ``"all"``
        keeps every saved activation so, dX included (dX becomes approximate, unbiased).
    saved_bits: bits per element under ``saved``, one of :data:`BITS`.

    The fields above are the options as the user spelled them, validated (reports and reasons print them so).
    Two fields are derived from them once, here, and are what everything below the config reads:
    ``ratio_fraction`` (the ratio as the exact fraction p/q) and ``sites``, each site's
    :class:`~pamm_fx.estimators.Estimator` at its ratio, or None where the site is not a target.
    """

    ratio: float = 1 / 64
    seed: int | None = None
    eps: float = math.inf
    min_tokens: int = 128
    min_generators: int = 256
    targets: str | tuple[tuple[str, float | None], ...] = "qkv"
    estimator: str | tuple[tuple[str, str], ...] = DEFAULT_ESTIMATOR
    bits: int | None = None
    saved: str = "exact"
    saved_bits: int = 8
    #: The ratio as p/q, the one form of a ratio from here down (plan, group, op emission); only the op's
    #: schema splits it into two ints. ``ratio`` keeps the float users passed and see.
    ratio_fraction: Fraction = dataclasses.field(init=False, repr=False, compare=False)
    #: Each site's estimator at its ratio (None: not a target), resolved from ``targets``, ``estimator`` and
    #: the other options once: what groups carry.
    sites: Mapping[str, Estimator | None] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        frac = _parse_ratio(self.ratio)
        object.__setattr__(self, "ratio", float(frac))
        object.__setattr__(self, "ratio_fraction", frac)
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
        object.__setattr__(self, "estimator", _parse_estimator(self.estimator))
        if self.bits is not None and (type(self.bits) is not int or self.bits not in BITS):
            raise ValueError(f"pamm option 'bits' must be one of {list(BITS)} or None (each estimator's default "
                             f"{dict(DEFAULT_BITS)}), got {self.bits!r}")
        if self.saved not in SAVED_MODES:
            raise ValueError(f"pamm option 'saved' must be one of {list(SAVED_MODES)}, got {self.saved!r}")
        if type(self.saved_bits) is not int or self.saved_bits not in BITS:
            raise ValueError(f"pamm option 'saved_bits' must be one of {list(BITS)}, got {self.saved_bits!r}")
        object.__setattr__(self, "sites", types.MappingProxyType({site: self._resolve(site) for site in SITES}))

    def _resolve(self, site: str) -> Estimator | None:
        """``site``'s estimator at its ratio: the most specific name of ``targets`` (``{"all": 1/64, "mlp": 1/16,
        "mlp_down": 1/4}``) and of ``estimator`` (``"auto"`` is :data:`AUTO_ESTIMATOR`; a site a dict does not
        cover takes :data:`DEFAULT_ESTIMATOR`); None where the site is not a target."""
        named = {self.targets: None} if isinstance(self.targets, str) else dict(self.targets)
        fractions = {name: self.ratio_fraction if r is None else Fraction(r).limit_denominator(_MAX_DENOMINATOR)
                     for name, r in named.items()}
        ratio = _most_specific(fractions, site)
        if ratio is None:
            return None
        est = self.estimator
        name = est if isinstance(est, str) and est != "auto" else \
            _most_specific(AUTO_ESTIMATOR if est == "auto" else dict(est), site) or DEFAULT_ESTIMATOR
        return estimators.REGISTRY[name].at(ratio, {f: getattr(self, f) for f in OPTIONS})

    def estimator_at(self, site: str) -> Estimator | None:
        """The estimator of groups of ``site`` (one of :data:`SITES`) at its ratio, or None where the site is
        not a target."""
        return self.sites[site]

    def site_ratio(self, site: str) -> Fraction | None:
        """The ratio for groups of ``site``, or None where it is not a target."""
        est = self.sites[site]
        return est.ratio if est is not None else None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PammConfig:
        """Build a config from a ``torch.compile(options=...)`` dict alone (no environment, no
        :data:`defaults`; :func:`resolve` adds those)."""
        if isinstance(options, PammConfig):
            return options
        return cls(**_checked_names(options))

    def num_generators(self, b: int, site: str | None = None) -> int:
        """k for b rows at ``site``'s ratio (the global ratio where there is none), by the one formula
        (:class:`~pamm_fx.ops.compress.Generators`, which the graph evaluates on SymInts)."""
        ratio = (self.site_ratio(site) if site is not None else None) or self.ratio_fraction
        return Generators(ratio, self.min_generators, self.min_tokens).k(b)

    def options(self) -> dict[str, Any]:
        """The options as fields, in :data:`OPTIONS` order (the derived fields left out)."""
        return {name: getattr(self, name) for name in OPTIONS}


#: The option names, in PammConfig field order; ``PAMM_<NAME.upper()>`` sets each from the environment.
OPTIONS = tuple(f.name for f in dataclasses.fields(PammConfig) if f.init)


def check_option_names(names: Iterable[str], prefix: str = "", suffix: str = "") -> None:
    """Raise ValueError naming every unknown option of ``names`` and the valid ones: the one check of a set of
    option names, for ``options=`` and ``explain()`` alike (``prefix``/``suffix`` say who asks)."""
    unknown = sorted(set(names) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{prefix}unknown pamm option(s) {unknown}; valid options are {list(OPTIONS)}{suffix}")


def _checked_names(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a dict, once it is known to be a mapping of option names."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"pamm options must be a dict, got {type(options).__name__}")
    check_option_names(options)
    return dict(options)


def _validated(name: str, value: Any) -> Any:
    """``value`` as PammConfig stores it, checked by PammConfig itself so every source fails alike."""
    return getattr(PammConfig(**{name: value}), name)


def _estimator_from_env(text: str) -> Any:
    """``sr``, ``auto``, or JSON such as ``{"qkv": "pamm", "all": "sr"}``."""
    return json.loads(text) if text[0] == "{" else text


def _targets_from_env(text: str) -> Any:
    """``all``, ``qkv,mlp``, or JSON such as ``{"qkv": "1/256", "mlp": "1/32"}``."""
    if text[0] in "{[":
        return json.loads(text)
    return [site.strip() for site in text.split(",")] if "," in text else text


# How each PAMM_<OPTION> string is read. A string that does not convert is handed to PammConfig as
# it is, so that the error says what would be valid (ratio strings such as "1/128" it reads itself).
_FROM_ENV: dict[str, Callable[[str], Any]] = {
    "ratio": str,
    "seed": int,
    "eps": float,
    "min_tokens": int,
    "min_generators": int,
    "targets": _targets_from_env,
    "estimator": _estimator_from_env,
    "bits": int,
    "saved": str,
    "saved_bits": int,
}
assert set(_FROM_ENV) == set(OPTIONS)


def _env_options() -> dict[str, Any]:
    """The options set by ``PAMM_<OPTION>`` variables now, validated; an empty variable counts as unset.

    Other ``PAMM_*`` variables (``PAMM_LOGS``, ...) are not options and are left alone.
    """
    found: dict[str, Any] = {}
    for name, convert in _FROM_ENV.items():
        var = f"PAMM_{name.upper()}"
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        try:
            value = convert(text)
        except ValueError:
            value = text
        try:
            found[name] = _validated(name, value)
        except ValueError as err:
            raise ValueError(f"environment variable {var}={text!r}: {err}") from None
    return found


_UNSET = object()


def _check_option(name: str) -> None:
    if name not in OPTIONS:
        raise AttributeError(f"pamm_fx.config.defaults has no option {name!r}; valid options are {list(OPTIONS)}")


class _Defaults:
    """Process-wide option values for every compile that does not pass them, like ``torch._inductor.config``.

    Reading an option gives what :func:`resolve` would use without explicit options: a value set
    here, else its ``PAMM_<OPTION>`` variable, else PammConfig's default. Setting one validates
    it at once; ``del`` returns it to the environment/default. Unlike Inductor's config the
    values are process-wide, not thread-local: they are meant for trainers configured once.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_set", {})

    def _values(self) -> dict[str, Any]:
        return {**_env_options(), **self._set}

    def __getattr__(self, name: str) -> Any:
        _check_option(name)
        value = self._values().get(name, _UNSET)
        return getattr(PammConfig, name) if value is _UNSET else value

    def __setattr__(self, name: str, value: Any) -> None:
        _check_option(name)
        self._set[name] = _validated(name, value)

    def __delattr__(self, name: str) -> None:
        _check_option(name)
        self._set.pop(name, None)

    def __dir__(self) -> list[str]:
        return [*OPTIONS, "patch"]

    def __repr__(self) -> str:
        return "pamm_fx.config.defaults(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in OPTIONS) + ")"

    @contextlib.contextmanager
    def patch(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Iterator[None]:
        """Set options for a ``with`` block or each call of a decorated function, then restore them.

        All names and values are checked before any is applied, so a bad patch changes nothing.
        """
        updates = {**(changes or {}), **kwargs}
        for name in updates:
            _check_option(name)
        updates = {name: _validated(name, value) for name, value in updates.items()}
        prior = {name: self._set.get(name, _UNSET) for name in updates}
        self._set.update(updates)
        try:
            yield
        finally:
            for name, value in prior.items():
                if value is _UNSET:
                    self._set.pop(name, None)
                else:
                    self._set[name] = value


#: ``pamm_fx.config.defaults.ratio = 1/128``, ``with pamm_fx.config.defaults.patch(targets="all"): ...``
defaults = _Defaults()


def resolve(options: Mapping[str, Any] | PammConfig | None = None) -> PammConfig:
    """The config a compile uses: PammConfig defaults < ``PAMM_<OPTION>`` < :data:`defaults` < ``options``.

    Environment and :data:`defaults` are read now, so call this where the backend takes its options
    (``backend="pamm"`` resolves per compiled graph). A PammConfig names every option, so it is used as is.
    """
    if isinstance(options, PammConfig):
        return options
    return PammConfig(**{**defaults._values(), **_checked_names(options)})
