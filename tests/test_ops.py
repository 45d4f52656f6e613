"""The pamm:: ops on their own: opcheck, the compression math, the backward math."""

import math

import pytest
import torch
from torch.library import opcheck

import pamm_fx.ops  # registers the ops
from pamm_fx.kernels import assign, contract, device
from pamm_fx.ops import num_generators, sample_generators

INF = math.inf
SHAPES = [(3, 37, 24), (1, 5, 24), (130, 16), (0, 24)]
#: sample_generators(100, 5, seed 12345, salt 7): the hash draw must never change silently.
PINNED_DRAW = [2, 9, 23, 74, 75]


def _compress(x, seed=7, ratio=(1, 8), min_gen=1, eps=INF, salt=0):
    return torch.ops.pamm.compress(x, torch.tensor(seed), ratio[0], ratio[1], min_gen, 1, eps, salt)


def test_stream_key_is_an_opaque_op_that_inductor_keeps_as_one_call():
    """The key is computed by its own op (opcheck), so Inductor never inlines its nested hash rounds
    into every row's or element's hash: the compiled draw calls it once and equals the eager draw."""
    from torch._inductor.utils import run_and_get_code

    for seed, salt in [(0, 0), (12345, 7), (2**62 + 3, 2**40 + 1)]:
        opcheck(torch.ops.pamm.stream_key.default, (torch.tensor(seed), salt))
    draw = torch.compile(lambda s: sample_generators(100, 5, s, 7), backend="inductor", fullgraph=True)
    out, (code, *_) = run_and_get_code(draw, torch.tensor(12345))
    assert out.tolist() == PINNED_DRAW
    assert code.count("torch.ops.pamm.stream_key.default(") == 1, code


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


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_opcheck_linear_group_with_x_in_another_dtype(x_dtype):
    """Under autocast X may be in another dtype than the (cast) weights: the op computes in the weights'
    dtype and returns dX in X's dtype."""
    x = torch.randn(2, 24, 16, dtype=x_dtype, requires_grad=True)
    c, f, alpha = _compress(x.detach().bfloat16())
    weights = [torch.randn(m, 16, dtype=torch.bfloat16, requires_grad=True) for m in (8, 4)]
    bias = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    opcheck(torch.ops.pamm.linear_group.default, (x, weights, [bias], [False, True], c, f, alpha))
    outs = torch.ops.pamm.linear_group.default(x, weights, [bias], [False, True], c, f, alpha)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 2
    sum(o.float().sum() for o in outs).backward()
    assert x.grad.dtype == x_dtype and all(w.grad.dtype == torch.bfloat16 for w in weights)


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
    f2, alpha2 = assign.reference(torch.randn(10, 8), torch.zeros(3, 8))
    assert (alpha2 == 0).all() and (f2 == 0).all()


def test_nan_rows_do_not_crash():
    x = torch.randn(64, 8)
    x[5] = float("nan")
    c, f, alpha = _compress(x, ratio=(1, 4))
    assert f.shape == (64,) and ((f >= 0) & (f < c.shape[0])).all()


def test_eps_drops_far_rows_and_rescales():
    x = torch.randn(64, 8)
    c = x[:4]
    f_all, a_all = assign.reference(x, c, INF)
    f_eps, a_eps = assign.reference(x, c, 0.5)
    approx = a_all[:, None] * c[f_all.long()]
    err = (x - approx).norm(dim=1) / x.norm(dim=1)
    keep = err <= 0.5
    assert (a_eps[~keep] == 0).all() and keep.sum() < 64
    torch.testing.assert_close(a_eps[keep], a_all[keep] * 64 / int(keep.sum()))


def test_ties_go_to_the_smallest_generator():
    c = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    f, alpha = assign.reference(torch.tensor([[3.0, 0.0]]), c)
    assert f.item() == 0 and alpha.item() == pytest.approx(3.0)


def test_chunking_does_not_change_results(monkeypatch):
    x = torch.randn(300, 12)
    c = x[torch.randperm(300)[:50]]
    f1, a1 = assign.reference(x, c)
    grads = [torch.randn(300, 5), torch.randn(300, 3)]
    b1 = contract.reference(grads, f1, a1, 50)
    monkeypatch.setattr(device, "ROW_CHUNK", 7)
    monkeypatch.setattr(assign, "GEN_CHUNK", 3)
    f2, a2 = assign.reference(x, c)
    assert torch.equal(f1, f2)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(contract.reference(grads, f2, a2, 50), b1)


def test_sampling_is_reproducible_and_varies_with_seed_and_salt():
    draw = lambda seed, salt, b=1000, k=16: sample_generators(b, k, torch.tensor(seed), salt)  # noqa: E731
    a = draw(1, 0)
    assert a.dtype == torch.int64 and torch.equal(a, draw(1, 0))
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 16
    assert ((a >= 0) & (a < 1000)).all()
    assert not torch.equal(a, draw(2, 0))
    assert not torch.equal(a, draw(1, 1))
    assert not torch.equal(a, draw(1, 1 << 40))  # the salt's high bits count too
    assert not torch.equal(a, draw(1 << 40, 0))  # and the seed's
    assert torch.equal(draw(5, 3, b=64, k=64), torch.arange(64))


def test_sampling_is_a_fixed_function_of_seed_salt_b_k():
    """Bitwise the same rows in any process and on any device: pinned values of the hash draw."""
    assert sample_generators(100, 5, torch.tensor(12345), 7).tolist() == PINNED_DRAW


