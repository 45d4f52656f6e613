"""Issue 18, op-level contract: one named regression test per way the ops differed from plain.

- a member whose output gets no gradient leaves its weight and bias ``.grad`` as plain does (None);
- NaN/Inf in X or dY reach the weight gradient on every path (eager kernel, aot_eager, Inductor, Triton);
- PAMM's per-call randomness never consumes or shifts the user's generator (dropout, later ``torch.rand``);
- float64 models get float64-exact weight gradients at ratio 1.

Each was wrong on main before this change (the tests say how). Plain is the same backend family
without PAMM (``aot_eager`` for ``pamm_aot_eager``, ``inductor`` for ``pamm``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pamm_fx.kernels import assign, contract
from pamm_fx.ops import record_compressions

D = 16
EXACT = {"ratio": 1, "min_tokens": 1, "min_generators": 1}
COMPRESS = {"ratio": 1 / 8, "min_tokens": 1, "min_generators": 1}


def _randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class _Attn(nn.Module):
    """Q/K/V of one X; ``detach`` cuts K's output from the loss, ``unused`` never reads V's."""

    def __init__(self, detach: bool = False, unused: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.detach, self.unused, self.dropout = detach, unused, dropout

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.detach:
            k = k.detach()
        if self.unused:
            v = q
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        return self.o(F.dropout(att, self.dropout, self.training) @ v)


def _model(dtype: torch.dtype = torch.float32, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return _Attn(**kw).to(dtype)


def _step(model: nn.Module, backend: str, options: dict | None, x: Tensor) -> tuple[Tensor, dict]:
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    compiled = torch.compile(model, backend=backend, options=options if backend.startswith("pamm") else None)
    out = compiled(x)
    (out * _randn(*out.shape, seed=7, dtype=out.dtype)).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return out.detach(), grads


@pytest.mark.parametrize("backend,plain", [("pamm_aot_eager", "aot_eager"), ("pamm", "inductor")],
                         ids=["aot_eager", "inductor"])
@pytest.mark.parametrize("kind", ["detach", "unused"])
def test_member_without_output_gradient_keeps_grad_none(backend: str, plain: str, kind: str) -> None:
    """Was: zeros for k.weight/k.bias (detach) or v.weight/v.bias (unused) where plain has None."""
    model = _model(**{kind: True})
    x = _randn(2, 12, D)
    _, expected = _step(model, plain, None, x)
    dead = {n for n, g in expected.items() if g is None}
    assert dead == ({"k.weight", "k.bias"} if kind == "detach" else {"v.weight", "v.bias"})
    for options in (EXACT, COMPRESS):
        _, got = _step(model, backend, options, x)
        assert {n for n, g in got.items() if g is None} == dead, options
        if options is EXACT:
            for n, g in expected.items():
                if g is not None:
                    torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", ["pamm_aot_eager", "pamm"])
def test_nan_row_in_x_reaches_every_weight_gradient(backend: str) -> None:
    """Was: under the eager kernel the NaN row got alpha = 0 and dW came out finite."""
    model = _model()
    x = _randn(2, 12, D)
    x[1, 5, 3] = math.nan
    _, grads = _step(model, backend, COMPRESS, x)
    for name in ("q.weight", "k.weight", "v.weight"):
        assert not torch.isfinite(grads[name]).all(), name


def test_assign_poisons_rows_with_non_finite_similarity() -> None:
    x = _randn(40, D)
    x[3, 0] = math.nan
    x[7, 2] = math.inf
    c = x[[0, 10, 20]].clone()
    _, alpha = assign.reference(x, c)
    bad = ~torch.isfinite(alpha)
    assert bad.tolist() == [i in (3, 7) for i in range(40)]
    c[1, 4] = -math.inf  # a non-finite generator makes every row's gradient non-finite, as under plain
    _, alpha = assign.reference(x, c)
    assert torch.isnan(alpha).all()
    _, alpha = assign.reference(x, x[[0, 10, 20]], eps=0.5)  # the eps rule never hides a NaN row
    assert torch.isnan(alpha[[3, 7]]).all() and torch.isfinite(alpha[[0, 1, 2]]).all()


def test_contract_propagates_nan_dy_of_alpha_zero_rows() -> None:
    """Plain's dY^T X is NaN when a dY row is NaN, even where X's row is zero (alpha = 0)."""
    f = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    alpha = torch.tensor([1.0, 0.0, 2.0, 0.5])
    dy = _randn(4, 3)
    dy[1, 2] = math.nan
    out = contract.reference([dy], f, alpha, 2)
    assert torch.isnan(out[1, 2]) and torch.isfinite(out[0]).all()


def test_pamm_never_consumes_the_users_random_stream() -> None:
    """Was: each call drew its seed from the global generator, so dropout masks and later draws shifted."""
    model = _model(dropout=0.3)
    x = _randn(2, 12, D)

    def run(backend: str, options: dict | None) -> tuple[Tensor, dict, Tensor]:
        torch.manual_seed(123)
        out, grads = _step(model, backend, options, x)
        return out, grads, torch.rand(4)

    plain_out, plain_grads, plain_next = run("aot_eager", None)
    for options in (COMPRESS, EXACT):
        out, grads, nxt = run("pamm_aot_eager", options)
        assert torch.equal(out, plain_out), options  # same dropout masks: the forward is exact
        assert torch.equal(nxt, plain_next), options
    for name, g in plain_grads.items():  # ratio 1 is plain, bitwise, dropout included
        assert torch.equal(grads[name], g), name


def test_seed_none_draws_follow_manual_seed_without_touching_it() -> None:
    model = _model()
    x = _randn(2, 32, D)

    def draws(seed: int) -> list[Tensor]:
        torch._dynamo.reset()
        torch.manual_seed(seed)
        compiled = torch.compile(model, backend="pamm_aot_eager", options=COMPRESS)
        with record_compressions() as seen:
            for _ in range(3):
                compiled(x)
        return [c for _, c, _, _ in seen]

    a, b, other = draws(5), draws(5), draws(6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1])  # a fresh draw every call
    assert any(not torch.equal(p, q) for p, q in zip(a, other))


@pytest.mark.parametrize("estimator", ["pamm", "sr"])
def test_manual_seed_with_the_same_value_restarts_the_stream(estimator: str) -> None:
    """Issue 24: re-seeding with the same value restarts PAMM's stream, as it restarts dropout: the same generator
    rows and sr noise (weight gradients) again. Was: only a new value restarted it, so the rows went on."""
    model = _model(dropout=0.2)
    compiled = torch.compile(model, backend="pamm_aot_eager", options={**COMPRESS, "estimator": estimator})
    x = _randn(2, 32, D)

    def step() -> tuple[list[Tensor], dict[str, Tensor]]:
        model.zero_grad(set_to_none=True)
        with record_compressions() as seen:
            compiled(x).sum().backward()
        return [c for _, c, _, _ in seen], {n: p.grad.clone() for n, p in model.named_parameters()}

    torch.manual_seed(7)
    first = [step(), step()]
    torch.manual_seed(7)
    again = [step(), step()]
    for (rows, grads), (rows2, grads2) in zip(first, again):
        assert all(torch.equal(a, b) for a, b in zip(rows, rows2))
        assert all(torch.equal(g, grads2[n]) for n, g in grads.items()), "not the same noise/rows after re-seeding"
    assert any(not torch.equal(a, b) for a, b in zip(first[0][1].values(), first[1][1].values()))  # steps differ


def test_fixed_seed_stream_ignores_torch_manual_seed() -> None:
    """An int ``seed`` option is a stream of its own: torch's re-seeding does not restart it."""
    model = _model()
    compiled = torch.compile(model, backend="pamm_aot_eager", options={**COMPRESS, "seed": 3})
    x = _randn(2, 32, D)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        with record_compressions() as seen:
            compiled(x)
        draws.append(seen[0][1])
    assert not torch.equal(*draws)


