"""``estimator="sr"``: X alone at ``bits`` bits with stochastic rounding, no generators (issue 19), and the
per-site estimator choice (``{"qkv": "pamm", "all": "sr"}``, ``"auto"``).

The option (resolution per site, errors, environment), the ops without a PAMM base (opcheck, the backward's
formula, flops), the plan (explain's bytes, the size checks), and the training step: exact at ratio 1,
unbiased weight gradients, None grads stay None, NaN propagates, float64, no host sync, and one Inductor step.
Reference vs Triton for the no-base kernels is in tests/test_lowbit_kernels.py; the golden rewrite of a
mixed model in tests/test_golden.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import opcheck

import pamm_fx
import pamm_fx.ops  # registers the ops
from pamm_fx.config import AUTO_ESTIMATOR, OPTIONS, SITES, PammConfig, defaults, resolve
from pamm_fx.explain import ExplainReport
from pamm_fx.kernels import lowbit
from pamm_fx.testing import describe_rewrites

D, HEADS = 16, 2
SR = {"ratio": 1 / 8, "min_tokens": 1, "min_generators": 1, "estimator": "sr", "targets": "all", "seed": 1}
SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense")


@pytest.fixture(autouse=True)
def _clean_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPTIONS:
        monkeypatch.delenv(f"PAMM_{name.upper()}", raising=False)


class Block(nn.Module):
    """Pre-norm attention and MLP: groups on the attention's norm (q/k/v), the MLP's norm (up) and down's X."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        x = x + self.o(a.transpose(1, 2).flatten(-2))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def _model(dtype: torch.dtype = torch.float32) -> Block:
    torch.manual_seed(0)
    return Block().to(dtype)