def test_sampling_is_uniform():
    """Every row is drawn about equally often over many seeds (chi-square within 5 sigma)."""
    b, k, seeds = 64, 8, 4000
    counts = torch.zeros(b)
    for s in range(seeds):
        counts[sample_generators(b, k, torch.tensor(s), 0)] += 1
    expected = seeds * k / b
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - (b - 1)) < 5 * math.sqrt(2 * (b - 1))


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


def test_inductor_decomposition_matches_the_eager_op():
    """backend="inductor" compiles compress from its aten decomposition: same rows, same f, alpha to rounding."""
    torch.manual_seed(0)
    x = torch.randn(3, 37, 24)
    x[0, ::5] = 0

    def both(x, seed):
        return (torch.ops.pamm.compress(x, seed, 1, 8, 1, 1, INF, 3), torch.ops.pamm.compress(x, seed, 1, 4, 1, 1, 0.9, 4),
                torch.ops.pamm.compress(x, seed, 1, 1, 1, 1, INF, 5))

    seed = torch.tensor(11)
    compiled = torch.compile(both, backend="inductor", fullgraph=True)(x, seed)
    for (c, f, alpha), (c_e, f_e, alpha_e) in zip(compiled, both(x, seed)):
        assert torch.equal(c, c_e) and torch.equal(f, f_e) and f.dtype == torch.int32
        torch.testing.assert_close(alpha, alpha_e)
    assert (compiled[1][2] == 0).any()  # eps dropped rows in the compiled graph too


def test_record_compressions_sees_every_eager_compression():
    x = torch.randn(40, 8)
    with pamm_fx.ops.record_compressions() as seen:
        c, f, alpha = _compress(x, ratio=(1, 4))
        _compress(x, ratio=(1, 1))
    _compress(x)
    assert len(seen) == 2
    rows, c_seen, f_seen, alpha_seen = seen[0]
    assert torch.equal(rows, x) and torch.equal(c_seen, c) and torch.equal(f_seen, f) and torch.equal(alpha_seen, alpha)


def test_flop_formulas_price_the_pamm_ops():
    from torch.utils.flop_counter import FlopCounterMode

    b, n, m1, m2 = 60, 12, 8, 4
    x = torch.randn(b, n, requires_grad=True)
    weights = [torch.randn(m1, n, requires_grad=True), torch.randn(m2, n, requires_grad=True)]
    with FlopCounterMode(display=False) as counter:
        c, f, alpha = _compress(x.detach(), ratio=(1, 6))
        ys = torch.ops.pamm.linear_group(x, weights, [], [False, False], c, f, alpha)
        sum(y.sum() for y in ys).backward()
    flops = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    k = c.shape[0]
    assert flops["pamm.compress"] == 2 * b * n * k
    assert flops["pamm.linear_group"] == 2 * b * n * (m1 + m2)
    assert flops["pamm.contract"] == 2 * b * (m1 + m2)


def test_bf16_backward_keeps_no_float32_copy_of_c_or_of_the_weight_gradients():
    """dW_j = B~_j^T C in bf16 GEMMs: no float32 (k, n) copy of C and no float32 (sum m) x n product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.outs: list[tuple[str, tuple[int, ...], torch.dtype]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.outs.append((str(func), tuple(t.shape), t.dtype))
            return out

    torch.manual_seed(0)
    x = torch.randn(2, 48, 16, dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(m, 16, dtype=torch.bfloat16, requires_grad=True) for m in (8, 6)]
    c, f, alpha = _compress(x.detach(), ratio=(1, 8))
    ys = torch.ops.pamm.linear_group(x, weights, [], [False, False], c, f, alpha)
    grads = [torch.randn_like(y) for y in ys]
    with Log() as log:
        torch.autograd.backward(ys, grads)
    fp32_outs = [o for o in log.outs if o[2] == torch.float32]
    assert not [o for o in fp32_outs if o[1] in [tuple(c.shape), (14, 16), (8, 16), (6, 16)]], fp32_outs
    assert all(w.grad.dtype == torch.bfloat16 for w in weights)
    x_tilde = alpha[:, None] * c[f.long()].float()
    for w, g in zip(weights, grads):
        expected = g.reshape(-1, w.shape[0]).float().T @ x_tilde
        torch.testing.assert_close(w.grad.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_frozen_projection_is_not_contracted():
    x = torch.randn(30, 12)
    c, f, alpha = _compress(x, ratio=(1, 6))
    w_frozen, w_train = torch.randn(8, 12), torch.randn(4, 12, requires_grad=True)
    ys = torch.ops.pamm.linear_group(x, [w_frozen, w_train], [], [False, False], c, f, alpha)
    g = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, g)
    torch.testing.assert_close(w_train.grad, g[1].T @ (alpha[:, None] * c[f.long()]))


def test_reference_contract_upcasts_low_precision_grads_by_row_chunk(monkeypatch):
    x = torch.randn(300, 12)
    c, f, alpha = _compress(x, ratio=(1, 10))
    grads = [torch.randn(300, 5).bfloat16(), torch.randn(300, 3).bfloat16()]
    whole = contract.reference([g.float() for g in grads], f, alpha, c.shape[0])
    monkeypatch.setattr(device, "ROW_CHUNK", 64)
    torch.testing.assert_close(contract.reference(grads, f, alpha, c.shape[0]), whole)