@pytest.mark.parametrize("backend,plain", [("pamm_aot_eager", "aot_eager"), ("pamm", "inductor")],
                         ids=["aot_eager", "inductor"])
def test_float64_ratio_one_is_float64_exact(backend: str, plain: str) -> None:
    """Was: B~ accumulated in float32, so float64 weight gradients were only float32-accurate (~3e-8)."""
    model = _model(torch.float64)
    x = _randn(2, 12, D, dtype=torch.float64)
    out_p, expected = _step(model, plain, None, x)
    out, got = _step(model, backend, EXACT, x)
    torch.testing.assert_close(out, out_p, rtol=1e-13, atol=1e-13)
    for name, g in expected.items():
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-12, msg=name)


def test_float64_contract_accumulates_in_float64() -> None:
    dy = _randn(50, 4, dtype=torch.float64) * 1e3 + 1.0
    f = torch.zeros(50, dtype=torch.int32)
    out = contract.reference([dy], f, torch.ones(50), 1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[0], dy.sum(0), rtol=1e-14, atol=0)


class _Stateful(nn.Module):
    """BatchNorm statistics, a tensor the forward caches on the module, dropout, and attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn(dropout=0.2)
        self.norm = nn.BatchNorm1d(D)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        self.cache = x.mean()
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.attn(h if scale is None else h * scale)


def test_explain_leaves_no_trace_on_the_model_or_the_rng() -> None:
    """Was: BatchNorm statistics and num_batches_tracked moved, and the global RNG advanced."""
    import pamm_fx

    torch.manual_seed(0)
    model = _Stateful()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    report = pamm_fx.explain(model, _randn(2, 12, D), min_tokens=1, min_generators=1)
    assert len(report.groups) == 1 and not report.notes
    assert torch.equal(torch.rand(3), expected_next)
    assert not hasattr(model, "cache")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_explain_passes_model_keyword_arguments() -> None:
    import pamm_fx

    model = _Stateful()
    report = pamm_fx.explain(model, model_kwargs={"x": _randn(2, 12, D), "scale": torch.tensor(2.0)},
                             min_tokens=1, min_generators=1)
    assert [p.weight.rsplit(".", 2)[-2] for p in report.groups[0].projections] == ["q", "k", "v"]
    with pytest.raises(ValueError, match=r"unknown pamm option\(s\) \['scale'\].*model_kwargs"):
        pamm_fx.explain(model, _randn(2, 12, D), scale=torch.tensor(2.0))


def test_explain_says_why_nothing_was_captured() -> None:
    import pamm_fx

    class Disabled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(D, D), nn.Linear(D, D)

        @torch.compiler.disable
        def forward(self, x: Tensor) -> Tensor:
            return self.q(x) + self.k(x)

    report = pamm_fx.explain(Disabled(), _randn(2, 4, D))
    assert report.graphs == [] and len(report.notes) == 2
    assert "torch.compiler.disable" in report.notes[0] and report.notes[0] in str(report)
    assert report.notes[1].startswith("{q,k}.weight: no captured graph reads these linear weights")
    empty = pamm_fx.explain(lambda n: n + 1, 3)
    assert "no tensor operation" in empty.notes[0]
