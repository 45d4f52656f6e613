import math

import pytest
import torch

import pamm_fx
from pamm_fx.config import PammConfig


def test_defaults_and_fraction():
    cfg = PammConfig()
    assert cfg.ratio == 1 / 64 and cfg.ratio_fraction.denominator == 64
    assert cfg.seed is None and math.isinf(cfg.eps) and cfg.targets == "qkv"
    assert PammConfig(ratio="1/128").ratio_fraction == PammConfig(ratio=1 / 128).ratio_fraction


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan"), float("inf"), "half", True, None, [0.5]])
def test_bad_ratio_names_valid_range(ratio):
    with pytest.raises(ValueError, match=r"ratio.*\(0, 1\]"):
        PammConfig(ratio=ratio)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"ration": 0.5}, r"unknown pamm option\(s\) \['ration'\]; valid options are \['ratio', 'seed'"),
        ({"seed": -1}, r"'seed' must be an int >= 0"),
        ({"seed": 1.5}, r"'seed' must be an int >= 0"),
        ({"eps": -1.0}, r"'eps' must be a float >= 0"),
        ({"eps": float("nan")}, r"'eps' must be a float >= 0"),
        ({"min_tokens": 0}, r"'min_tokens' must be an int >= 1"),
        ({"min_generators": 0}, r"'min_generators' must be an int >= 1"),
        ({"targets": "everything"}, r"'targets' must be one of \['qkv', 'mlp', 'all'\]"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        PammConfig.from_options(options)


def test_num_generators_follows_formula():
    cfg = PammConfig(ratio=1 / 64, min_generators=4, min_tokens=1)
    assert [cfg.num_generators(b) for b in (0, 1, 3, 100, 4096, 4097)] == [0, 1, 3, 4, 64, 65]
    # below min_tokens every row is kept (exact), decided per size, so also on SymInts at run time
    cfg = PammConfig(ratio=1 / 64, min_generators=4, min_tokens=200)
    assert [cfg.num_generators(b) for b in (0, 100, 199, 200, 4096)] == [0, 100, 199, 4, 64]


def test_backend_factory_validates_eagerly():
    with pytest.raises(ValueError, match="unknown pamm option"):
        pamm_fx.backend(rate=0.5)
    assert pamm_fx.backend(ratio=0.25).config.ratio == 0.25


def test_bad_options_fail_at_first_compile():
    fn = torch.compile(lambda x: x + 1, backend="pamm", options={"ratio": 2})
    with pytest.raises(Exception, match=r"ratio.*\(0, 1\]"):
        fn(torch.ones(2))
