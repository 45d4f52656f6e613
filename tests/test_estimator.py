"""``estimator="pamm_sr"``: PAMM plus the stochastically rounded low-bit residual (issue 19, candidate c).

The ops on their own (opcheck, the backward's formula, flops), the option (validation, environment),
the rewrite (golden graph, explain's bytes), and the training step: exact at ratio 1, unbiased
weight gradients where PAMM alone is biased, None grads stay None, NaN propagates, no host sync,
and Inductor compiles it (the decompositions, the payload saved rather than X).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from functorch.compile import make_boxed_func
from torch import Tensor, nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.library import opcheck

import pamm_fx
import pamm_fx.ops  # registers the ops
from pamm_fx.compiler import PammBackend, decompositions
from pamm_fx.config import PammConfig, resolve
from pamm_fx.kernels import lowbit
from pamm_fx.testing import describe_rewrites

D, HEADS = 16, 2
SR = {"ratio": 1 / 8, "min_tokens": 1, "min_generators": 1, "estimator": "pamm_sr"}
SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense")


class Attention(nn.Module):
    """Pre-norm self-attention: one Q/K/V group on the norm's output."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        return x + self.o(a.transpose(1, 2).flatten(-2))


def _model() -> Attention:
    torch.manual_seed(0)
    return Attention()


def _batch(seed: int = 1) -> Tensor:
    return torch.randn(2, 40, D, generator=torch.Generator().manual_seed(seed))


