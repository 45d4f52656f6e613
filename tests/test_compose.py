"""The backend inside real training code: checkpointing, memory budgets, compile modes, bad inputs, caching."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pamm_fx
from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.testing import capture_rewrites

D, HEADS = 16, 2
EXACT = {"ratio": 1, "min_tokens": 1}
COMPRESS = {"ratio": 1 / 4, "min_tokens": 1, "min_generators": 1}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(bsz, seq, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(out.transpose(1, 2).reshape(bsz, seq, D))


class Net(nn.Module):
    def __init__(self, layers: int = 2, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return x


def _net(**kwargs: object) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs)


def _grads(model: nn.Module, x: torch.Tensor, proj: torch.Tensor, backend, options=None, **compile_kw):
    model.zero_grad()
    x = x.detach().requires_grad_(True)
    out = torch.compile(model, backend=backend, options=options, **compile_kw)(x)
    (out * proj).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


def _assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        scale = e.abs().max().item() if e.numel() else 1.0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def _inputs(bsz: int = 2, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(bsz, seq, D, generator=gen), torch.randn(bsz, seq, D, generator=gen)


def test_activation_checkpointing_inside_the_compiled_model():
    x, proj = _inputs()
    model = _net(use_checkpoint=True)
    expected = _grads(model, x, proj, "inductor")
    torch._dynamo.reset()
    with capture_rewrites() as records:
        got = _grads(model, x, proj, "pamm", EXACT)
    _assert_all_close(got, expected)
    # Checkpointed blocks already drop X; their projections live in the checkpoint subgraph and are left alone.
    assert all(r.rewritten is None for r in records)


def test_activation_memory_budget_stacks_with_pamm():
    x, proj = _inputs(seq=32)
    model = _net()
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        expected = _grads(model, x, proj, "inductor")
        torch._dynamo.reset()
        got = _grads(model, x, proj, "pamm", EXACT)
    _assert_all_close(got, expected)


@pytest.mark.parametrize(
    "compile_kw",
    [{"fullgraph": True}, {"dynamic": True}, {"mode": "max-autotune-no-cudagraphs"}],
    ids=["fullgraph", "dynamic", "max-autotune-no-cudagraphs"],
)
def test_compile_flags_are_accepted(compile_kw):
    x, proj = _inputs()
    model = _net(layers=1)
    expected = _grads(model, x, proj, "inductor")
    torch._dynamo.reset()
    # torch.compile refuses mode= together with options=; pamm_fx.backend(mode=..., **options) takes both.
    mode = compile_kw.pop("mode", None)
    backend = pamm_fx.backend(mode=mode, **EXACT)
    with capture_rewrites() as records:
        got = _grads(model, x, proj, backend, **compile_kw)
    assert records and records[-1].rewritten is not None
    _assert_all_close(got, expected)


def test_string_backend_passes_mode_to_inductor():
    model = _net(layers=1)
    out = torch.compile(model, backend="pamm", mode="max-autotune-no-cudagraphs")(_inputs()[0])
    assert out.shape == (2, 12, D)


@pytest.mark.parametrize(
    "case",
    ["empty_batch", "one_row", "fewer_rows_than_one_over_ratio", "zero_rows", "non_contiguous", "channels_last_like"],
)
def test_awkward_inputs_match_plain_compile(case):
    x, proj = _inputs()
    if case == "empty_batch":
        x, proj = x[:0], proj[:0]
    elif case == "one_row":
        x, proj = x[:1, :1], proj[:1, :1]
    elif case == "fewer_rows_than_one_over_ratio":
        x, proj = x[:1, :3], proj[:1, :3]
    elif case == "zero_rows":
        x = x.clone()
        x[:, ::3] = 0
    elif case == "non_contiguous":
        x = torch.randn(2, D, 12).transpose(1, 2)
    else:
        x = torch.randn(12, 2, D).permute(1, 0, 2)
    model = _net(layers=1)
    expected = _grads(model, x, proj, "inductor")
    torch._dynamo.reset()
    got = _grads(model, x, proj, "pamm", COMPRESS)
    # Outputs and dX are exact whatever the input; weight gradients of q/k/v are approximate.
    _assert_all_close(got[:2], expected[:2])


def test_nan_and_inf_propagate_like_a_plain_linear():
    x, proj = _inputs()
    x = x.clone()
    x[0, 3, 5] = float("nan")
    x[1, 7, 2] = float("inf")
    model = _net(layers=1)
    expected = _grads(model, x, proj, "inductor")
    torch._dynamo.reset()
    got = _grads(model, x, proj, "pamm", COMPRESS)
    assert torch.equal(got[0].isnan(), expected[0].isnan())


def test_fp16_large_magnitudes_do_not_overflow_the_compression():
    # finite fp16 values near its maximum: their squares overflow fp16 but not the float32 similarity
    x = (torch.randn(64, D) * 3e4).clamp(-6e4, 6e4).to(torch.float16)
    assert torch.isfinite(x).all()
    c, f, alpha = torch.ops.pamm.compress(x, torch.tensor(0), 1, 8, 1, 1, math.inf, 0)
    assert torch.isfinite(alpha).all() and c.dtype == torch.float16 and alpha.dtype == torch.float32
    x[5, 0] = math.inf  # a row that did overflow fp16 is not finite under plain either: NaN, not dropped
    _, _, alpha = torch.ops.pamm.compress(x, torch.tensor(0), 1, 8, 1, 1, math.inf, 0)
    assert torch.isnan(alpha[5]) and int(torch.isnan(alpha).sum()) in (1, 64)  # 64: the row was drawn as generator


def test_double_backward_raises_a_clear_error():
    x, _ = _inputs()
    model = _net(layers=1)
    out = torch.compile(model, backend="pamm", options=COMPRESS)(x.requires_grad_(True))
    # Compiled: AOTAutograd refuses it itself, at create_graph=True when the backward donates buffers, else
    # when the second backward runs (which of the two depends on the partition). Eager use of the op: our
    # own error says why.
    with pytest.raises(RuntimeError, match="create_graph|double backward"):
        (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        g.sum().backward()
    w = torch.randn(4, D, requires_grad=True)
    c, f, alpha = torch.ops.pamm.compress(x.detach(), torch.tensor(0), 1, 2, 1, 1, math.inf, 0)
    (y,) = torch.ops.pamm.linear_group(x, [w], [], [False], c, f, alpha)
    with pytest.raises(pamm_fx.ops.DoubleBackwardError, match="weight gradient is an approximation"):
        torch.autograd.grad(y.pow(2).sum(), [x, w], create_graph=True)


def test_forward_mode_ad_raises_a_clear_error():
    x = torch.randn(20, 8)
    w = torch.randn(4, 8)
    c, f, alpha = torch.ops.pamm.compress(x, torch.tensor(0), 1, 2, 1, 1, math.inf, 0)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.ops.pamm.linear_group(fwAD.make_dual(x, torch.randn_like(x)), [w], [], [False], c, f, alpha)


def _recorded_generators(fn) -> list[torch.Tensor]:
    """C of every compression ``fn`` runs; compile with ``pamm_aot_eager`` so the op runs eagerly
    (under ``pamm`` Inductor compiles its decomposition and nothing is recorded)."""
    with pamm_fx.ops.record_compressions() as seen:
        fn()
    return [c for _, c, _, _ in seen]


def test_changing_ratio_recompiles_with_the_new_ratio():
    x, _ = _inputs(seq=16)
    model = _net(layers=1)
    ks = []
    for ratio in (1 / 2, 1 / 8):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="pamm_aot_eager", options={**COMPRESS, "ratio": ratio})
        ks.append([c.shape[0] for c in _recorded_generators(lambda compiled=compiled: compiled(x))])
    assert ks == [[16], [4]]


def test_generators_change_every_step_and_follow_the_seed():
    x, _ = _inputs(seq=32)
    model = _net(layers=1)

    def three_steps(options: dict) -> list[torch.Tensor]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="pamm_aot_eager", options=options)
        return _recorded_generators(lambda: [compiled(x) for _ in range(3)])

    torch.manual_seed(123)
    a = three_steps(COMPRESS)
    torch.manual_seed(123)
    b = three_steps(COMPRESS)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # seed=None follows torch.manual_seed
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    seeded = three_steps({**COMPRESS, "seed": 7})
    torch.manual_seed(999)
    assert all(torch.equal(p, q) for p, q in zip(seeded, three_steps({**COMPRESS, "seed": 7})))


def test_model_with_nothing_to_rewrite_is_plain_inductor(caplog):
    mlp = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))
    x, proj = _inputs()
    expected = _grads(mlp, x, proj, "inductor")
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="pamm_fx"), capture_rewrites() as records:
        got = _grads(mlp, x, proj, "pamm", EXACT)
    assert [r.rewritten for r in records] == [None]
    assert "no projection group in this graph; handing it to Inductor unchanged" in caplog.text
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_saving_holds_with_checkpointing_off_and_budget_on():
    x, _ = _inputs(seq=64)
    model = _net()
    with torch._functorch.config.patch(activation_memory_budget=0.8):
        base = saved_for_backward(lambda: torch.compile(model)(x.requires_grad_(True)), model).nbytes
        torch._dynamo.reset()
        ours = saved_for_backward(
            lambda: torch.compile(model, backend="pamm", options=COMPRESS)(x.requires_grad_(True)), model
        ).nbytes
    assert ours < base
    assert pamm_fx.counters["groups_rewritten"] >= 2


def test_bf16_weights_keep_c_in_bf16_and_match_plain_compile():
    x, proj = (t.bfloat16() for t in _inputs(seq=16))
    model = _net(layers=1).bfloat16()
    expected = _grads(model, x, proj, "inductor")
    torch._dynamo.reset()
    got = _grads(model, x, proj, "pamm", EXACT)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2 * max(1.0, e.abs().max().item()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pamm_aot_eager", options=COMPRESS)
    assert [c.dtype for c in _recorded_generators(lambda: compiled(x))] == [torch.bfloat16]


@pytest.mark.parametrize("stage", ["find_groups", "rewrite_groups", "inductor"])
def test_a_failure_of_ours_falls_back_to_plain_inductor(stage, monkeypatch, caplog):
    from pamm_fx import compiler

    x, proj = _inputs()
    model = _net(layers=1)
    expected = _grads(model, x, proj, "inductor")
    torch._dynamo.reset()
    if stage == "inductor":
        real = compiler._inductor

        def fail_on_pamm_ops(gm, example_inputs, patches):
            if any(n.target is torch.ops.pamm.linear_group.default for n in gm.graph.nodes):
                raise RuntimeError("injected Inductor failure")
            return real(gm, example_inputs, patches)

        monkeypatch.setattr(compiler, "_inductor", fail_on_pamm_ops)
    else:

        def boom(*args, **kwargs):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(pamm_fx.plan, stage, boom)  # plan() matches, apply() rewrites
    before = pamm_fx.counters["fallbacks"]
    with caplog.at_level(logging.WARNING, logger="pamm_fx"):
        got = _grads(model, x, proj, "pamm", EXACT)
    assert pamm_fx.counters["fallbacks"] == before + 1
    assert "compiling the" in caplog.text and "untouched" in caplog.text
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_groups_smaller_than_min_generators_stay_exact():
    x, proj = _inputs()  # 24 rows, below the default floor of 256 generators
    with capture_rewrites() as records:
        _grads(_net(layers=1), x, proj, "pamm", {"ratio": 1 / 4, "min_tokens": 1})
    (record,) = records
    assert record.rewritten is None
    assert "X has 24 rows, not more than min_generators=256: every row would be kept" in record.summary


def test_graph_with_nothing_to_rewrite_reaches_inductor_as_captured(monkeypatch):
    from pamm_fx import compiler

    w = nn.Parameter(torch.randn(D, 32))
    seen = []
    real = compiler._inductor

    def record(gm, example_inputs, patches):
        seen.append(gm.code)
        return real(gm, example_inputs, patches)

    monkeypatch.setattr(compiler, "_inductor", record)
    x, _ = _inputs()
    torch.compile(lambda t: torch.relu(t @ w).sum(), backend="pamm", options=EXACT)(x).backward()
    (code,) = seen
    assert "linear" not in code and "matmul" in code  # normalize_linears ran on a copy only
