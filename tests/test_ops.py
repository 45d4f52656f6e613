"""The pamm:: ops on their own: opcheck, the compression math, the backward math."""

import math

import pytest
import torch
from torch.library import opcheck

import pamm_fx  # noqa: F401  (registers the ops)
from pamm_fx.kernels import reference
from pamm_fx.ops import num_generators, sample_generators

INF = math.inf
SHAPES = [(3, 37, 24), (1, 5, 24), (130, 16), (0, 24)]


def _compress(x, seed=7, ratio=(1, 8), min_gen=1, eps=INF, salt=0):
    return torch.ops.pamm.compress(x, torch.tensor(seed), ratio[0], ratio[1], min_gen, 1, eps, salt)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_compress(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    if x.numel():
        x.view(-1, shape[-1])[::4] = 0  # padding rows
    for args in [(1, 8, 1, 1, INF, 0), (1, 1, 1, 1, INF, 3), (1, 64, 2, 1, 0.5, 1), (1, 8, 1, 64, INF, 0)]:
        opcheck(torch.ops.pamm.compress.default, (x, torch.tensor(11), *args))
        opcheck(torch.ops.pamm.compress.default, (x.clone().requires_grad_(dtype.is_floating_point), torch.tensor(11), *args))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear_group_and_contract(shape, dtype):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    c, f, alpha = _compress(x.detach())
    weights = [torch.randn(16, n, dtype=dtype, requires_grad=True), torch.randn(8, n, dtype=dtype, requires_grad=True)]
    bias = torch.randn(8, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.pamm.linear_group.default, (x, weights, [bias], [False, True], c, f, alpha))
    opcheck(torch.ops.pamm.linear_group.default, (x.detach(), weights, [], [False, False], c, f, alpha))
    grads = [torch.randn(*shape[:-1], 16, dtype=dtype), torch.randn(*shape[:-1], 8, dtype=dtype)]
    opcheck(torch.ops.pamm.contract.default, (grads, f, alpha, c.shape[0]))


def test_k_formula_on_symints_matches_ints():
    for b in (0, 1, 7, 63, 64, 65, 1000):
        assert num_generators(b, 1, 64, 1) == min(b, max(1, math.ceil(b / 64)))
        assert num_generators(b, 3, 7, 5) == min(b, max(5, math.ceil(3 * b / 7)))


def test_ratio_one_is_identity():
    x = torch.randn(50, 12)
    c, f, alpha = _compress(x, ratio=(1, 1))
    assert torch.equal(c, x) and torch.equal(f, torch.arange(50, dtype=torch.int32))
    assert torch.equal(alpha, torch.ones(50))


def test_compression_is_the_nearest_projection():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    c, f, alpha = _compress(x, ratio=(1, 10))
    assert c.shape == (20, 16) and f.dtype == torch.int32 and alpha.dtype == torch.float32
    cn = c / c.norm(dim=1, keepdim=True)
    sim = x @ cn.T
    assert torch.equal(f.long(), sim.abs().argmax(dim=1))
    expected = (x * c[f.long()]).sum(1) / c[f.long()].pow(2).sum(1)
    torch.testing.assert_close(alpha, expected)
    # every generator is a row of X and is assigned to itself
    rows = [int((x == g).all(dim=1).nonzero()[0]) for g in c]
    assert all(f[r] == j for j, r in enumerate(rows))
    assert torch.allclose(alpha[rows], torch.ones(len(rows)))


def test_zero_rows_and_zero_generators_give_no_nan():
    x = torch.zeros(40, 8)
    x[::3] = torch.randn(14, 8)
    c, f, alpha = _compress(x, ratio=(1, 2))
    assert torch.isfinite(alpha).all()
    assert (alpha[(x == 0).all(1)] == 0).all()
    f2, alpha2 = reference.assign(torch.randn(10, 8), torch.zeros(3, 8))
    assert (alpha2 == 0).all() and (f2 == 0).all()


def test_nan_rows_do_not_crash():
    x = torch.randn(64, 8)
    x[5] = float("nan")
    c, f, alpha = _compress(x, ratio=(1, 4))
    assert f.shape == (64,) and ((f >= 0) & (f < c.shape[0])).all()


def test_eps_drops_far_rows_and_rescales():
    x = torch.randn(64, 8)
    c = x[:4]
    f_all, a_all = reference.assign(x, c, INF)
    f_eps, a_eps = reference.assign(x, c, 0.5)
    approx = a_all[:, None] * c[f_all.long()]
    err = (x - approx).norm(dim=1) / x.norm(dim=1)
    keep = err <= 0.5
    assert (a_eps[~keep] == 0).all() and keep.sum() < 64
    torch.testing.assert_close(a_eps[keep], a_all[keep] * 64 / int(keep.sum()))


def test_ties_go_to_the_smallest_generator():
    c = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    f, alpha = reference.assign(torch.tensor([[3.0, 0.0]]), c)
    assert f.item() == 0 and alpha.item() == pytest.approx(3.0)


def test_chunking_does_not_change_results(monkeypatch):
    x = torch.randn(300, 12)
    c = x[torch.randperm(300)[:50]]
    f1, a1 = reference.assign(x, c)
    grads = [torch.randn(300, 5), torch.randn(300, 3)]
    b1 = reference.contract(grads, f1, a1, 50)
    monkeypatch.setattr(reference, "ROW_CHUNK", 7)
    monkeypatch.setattr(reference, "GEN_CHUNK", 3)
    f2, a2 = reference.assign(x, c)
    assert torch.equal(f1, f2)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(reference.contract(grads, f2, a2, 50), b1)


def test_sampling_is_reproducible_and_varies_with_seed_and_salt():
    a = sample_generators(1000, 16, 1, 0)
    assert torch.equal(a, sample_generators(1000, 16, 1, 0))
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 16
    assert not torch.equal(a, sample_generators(1000, 16, 2, 0))
    assert not torch.equal(a, sample_generators(1000, 16, 1, 1))


def test_backward_math_against_explicit_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 12, requires_grad=True)
    wq, wk = torch.randn(8, 12, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    bk = torch.randn(4, requires_grad=True)
    c, f, alpha = _compress(x.detach(), ratio=(1, 6))
    q, k = torch.ops.pamm.linear_group(x, [wq, wk], [bk], [False, True], c, f, alpha)
    torch.testing.assert_close(q, x @ wq.T)
    torch.testing.assert_close(k, x @ wk.T + bk)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward([q, k], [gq, gk])
    torch.testing.assert_close(x.grad, gq @ wq + gk @ wk)
    torch.testing.assert_close(bk.grad, gk.sum((0, 1)))
    x_tilde = alpha[:, None] * c[f.long()]
    torch.testing.assert_close(wq.grad, gq.reshape(-1, 8).T @ x_tilde)
    torch.testing.assert_close(wk.grad, gk.reshape(-1, 4).T @ x_tilde)


def test_contract_is_bitwise_deterministic():
    x = torch.randn(500, 16)
    c, f, alpha = _compress(x, ratio=(1, 16))
    grads = [torch.randn(500, 32)]
    first = torch.ops.pamm.contract(grads, f, alpha, c.shape[0])
    assert torch.equal(first, torch.ops.pamm.contract(grads, f, alpha, c.shape[0]))