def _grads(compiled: nn.Module, model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    model.zero_grad(set_to_none=True)
    out = compiled(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _quantize(x: Tensor, c: Tensor, f: Tensor, alpha: Tensor, seed: int = 5, salt: int = 0, bits: int = 4):
    return torch.ops.pamm.quantize(x, c, f, alpha, torch.tensor(seed), salt, bits)


def _compressed(x: Tensor, den: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.pamm.compress(x.detach(), torch.tensor(7), 1, den, 1, 1, math.inf, 0)


# --- the option ---------------------------------------------------------------------------------------------


def test_estimator_options_are_validated_and_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PammConfig()
    assert (cfg.estimator, cfg.bits, PammConfig(estimator="pamm_sr").estimator_at("qkv").bits) == ("pamm", None, 4)
    with pytest.raises(ValueError, match=r"'estimator' must be one of \['pamm', 'pamm_sr', 'sr', 'auto'\]"):
        PammConfig(estimator="sr8")
    for bad in (3, 4.0, True, "4"):
        with pytest.raises(ValueError, match=r"'bits' must be one of \[2, 4, 8\] or None"):
            PammConfig(bits=bad)
    monkeypatch.setenv("PAMM_ESTIMATOR", "pamm_sr")
    monkeypatch.setenv("PAMM_BITS", "2")
    cfg = resolve({})
    assert (cfg.estimator, cfg.bits, cfg.estimator_at("qkv").bits) == ("pamm_sr", 2, 2)
    monkeypatch.setenv("PAMM_BITS", "5")
    with pytest.raises(ValueError, match="PAMM_BITS"):
        resolve({})


# --- the ops ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37, 24), (1, 5, 24), (0, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_residual_ops_and_linear_group_with_a_residual(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    c, f, alpha = _compressed(x)
    for bits in lowbit.BITS:
        opcheck(torch.ops.pamm.quantize.default, (x.detach(), c, f, alpha, torch.tensor(3), 1, bits))
    opcheck(torch.ops.pamm.quantize.default, (x, c, f, alpha, torch.tensor(3), 1, 2))
    q, lo, scale = _quantize(x.detach(), c, f, alpha, bits=2)
    dy = torch.randn(math.prod(shape[:-1]), 5, dtype=dtype)
    for out_dtype in (dtype, torch.float32):
        opcheck(torch.ops.pamm.dequant_weight_grad.default, (dy, q, lo, scale, c, f, alpha, 2, n, out_dtype))
    weights = [torch.randn(16, n, dtype=dtype, requires_grad=True), torch.randn(8, n, dtype=dtype, requires_grad=True)]
    bias = torch.randn(8, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.pamm.linear_group.default, (x, weights, [bias], [False, True], c, f, alpha, q, lo, scale, 2))


def test_backward_adds_the_dequantized_residual_to_pamm() -> None:
    """dW_j = B~_j^T C + dY_j^T deq(q(R)) (formed as dY_j^T X^ by ``pamm::dequant_weight_grad``, never
    reconstructing X^), for exactly the projections that need it; dX and db exact."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 12, requires_grad=True)
    wq, wk = torch.randn(8, 12, requires_grad=True), torch.randn(4, 12)
    bk = torch.randn(4, requires_grad=True)
    c, f, alpha = _compressed(x)
    q_, lo, scale = _quantize(x.detach(), c, f, alpha)
    q, k = torch.ops.pamm.linear_group(x, [wq, wk], [bk], [False, True], c, f, alpha, q_, lo, scale, 4)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward([q, k], [gq, gk])
    deq = lowbit.decode(q_, lo, scale, 12, 4, torch.float32)
    x_tilde = alpha[:, None] * c[f.long()]
    torch.testing.assert_close(wq.grad, gq.reshape(-1, 8).T @ (x_tilde + deq))
    dw = torch.ops.pamm.dequant_weight_grad(gq.reshape(-1, 8), q_, lo, scale, c, f, alpha, 4, 12, torch.float32)
    torch.testing.assert_close(dw, wq.grad, rtol=0, atol=0)
    assert wk.grad is None
    torch.testing.assert_close(x.grad, gq @ wq + gk @ wk)
    torch.testing.assert_close(bk.grad, gk.sum((0, 1)))
    r = x.detach().reshape(-1, 12) - x_tilde
    assert ((deq - r).abs() <= scale[:, None] * (1 + 1e-5)).all() and (deq - r).abs().max() > 0


def test_flop_formulas_price_the_residual_ops() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    b, n, m = 60, 12, 8
    x = torch.randn(b, n, requires_grad=True)
    w = torch.randn(m, n, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        c, f, alpha = _compressed(x)
        q, lo, scale = _quantize(x.detach(), c, f, alpha)
        (y,) = torch.ops.pamm.linear_group(x, [w], [], [False], c, f, alpha, q, lo, scale, 4)
        y.sum().backward()
    flops = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    assert flops["pamm.quantize"] == 4 * b * n
    assert flops["pamm.dequant_weight_grad"] == 2 * b * m * n + 4 * b * n
    assert "pamm.contract" not in flops  # pamm_sr's weight gradient is one GEMM on X^, no contraction


# --- the rewrite and its report -------------------------------------------------------------------------------


class TestGoldenRewrite(TestCase):
    def test_the_residual_is_quantized_between_compress_and_linear_group(self) -> None:
        self.assertExpectedInline(describe_rewrites(_model(), _batch(), **SR, bits=2), """\
compress(h: f32[2, 40, 16], ratio=1/8, min_generators=1, eps=inf) -> (f32[10, 16], i32[80], f32[80])
quantize(h: f32[2, 40, 16], bits=2) -> (u8[80, 4], f32[80], f32[80])
linear_group(h: f32[2, 40, 16], residual=2 bits)
  q.weight + q.bias -> f32[2, 40, 16] -> unflatten
  k.weight + k.bias -> f32[2, 40, 16] -> unflatten_1
  v.weight + v.bias -> f32[2, 40, 16] -> unflatten_2
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_plain_pamm_has_no_residual(self) -> None:
        assert "quantize" not in describe_rewrites(_model(), _batch(), **{**SR, "estimator": "pamm"})


def test_explain_counts_the_residual_bytes_and_flops() -> None:
    pamm = pamm_fx.explain(_model(), _batch(), **{**SR, "estimator": "pamm"}).groups[0]
    sr = pamm_fx.explain(_model(), _batch(), **SR, bits=8).groups[0]
    b, n = 80, D
    assert sr.saved_bytes_after - pamm.saved_bytes_after == b * (n + 8)  # 8-bit codes, lo and scale in float32
    assert sr.wgrad_flops_after == sr.wgrad_flops_before == 2 * b * n * 3 * D  # plain's GEMMs, on X^
    assert any("pamm_sr" in note for note in sr.notes) and not any("pamm_sr" in note for note in pamm.notes)


def test_a_row_no_larger_than_what_pamm_sr_keeps_stays_exact() -> None:
    """n = 16 float32 is 64 bytes: PAMM keeps 8 per row, pamm_sr at 8 bits 8 + 16 + 8 = 32, so both
    still save; with bf16 at 8 bits a row is 32 bytes and pamm_sr would save nothing."""
    model = _model().to(torch.bfloat16)
    x = _batch().to(torch.bfloat16)
    assert "compress" in describe_rewrites(model, x, **{**SR, "estimator": "pamm"})
    text = describe_rewrites(model, x, **SR, bits=8)
    assert "compress" not in text and "no more than the 32 estimator pamm_sr keeps per row" in text


# --- the training step ------------------------------------------------------------------------------------------


def test_ratio_one_is_exact_with_the_residual() -> None:
    """k = b: C = X, alpha = 1, so R = 0 is stored as scale 0 and X^ is X bit for bit: dW is plain's."""
    model, x = _model(), _batch()
    torch._dynamo.reset()
    plain = _grads(torch.compile(model, backend="aot_eager"), model, x)
    options = {**SR, "ratio": 1, "bits": 2}
    with pamm_fx.testing.capture_rewrites() as records:
        got = _grads(torch.compile(model, backend="pamm_aot_eager", options=options), model, x)
    assert records and records[0].rewritten is not None
    for name, g in plain.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(got[f"{p}.weight"], plain[f"{p}.weight"]) for p in "qkv")


def test_weight_gradient_is_unbiased_where_pamm_alone_is_not() -> None:
    """The mean of N steps' dW (each step draws new generators and new rounding noise) converges to the
    exact dW under pamm_sr, like 1/sqrt(N); PAMM's mean stays as far off as one draw (its bias).
    One compiled artefact per estimator, fixed seeds: deterministic."""
    model, x = _model(), _batch()
    torch._dynamo.reset()
    exact = _grads(torch.compile(model, backend="aot_eager"), model, x)["q.weight"]
    steps = 24
    errors = {}
    for estimator in ("pamm", "pamm_sr"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="pamm_aot_eager", options={**SR, "estimator": estimator, "seed": 1})
        draws = torch.stack([_grads(compiled, model, x)["q.weight"] for _ in range(steps)])
        errors[estimator] = ((draws[0] - exact).norm() / exact.norm(), (draws.mean(0) - exact).norm() / exact.norm())
    one, mean = errors["pamm_sr"]
    assert one < 0.25 and mean < 2 * one / math.sqrt(steps)
    pamm_one, pamm_mean = errors["pamm"]
    assert pamm_one > 2 * one and pamm_mean > 0.5 * pamm_one


def test_dynamic_sizes_keep_the_residual_on_every_call() -> None:
    """One graph compiled for symbolic sizes serves every batch and sequence length with the residual."""
    model = _model()
    torch._dynamo.reset()
    with pamm_fx.testing.capture_rewrites() as records:
        compiled = torch.compile(model, backend="pamm_aot_eager", options=SR, dynamic=True)
        for b, t in [(2, 40), (3, 17), (4, 9)]:
            grads = _grads(compiled, model, torch.randn(b, t, D, generator=torch.Generator().manual_seed(t)))
            assert torch.isfinite(grads["q.weight"]).all()
    assert len(records) == 1 and "quantize(h: f32[s" in records[0].summary


def test_frozen_projection_gets_no_gradient_and_nan_is_never_hidden() -> None:
    model, x = _model(), _batch()
    model.k.weight.requires_grad_(False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pamm_aot_eager", options=SR)
    grads = _grads(compiled, model, x)
    assert grads["k.weight"] is None and grads["q.weight"] is not None and torch.isfinite(grads["q.weight"]).all()
    bad = x.clone()
    bad[1, 7, 3] = math.nan
    grads = _grads(compiled, model, bad)
    assert not torch.isfinite(grads["q.weight"]).all() and not torch.isfinite(grads["v.weight"]).all()


def _decomposing_backend(graphs: list[str]) -> PammBackend:
    """The pamm rewrite, then AOTAutograd with Inductor's decompositions and partitioner but no codegen:
    what backend="pamm" hands Inductor (the ops' aten forms, the MUST_SAVE tags honoured), without
    compiling C++ on a CPU test machine. Each traced graph's text lands in ``graphs``."""

    def keep(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(str(gm.graph))
        return make_boxed_func(gm)

    inner = aot_autograd(fw_compiler=keep, bw_compiler=keep, decompositions=decompositions(),
                         partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
    return PammBackend(resolve(SR), inner=lambda gm, example_inputs, patches: inner(gm, example_inputs))


@pytest.mark.parametrize("decomposed", [False, True], ids=["aot_eager", "decomposed"])
def test_a_pamm_sr_step_never_syncs_with_the_host(decomposed: bool) -> None:
    model, x = _model(), _batch()
    torch._dynamo.reset()
    graphs: list[str] = []
    backend = _decomposing_backend(graphs) if decomposed else "pamm_aot_eager"
    with pamm_fx.testing.capture_rewrites() as records:
        compiled = torch.compile(model, backend=backend, options=None if decomposed else SR)

        def step() -> None:
            compiled(x).sum().backward()

        step()  # compile outside the profile
    assert records[0].rewritten is not None
    assert not decomposed or ("amin" in graphs[0] and "pamm.quantize" not in graphs[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    assert [e.name for e in prof.events() if e.name in SYNC_EVENTS or "DtoH" in e.name] == []


@pytest.mark.parametrize("budget", [0.5, 0.1])
def test_the_partitioner_saves_the_payload_and_never_quantizes_again_under_a_memory_budget(budget: float) -> None:
    """Under a budget the partitioner keeps q, lo, scale, and the backward never quantizes again."""
    model, x = _model(), _batch()
    torch._dynamo.reset()
    graphs: list[str] = []
    compiled = torch.compile(model, backend=_decomposing_backend(graphs))
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch._functorch.config.patch(activation_memory_budget=budget):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(x)
        out.sum().backward()
    assert ((80, 8), torch.uint8) in saved, "the packed 4-bit codes are not saved for backward"
    forward, backward = graphs
    assert "amin" in forward and "amax" in forward  # the row range of R, visible to Inductor
    assert "amin" not in backward, "the backward quantizes again"
    assert "dequant_weight_grad" not in backward and "bitwise_and" in backward  # unpacked by the aten form


def test_the_payload_is_tagged_must_save_for_the_partitioner() -> None:
    """Under a budget the knapsack may recompute what is not MUST_SAVE; the test above passes without
    the tag too (the min-cut partitioner also refuses to recompute the row reductions), so check the tag."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.checkpoint import CheckpointPolicy

    x = _batch().reshape(-1, D)
    c, f, alpha = _compressed(x, den=8)
    gm = make_fx(lambda x, seed: torch.ops.pamm.quantize(x, c, f, alpha, seed, 1, 4),
                 decomposition_table=decompositions())(x, torch.tensor(3))
    (output,) = gm.graph.find_nodes(op="output")
    producers = output.args[0]
    assert len(producers) == 3 and all(n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE for n in producers)


def test_inductor_compiles_the_aten_forms_to_the_eager_ops_results() -> None:
    """backend="inductor" compiles the decompositions: the same codes as the eager ops (chunked reference),
    and the same weight gradient up to float32 summation order."""
    x = _batch().reshape(-1, D)
    c, f, alpha = _compressed(x, den=8)
    dy = torch.randn(x.shape[0], 6)

    def roundtrip(x: Tensor, seed: Tensor) -> tuple[Tensor, ...]:
        q, lo, scale = torch.ops.pamm.quantize(x, c, f, alpha, seed, 2, 4)
        return q, lo, scale, torch.ops.pamm.dequant_weight_grad(dy, q, lo, scale, c, f, alpha, 4, D, x.dtype)

    seed = torch.tensor(9)
    compiled = torch.compile(roundtrip, backend="inductor", fullgraph=True)(x, seed)
    want = roundtrip(x, seed)
    for got, exp in zip(compiled[:3], want[:3]):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    torch.testing.assert_close(compiled[3], want[3], rtol=1e-5, atol=1e-5)
