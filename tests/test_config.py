import dataclasses
import math
import re

import pytest
import torch

import pamm_fx
from pamm_fx.config import OPTIONS, PammConfig, defaults, resolve


@pytest.fixture(autouse=True)
def _no_outside_options(monkeypatch: pytest.MonkeyPatch):
    """Each test starts from PammConfig's defaults, whatever PAMM_* the shell exports, and leaves none set."""
    for name in OPTIONS:
        monkeypatch.delenv(f"PAMM_{name.upper()}", raising=False)
    yield
    for name in OPTIONS:
        delattr(defaults, name)


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
        ({"targets": "everything"}, r"'targets' must be one of \['qkv', 'attn_out', 'mlp', 'mlp_up', 'mlp_down', 'head', 'other', 'all', 'none'\]"),
        ({"targets": ["qkv", "none"]}, r"'none' stands alone"),
        ({"saved": "some"}, r"'saved' must be one of \['exact', 'wgrad', 'all'\]"),
        ({"saved_bits": 6}, r"'saved_bits' must be one of \[2, 4, 8\]"),
        ({"saved_bits": True}, r"'saved_bits' must be one of"),
        ({"estimator": "SR"}, r"'estimator' must be one of \['pamm', 'pamm_sr', 'sr', 'auto'\]"),
        ({"estimator": {"qkv": "sr", "attn": "pamm"}}, r"'estimator' has an unknown site 'attn'"),
        ({"bits": 1}, r"'bits' must be one of \[2, 4, 8\] or None"),
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


def test_bad_options_fail_at_first_compile_with_our_value_error_first():
    """torch.compile calls the backend first at the first compile, and Dynamo wraps what it raises: the error is
    BackendCompilerFailed (a RuntimeError) whose message is ours right after Dynamo's one-line prefix, with our
    ValueError as its inner_exception (what the README says). pamm_fx.backend() and resolve() raise it as is."""
    fn = torch.compile(lambda x: x + 1, backend="pamm", options={"ratio": 2})
    with pytest.raises(RuntimeError) as info:
        fn(torch.ones(2))
    assert isinstance(info.value.inner_exception, ValueError)
    assert str(info.value).splitlines()[:2] == [
        "backend='pamm' raised:", "ValueError: pamm option 'ratio' must be in (0, 1], got 2"]
    with pytest.raises(ValueError, match=r"^pamm option 'ratio' must be in \(0, 1\], got 2$"):
        pamm_fx.config.resolve({"ratio": 2})


# --- options without code: PAMM_<OPTION>, pamm_fx.config.defaults, resolve ----------------------


@pytest.mark.parametrize(
    "var, text, name, value",
    [
        ("PAMM_RATIO", "1/128", "ratio", 1 / 128),
        ("PAMM_RATIO", " 0.25 ", "ratio", 0.25),
        ("PAMM_SEED", "0", "seed", 0),
        ("PAMM_EPS", "inf", "eps", math.inf),
        ("PAMM_EPS", "0.1", "eps", 0.1),
        ("PAMM_MIN_TOKENS", "64", "min_tokens", 64),
        ("PAMM_MIN_GENERATORS", "16", "min_generators", 16),
        ("PAMM_TARGETS", "all", "targets", "all"),
        ("PAMM_TARGETS", "qkv, mlp", "targets", (("mlp", None), ("qkv", None))),
        ("PAMM_TARGETS", '["qkv", "mlp"]', "targets", (("mlp", None), ("qkv", None))),
        ("PAMM_TARGETS", '{"qkv": "1/256", "mlp": "1/32"}', "targets", (("mlp", 1 / 32), ("qkv", 1 / 256))),
        ("PAMM_ESTIMATOR", "sr", "estimator", "sr"),
        ("PAMM_ESTIMATOR", "auto", "estimator", "auto"),
        ("PAMM_ESTIMATOR", '{"qkv": "pamm", "all": "sr"}', "estimator", (("all", "sr"), ("qkv", "pamm"))),
        ("PAMM_BITS", "2", "bits", 2),
    ],
)
def test_env_sets_each_option(monkeypatch, var, text, name, value):
    monkeypatch.setenv(var, text)
    assert resolve(None) == dataclasses.replace(PammConfig(), **{name: value})
    assert getattr(defaults, name) == value