def _batch(seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, 40, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _grads(compiled: nn.Module, model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    model.zero_grad(set_to_none=True)
    out = compiled(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)).sum().backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _plain(model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    torch._dynamo.reset()
    return _grads(torch.compile(model, backend="aot_eager"), model, x)


# --- the option ----------------------------------------------------------------------------------------------


def _site_estimator(cfg: PammConfig, site: str) -> str:
    """The name of the estimator ``cfg`` resolved for ``site`` (a target)."""
    return cfg.estimator_at(site).name


def test_site_estimator_most_specific_name_wins() -> None:
    cfg = PammConfig(targets="all", estimator={"all": "sr", "mlp": "pamm_sr", "mlp_down": "pamm", "qkv": "pamm"})
    assert {s: _site_estimator(cfg, s) for s in SITES} == {
        "qkv": "pamm", "attn_out": "sr", "mlp_up": "pamm_sr", "mlp_down": "pamm", "head": "sr", "other": "sr"}
    assert cfg.estimator == (("all", "sr"), ("mlp", "pamm_sr"), ("mlp_down", "pamm"), ("qkv", "pamm"))
    assert hash(cfg) == hash(PammConfig(targets="all", estimator=dict(reversed(dict(cfg.estimator).items()))))
    partial = PammConfig(targets="all", estimator={"mlp": "sr"})  # a site the dict does not cover takes "pamm"
    assert [_site_estimator(partial, s) for s in ("mlp_up", "mlp_down", "qkv", "head")] == ["sr", "sr", "pamm", "pamm"]
    auto = PammConfig(targets="all", estimator="auto")
    assert auto.estimator == "auto"
    assert all(auto.estimator_at(s) == PammConfig(targets="all", estimator=dict(AUTO_ESTIMATOR)).estimator_at(s)
               for s in SITES)
    assert [_site_estimator(auto, s) for s in SITES] == ["pamm", "sr", "sr", "sr", "sr", "sr"]
    assert all(_site_estimator(PammConfig(targets="all", estimator="sr"), s) == "sr" for s in SITES)
    assert _site_estimator(PammConfig(targets="all"), "mlp_up") == "pamm"
    assert PammConfig().estimator_at("mlp_up") is None  # not a target


def test_bits_default_per_estimator() -> None:
    assert [PammConfig(estimator=e).estimator_at("qkv").bits for e in ("pamm", "pamm_sr", "sr")] == [None, 4, 8]
    assert [PammConfig(estimator=e, bits=2).estimator_at("qkv").bits for e in ("pamm", "pamm_sr", "sr")] == \
        [None, 2, 2]


@pytest.mark.parametrize("value,match", [
    ("sr8", r"'estimator' must be one of \['pamm', 'pamm_sr', 'sr', 'auto'\]"),
    ({"qkv": "auto"}, r"maps 'qkv' to 'auto'; valid estimators in a dict are \['pamm', 'pamm_sr', 'sr'\]"),
    ({"mpl": "sr"}, r"unknown site 'mpl'; valid sites are \['qkv', 'attn_out', 'mlp', 'mlp_up'"),
    ({}, r"non-empty dict"),
    (["sr"], r"must be one of"),
])
def test_bad_estimators_name_what_is_valid(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PammConfig(estimator=value)


@pytest.mark.parametrize("bad", [3, 16, 4.0, True, "8"])
def test_bad_bits_name_what_is_valid(bad: object) -> None:
    with pytest.raises(ValueError, match=r"'bits' must be one of \[2, 4, 8\] or None"):
        PammConfig(bits=bad)


def test_estimator_from_the_environment_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAMM_ESTIMATOR", '{"qkv": "pamm", "all": "sr"}')
    monkeypatch.setenv("PAMM_BITS", "4")
    cfg = resolve({})
    assert cfg.estimator == (("all", "sr"), ("qkv", "pamm")) and cfg.bits == 4
    assert resolve({"targets": "all"}).estimator_at("head").bits == 4
    monkeypatch.setenv("PAMM_ESTIMATOR", "auto")
    assert _site_estimator(resolve({"targets": "all"}), "head") == "sr"
    for text, match in [('{"qkv": "pam"}', "valid estimators in a dict"), ("{qkv: sr}", "must be one of")]:
        monkeypatch.setenv("PAMM_ESTIMATOR", text)
        with pytest.raises(ValueError, match=f"PAMM_ESTIMATOR.*{match}"):
            resolve({})
    monkeypatch.delenv("PAMM_ESTIMATOR")
    with defaults.patch(estimator={"mlp": "sr"}):
        assert _site_estimator(resolve({"targets": "all"}), "mlp_down") == "sr"


# --- the ops without a PAMM base ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37, 24), (0, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_ops_without_a_base(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    seed = torch.tensor(3)
    for bits in lowbit.BITS:
        opcheck(torch.ops.pamm.quantize.default, (x.detach(), None, None, None, seed, 1, bits))
    q, lo, scale = torch.ops.pamm.quantize(x.detach(), None, None, None, seed, 1, 8)
    dy = torch.randn(math.prod(shape[:-1]), 5, dtype=dtype)
    opcheck(torch.ops.pamm.dequant_weight_grad.default, (dy, q, lo, scale, None, None, None, 8, n, dtype))
    weights = [torch.randn(16, n, dtype=dtype, requires_grad=True), torch.randn(8, n, dtype=dtype)]
    bias = torch.randn(8, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.pamm.linear_group.default, (x, weights, [bias], [False, True], None, None, None, q, lo, scale, 8))


def test_linear_group_needs_a_payload() -> None:
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="needs a PAMM payload"):
        torch.ops.pamm.linear_group(x, [w], [], [False], None, None, None)


def test_backward_is_dy_t_times_the_dequantized_x() -> None:
    """dW_j = dY_j^T deq(q(X)) (``pamm::dequant_weight_grad``) for exactly the projections that need it; dX
    and db exact; a projection whose output gets no gradient keeps None."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 12, requires_grad=True)
    wq, wk, wv = torch.randn(8, 12, requires_grad=True), torch.randn(4, 12), torch.randn(4, 12, requires_grad=True)
    bk = torch.randn(4, requires_grad=True)
    q_, lo, scale = torch.ops.pamm.quantize(x.detach(), None, None, None, torch.tensor(5), 0, 4)
    q, k, v = torch.ops.pamm.linear_group(x, [wq, wk, wv], [bk], [False, True, False], None, None, None,
                                          q_, lo, scale, 4)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward([q, k], [gq, gk])  # v unused
    deq = lowbit.decode(q_, lo, scale, 12, 4, torch.float32)
    torch.testing.assert_close(wq.grad, gq.reshape(-1, 8).T @ deq)
    dw = torch.ops.pamm.dequant_weight_grad(gq.reshape(-1, 8), q_, lo, scale, None, None, None, 4, 12,
                                             torch.float32)
    torch.testing.assert_close(dw, wq.grad, rtol=0, atol=0)
    assert wk.grad is None and wv.grad is None
    torch.testing.assert_close(x.grad, gq @ wq + gk @ wk)
    torch.testing.assert_close(bk.grad, gk.sum((0, 1)))
    err = (deq - x.detach().reshape(-1, 12)).abs()
    assert (err <= scale[:, None] * (1 + 1e-5)).all() and err.max() > 0


def test_flop_formulas_without_a_base() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    b, n, m = 60, 12, 8
    x = torch.randn(b, n, requires_grad=True)
    w = torch.randn(m, n, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        q, lo, scale = torch.ops.pamm.quantize(x.detach(), None, None, None, torch.tensor(1), 0, 8)
        (y,) = torch.ops.pamm.linear_group(x, [w], [], [False], None, None, None, q, lo, scale, 8)
        y.sum().backward()
    flops = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    assert flops["pamm.quantize"] == 2 * b * n
    assert flops["pamm.dequant_weight_grad"] == 2 * b * m * n + 2 * b * n
    assert "pamm.compress" not in flops and "pamm.contract" not in flops


# --- the plan and its report --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 2])
def test_explain_reports_what_sr_keeps(bits: int) -> None:
    """Per row: ceil(n * bits / 8) code bytes plus lo and scale (float32), no generators, no f or alpha."""
    report = pamm_fx.explain(_model(), _batch(), **SR, bits=bits)
    groups = {g.key: g for g in report.groups}
    assert set(groups) == {"q.weight, k.weight, v.weight", "up.weight", "down.weight"}
    b = 80
    for g in groups.values():
        assert (g.estimator, g.bits, g.k) == ("sr", bits, 0)
        assert g.saved_bytes_before == b * g.n * 4
        assert g.saved_bytes_after == b * (math.ceil(g.n * bits / 8) + 8)
        assert g.wgrad_flops_after == g.wgrad_flops_before
    assert f"estimator=sr bits={bits}  no generators, k = 0\n" in str(report)
    back = ExplainReport.from_json(report.to_json())
    assert [(g.estimator, g.bits) for g in back.groups] == [("sr", bits)] * 3


def test_explain_under_auto_mixes_estimators() -> None:
    report = pamm_fx.explain(_model(), _batch(), **{**SR, "estimator": "auto"})
    how = {g.key: (g.site, g.estimator, g.bits) for g in report.groups}
    assert how == {"q.weight, k.weight, v.weight": ("qkv", "pamm", None), "up.weight": ("mlp_up", "sr", 8),
                   "down.weight": ("mlp_down", "sr", 8)}
    qkv = next(g for g in report.groups if g.site == "qkv")
    assert qkv.saved_bytes_after == qkv.k * D * 4 + 80 * 8  # C, f and alpha, as under plain PAMM
    assert report.options["estimator"] == "auto"


def test_size_checks_know_sr_has_no_generators() -> None:
    """sr has no k and no per-call exact branch: a floor of generators above b, or min_tokens above b, does not
    leave it exact (they do PAMM); a row no larger than what sr keeps does (n = 8 bf16: 16 bytes, sr at 8 bits
    keeps 8 + 8)."""
    model, x = _model(), _batch()
    for option, category in [("min_generators", "all_rows_kept"), ("min_tokens", "min_tokens")]:
        options = {**SR, option: 1000}
        text = describe_rewrites(model, x, **options)
        assert "compress(" not in text and text.count("X at 8 bits") == 3
        assert f"[{category}]" in str(pamm_fx.explain(model, x, **{**options, "estimator": "pamm"}))
    narrow = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16)
    text = describe_rewrites(narrow, torch.randn(80, 8, dtype=torch.bfloat16), **SR)
    assert "a row of X is 16 bytes, no more than the 16 estimator sr keeps per row" in text
    assert text.count("X at 8 bits") == 1


# --- the training step --------------------------------------------------------------------------------------------


def test_ratio_one_stays_plain_bit_for_bit() -> None:
    """sr has no exact branch, so ratio 1 (every row as it is) leaves its groups exact: plain's gradients."""
    model, x = _model(), _batch()
    plain = _plain(model, x)
    torch._dynamo.reset()
    with pamm_fx.testing.capture_rewrites() as records:
        got = _grads(torch.compile(model, backend="pamm_aot_eager", options={**SR, "ratio": 1}), model, x)
    assert records and records[0].rewritten is None
    assert {r.category for r in records[0].plan.rejections} == {"exact_ratio"}
    assert all(torch.equal(got[name], g) for name, g in plain.items())


def test_weight_gradient_is_unbiased() -> None:
    """The mean of N steps' dW (each step new rounding noise from the per-call seed) converges to the exact dW
    like 1/sqrt(N); 2 bits so that one draw is visibly noisy. One compiled artefact, fixed seed: deterministic."""
    model, x = _model(), _batch()
    exact = _plain(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pamm_aot_eager", options={**SR, "bits": 2})
    steps = 24
    draws = [_grads(compiled, model, x) for _ in range(steps)]
    for name in ("q.weight", "up.weight", "down.weight"):
        stack = torch.stack([d[name] for d in draws])
        one = (stack[0] - exact[name]).norm() / exact[name].norm()
        mean = (stack.mean(0) - exact[name]).norm() / exact[name].norm()
        assert 0 < one < 0.5 and mean < 2 * one / math.sqrt(steps), (name, one, mean)
    assert not torch.equal(draws[0]["q.weight"], draws[1]["q.weight"])  # new noise every step
    for name in ("q.bias", "o.weight", "norm.weight"):
        torch.testing.assert_close(draws[0][name], exact[name], rtol=1e-5, atol=1e-6)


def test_none_grads_stay_none_and_nan_is_never_hidden() -> None:
    model, x = _model(), _batch()
    model.k.weight.requires_grad_(False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pamm_aot_eager", options=SR)
    grads = _grads(compiled, model, x)
    assert grads["k.weight"] is None and torch.isfinite(grads["q.weight"]).all()
    bad = x.clone()
    bad[1, 7, 3] = math.nan
    grads = _grads(compiled, model, bad)
    assert not torch.isfinite(grads["q.weight"]).all() and not torch.isfinite(grads["up.weight"]).all()


def test_float64_step() -> None:
    model, x = _model(torch.float64), _batch(dtype=torch.float64)
    exact = _plain(model, x)
    torch._dynamo.reset()
    with pamm_fx.testing.capture_rewrites() as records:
        got = _grads(torch.compile(model, backend="pamm_aot_eager", options=SR), model, x)
    assert "quantize(h: f64[2, 40, 16], bits=8, no base) -> (u8[80, 16], f64[80], f64[80])" in \
        records[0].summary
    for name in ("q.weight", "up.weight", "down.weight"):
        assert got[name].dtype == torch.float64
        assert (got[name] - exact[name]).norm() < 0.05 * exact[name].norm()


def test_dynamic_sizes_and_no_host_sync() -> None:
    model = _model()
    torch._dynamo.reset()
    with pamm_fx.testing.capture_rewrites() as records:
        compiled = torch.compile(model, backend="pamm_aot_eager", options=SR, dynamic=True)
        for b, t in [(2, 40), (3, 17)]:
            grads = _grads(compiled, model, torch.randn(b, t, D, generator=torch.Generator().manual_seed(t)))
            assert torch.isfinite(grads["up.weight"]).all()
    assert len(records) == 1 and "quantize(h: f32[s" in records[0].summary
    x = _batch()
    compiled(x).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled(x).sum().backward()
    assert [e.name for e in prof.events() if e.name in SYNC_EVENTS or "DtoH" in e.name] == []


def test_inductor_step_matches_aot_eager() -> None:
    """backend="pamm" compiles the aten forms of the no-base ops: the same seed draws the same noise, so the
    gradients are the eager ops' up to a code flipped where Inductor's fused arithmetic moves X by a rounding.
    A two-linear MLP (each its own sr group) keeps the C++ compile short; the second step reuses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
    x = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pamm_aot_eager", options=SR)
    eager = [_grads(compiled, model, x) for _ in range(2)]
    torch._dynamo.reset()
    with pamm_fx.testing.capture_rewrites() as records:
        compiled = torch.compile(model, backend="pamm", options=SR)
        inductor = [_grads(compiled, model, x) for _ in range(2)]
    assert len(records) == 1 and records[0].summary.count("X at 8 bits") == 2
    for want, got in zip(eager, inductor):
        for name, g in want.items():
            assert (got[name] - g).norm() <= 1e-3 * g.norm(), name
    assert not torch.equal(inductor[0]["0.weight"], inductor[1]["0.weight"])  # new noise every step