@pytest.mark.parametrize(
    "var, text, valid",
    [
        ("PAMM_RATIO", "2", r"\(0, 1\]"),
        ("PAMM_RATIO", "half", r"\(0, 1\] such as 0.015625 or '1/64'"),
        ("PAMM_SEED", "-1", r"'seed' must be an int >= 0"),
        ("PAMM_SEED", "random", r"'seed' must be an int >= 0"),
        ("PAMM_EPS", "nan", r"'eps' must be a float >= 0"),
        ("PAMM_MIN_TOKENS", "1.5", r"'min_tokens' must be an int >= 1"),
        ("PAMM_MIN_GENERATORS", "0", r"'min_generators' must be an int >= 1"),
        ("PAMM_TARGETS", "everything", r"'targets' must be one of \['qkv', 'attn_out', 'mlp', 'mlp_up', 'mlp_down', 'head', 'other', 'all', 'none'\]"),
        ("PAMM_SAVED", "most", r"'saved' must be one of \['exact', 'wgrad', 'all'\], got 'most'"),
        ("PAMM_TARGETS", "qkv,mpl", r"unknown site 'mpl'; valid sites are \['qkv', 'attn_out', 'mlp', 'mlp_up', 'mlp_down', 'head', 'other', 'all'\]"),
        ("PAMM_TARGETS", '{"qkv": 2}', r"ratio of targets\['qkv'\] must be in \(0, 1\]"),
        ("PAMM_TARGETS", "{qkv: 1/256}", r"'targets' must be one of"),
        ("PAMM_ESTIMATOR", "sr4", r"'estimator' must be one of \['pamm', 'pamm_sr', 'sr', 'auto'\]"),
        ("PAMM_ESTIMATOR", '{"mlp": "auto"}', r"valid estimators in a dict are \['pamm', 'pamm_sr', 'sr'\]"),
        ("PAMM_BITS", "3", r"'bits' must be one of \[2, 4, 8\] or None"),
        ("PAMM_BITS", "eight", r"'bits' must be one of \[2, 4, 8\] or None"),
    ],
)
def test_bad_env_value_names_variable_value_and_valid_values(monkeypatch, var, text, valid):
    monkeypatch.setenv(var, text)
    with pytest.raises(ValueError, match=rf"^environment variable {var}='{re.escape(text)}': pamm .*{valid}"):
        resolve(None)


def test_other_and_empty_pamm_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("PAMM_LOGS", "+pamm")
    monkeypatch.setenv("PAMM_ACCEPT", "1")
    monkeypatch.setenv("PAMM_RATION", "2")
    monkeypatch.setenv("PAMM_RATIO", "")
    assert resolve(None) == PammConfig()


def test_precedence_defaults_env_code_explicit(monkeypatch):
    monkeypatch.setenv("PAMM_RATIO", "1/128")
    monkeypatch.setenv("PAMM_SEED", "7")
    defaults.ratio = "1/32"
    cfg = resolve({"min_tokens": 16})
    assert (cfg.ratio, cfg.seed, cfg.min_tokens, cfg.targets) == (1 / 32, 7, 16, "qkv")
    assert resolve({"ratio": 0.5, "seed": 1}).ratio == 0.5 and resolve({"seed": 1}).seed == 1
    del defaults.ratio  # back to the environment
    assert resolve(None).ratio == 1 / 128 and defaults.ratio == 1 / 128


def test_explicit_config_is_used_as_is(monkeypatch):
    monkeypatch.setenv("PAMM_TARGETS", "all")
    defaults.ratio = 0.5
    cfg = PammConfig(ratio=1 / 16)
    assert resolve(cfg) is cfg
    assert PammConfig.from_options({"seed": 3}) == PammConfig(seed=3)  # from_options stays explicit-only


def test_explicit_options_are_checked_as_before():
    with pytest.raises(ValueError, match=r"unknown pamm option\(s\) \['ration'\]; valid options are \['ratio'"):
        resolve({"ration": 0.5})
    with pytest.raises(ValueError, match=r"'min_tokens' must be an int >= 1"):
        resolve({"min_tokens": 0})


def test_setting_a_default_validates_at_once():
    with pytest.raises(ValueError, match=r"'ratio' must be in \(0, 1\]"):
        defaults.ratio = 2
    assert defaults.ratio == 1 / 64
    with pytest.raises(AttributeError, match=r"no option 'ration'; valid options are \['ratio'"):
        defaults.ration = 0.5
    assert not hasattr(defaults, "ration")
    defaults.targets = ["mlp", "qkv"]
    assert defaults.targets == (("mlp", None), ("qkv", None)) == resolve(None).targets


def test_patch_restores_after_with_block_and_errors():
    defaults.seed = 1
    with defaults.patch({"seed": 2}, ratio="1/8"):
        assert (resolve(None).seed, resolve(None).ratio) == (2, 1 / 8)
        with defaults.patch(seed=3):
            assert defaults.seed == 3
        assert defaults.seed == 2
    assert (defaults.seed, defaults.ratio) == (1, 1 / 64)
    with pytest.raises(RuntimeError), defaults.patch(eps=0.5):
        raise RuntimeError
    assert math.isinf(defaults.eps)


def test_bad_patch_changes_nothing():
    with pytest.raises(ValueError, match="'eps' must be a float >= 0"), defaults.patch(seed=5, eps=-1):
        pass
    with pytest.raises(AttributeError, match="no option 'rate'"), defaults.patch(rate=0.5):
        pass
    assert defaults.seed is None


def test_patch_as_decorator():
    @defaults.patch(targets="all")
    def targets():
        return resolve(None).targets

    assert targets() == "all" and targets() == "all"
    assert defaults.targets == "qkv"
