"""Triton kernels against the plain-torch reference.

Without a GPU the kernels run on CPU tensors under triton's interpreter
(``TRITON_INTERPRET=1``). ``@triton.jit`` reads that variable when a kernel module
is imported, and :mod:`pamm_fx.kernels` imports the Triton modules lazily (first
CUDA call only), so setting it here, before the imports below, is enough. With a
GPU the variable is left alone (it would slow every other Triton kernel in the
process) and the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from triton_setup import TraceableInterpreted, kernel_device  # noqa: E402  (before pamm_fx: sets TRITON_INTERPRET)

from pamm_fx.kernels import assign, assign_triton, contract, contract_triton, device, triton_util  # noqa: E402

_INTERPRETED, DEVICE = kernel_device(assign_triton._assign_kernel)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _data(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def _assert_assign(x: torch.Tensor, c: torch.Tensor, eps: float = math.inf) -> None:
    """The kernel's pick scores as high as the best (float64), and f/alpha match the reference.

    f must equal the reference wherever the best and second-best scores are apart by
    more than float32 rounding; alpha must match the reference for the same f.
    """
    f, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE), eps)
    f, alpha = f.cpu(), alpha.cpu()
    f_ref, alpha_ref = assign.reference(x, c, eps)
    assert f.dtype == torch.int32 and alpha.dtype == torch.float32
    assert torch.isfinite(alpha).all()
    norms = torch.linalg.vector_norm(c.double(), dim=1)
    score = (x.double() @ c.double().T).abs() / torch.where(norms > 0, norms, math.inf)
    best = score.max(dim=1).values
    tol = 1e-5 * best.clamp_min(1e-30)
    assert (score.gather(1, f.long()[:, None]).squeeze(1) >= best - tol).all()
    second = score.topk(2, dim=1).values[:, 1] if c.shape[0] > 1 else torch.zeros_like(best)
    clear = best - second > 1e-4 * best.clamp_min(1e-30)
    assert torch.equal(f[clear], f_ref[clear])
    same = f == f_ref
    torch.testing.assert_close(alpha[same], alpha_ref[same], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n,k", [(77, 45, 1), (129, 100, 7), (65, 48, 150)], ids=["k1", "k7", "k_over_block"])
def test_assign_matches_reference(dtype: torch.dtype, b: int, n: int, k: int) -> None:
    x = _data(b, n, dtype=dtype)
    c = x[torch.randperm(b, generator=torch.Generator().manual_seed(1))[:k].sort().values]
    _assert_assign(x, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_assign_eps_rule(dtype: torch.dtype) -> None:
    x = _data(97, 33, dtype=dtype)
    c = x[:5]
    f, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE), 0.9)
    f_ref, alpha_ref = assign.reference(x, c, 0.9)
    assert 0 < int((alpha_ref == 0).sum()) < 97
    assert torch.equal(f.cpu(), f_ref)
    assert torch.equal(alpha.cpu() == 0, alpha_ref == 0)
    torch.testing.assert_close(alpha.cpu(), alpha_ref, rtol=1e-4, atol=1e-5)
    _assert_assign(x, c, 0.5)


def test_assign_ties_go_to_smallest_index() -> None:
    """Ties in the *computed* scores go to the smallest index, within a tile and across tiles.

    Small-integer data makes every dot product exact in float32 whatever order ``tl.dot``
    sums in, so duplicate generators tie bitwise, and the later copy (another tile: 128
    generators a tile) must not win.
    """
    v, w = _data(2, 24, dtype=torch.float32, seed=3)
    c = torch.stack([w, v, -v, 2 * v, v, w])
    x = torch.stack([v, -3 * v, 0.5 * w, w, -w])
    f, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE))
    f_ref, alpha_ref = assign.reference(x, c)
    assert f.cpu().tolist() == [1, 1, 0, 0, 0] == f_ref.tolist()
    torch.testing.assert_close(alpha.cpu(), alpha_ref)
    gen = torch.Generator().manual_seed(8)
    ints = torch.randint(-8, 9, (300, 24), generator=gen).float()
    ints[[140, 290]] = ints[3].clone()
    ints[[200, 201]] = -2 * ints[150]
    rows = ints[[140, 3, 290, 150, 201]]
    f, alpha = assign_triton.assign(rows.to(DEVICE), ints.to(DEVICE))
    f_ref, alpha_ref = assign.reference(rows, ints)
    assert f.cpu().tolist() == [3, 3, 3, 150, 150] == f_ref.tolist()
    torch.testing.assert_close(alpha.cpu(), alpha_ref)


def test_assign_near_ties_across_tiles_pick_an_equivalent_generator() -> None:
    """Duplicate generators in different tiles need not tie bitwise in float32 (``tl.dot``'s
    summation order is the backend's: numpy's BLAS under the interpreter rounds columns of a
    tile differently on some CPUs), so the kernel promises a best-scoring generator up to
    rounding, not the smallest index; either copy gives the same X~ = alpha * C_f."""
    many = _data(150, 24, dtype=torch.float32, seed=8)
    many[140] = many[3]
    f, alpha = assign_triton.assign(many[[140, 3]].to(DEVICE), many.to(DEVICE))
    f, alpha = f.cpu(), alpha.cpu()
    assert set(f.tolist()) <= {3, 140}
    torch.testing.assert_close(alpha[:, None] * many[f.long()], many[[3, 3]])
    f2, alpha2 = assign_triton.assign(many[[140, 3]].to(DEVICE), many.to(DEVICE))
    assert torch.equal(f2.cpu(), f) and torch.equal(alpha2.cpu(), alpha)


def test_assign_zero_rows_and_zero_generators() -> None:
    x = _data(40, 20, dtype=torch.float32, seed=4)
    x[[0, 7, 39]] = 0
    c = torch.cat([torch.zeros(2, 20), x[10:13], torch.zeros(1, 20)])
    f, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE))
    f, alpha = f.cpu(), alpha.cpu()
    f_ref, alpha_ref = assign.reference(x, c)
    assert torch.isfinite(alpha).all()
    assert f[[0, 7, 39]].tolist() == [0, 0, 0] and alpha[[0, 7, 39]].tolist() == [0.0, 0.0, 0.0]
    assert ((f >= 2) & (f <= 4))[alpha != 0].all()
    assert torch.equal(f, f_ref)
    torch.testing.assert_close(alpha, alpha_ref)
    f0, alpha0 = assign_triton.assign(x.to(DEVICE), torch.zeros(3, 20, device=DEVICE))
    assert not f0.any() and not alpha0.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_assign_non_contiguous_x(dtype: torch.dtype) -> None:
    x = _data(50, 2 * 37, dtype=dtype, seed=5)[:, ::2]
    assert not x.is_contiguous()
    _assert_assign(x, x[[4, 20, 33]].contiguous())
    xt = _data(37, 50, dtype=dtype, seed=6).T
    _assert_assign(xt, xt[[1, 2]])


def _contract_inputs(b: int, widths: list[int], k: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(b, m, generator=gen).to(dtype) for m in widths]
    f = torch.randint(0, k, (b,), generator=gen, dtype=torch.int32)
    if k > 2:
        f[f == 1] = 0
    alpha = torch.randn(b, generator=gen)
    return grads, f, alpha


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,widths,k", [(75, [40, 130, 8], 5), (201, [33], 1), (50, [17, 17], 60)])
def test_contract_matches_reference(dtype: torch.dtype, b: int, widths: list[int], k: int) -> None:
    grads, f, alpha = _contract_inputs(b, widths, k, dtype)
    out = contract_triton.contract([g.to(DEVICE) for g in grads], f.to(DEVICE), alpha.to(DEVICE), k)
    ref = contract.reference(grads, f, alpha, k)
    assert out.dtype == torch.float32 and out.shape == (k, sum(widths))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_contract_shaped_and_non_contiguous_grads() -> None:
    grads, f, alpha = _contract_inputs(74, [20, 150], 6, torch.float32)
    shaped = [grads[0].reshape(2, 37, 20), grads[1].T.contiguous().T]
    assert not shaped[1].is_contiguous()
    out = contract_triton.contract([g.to(DEVICE) for g in shaped], f.to(DEVICE), alpha.to(DEVICE), 6)
    torch.testing.assert_close(out.cpu(), contract.reference(grads, f, alpha, 6), rtol=1e-5, atol=1e-5)


def test_contract_is_bitwise_deterministic() -> None:
    grads, f, alpha = _contract_inputs(300, [70, 140], 3, torch.bfloat16)
    args = ([g.to(DEVICE) for g in grads], f.to(DEVICE), alpha.to(DEVICE), 3)
    first = contract_triton.contract(*args)
    second = contract_triton.contract(*args)
    assert torch.equal(first, second)


@pytest.fixture
def traceable_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, let the contraction's ``wrap_triton`` calls wrap traceable kernels (on a GPU they already do)."""
    if _INTERPRETED:
        for name in ("_partial_kernel", "_reduce_kernel"):
            monkeypatch.setattr(contract_triton, name, TraceableInterpreted(getattr(contract_triton, name)))


def _contract_args(b: int, widths: list[int], k: int, dtype: torch.dtype) -> tuple:
    grads, f, alpha = _contract_inputs(b, widths, k, dtype)
    return [g.to(DEVICE) for g in grads], f.to(DEVICE), alpha.to(DEVICE), k


def test_contract_op_opcheck_on_the_kernels_device() -> None:
    """pamm::contract is one op: on CUDA its eager body is the Triton launcher (on the CPU, the reference)."""
    grads, f, alpha, k = _contract_args(75, [40, 130], 5, torch.bfloat16)
    torch.library.opcheck(torch.ops.pamm.contract.default, (grads, f, alpha, k))
    torch.library.opcheck(torch.ops.pamm.contract.default, ([g.reshape(3, 25, -1) for g in grads], f, alpha, k))


def _recording_backend() -> tuple[object, list[torch.fx.GraphModule]]:
    """An aot_eager backend that also keeps every AOTAutograd graph (forward, then backward)."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep), graphs


@pytest.mark.usefixtures("traceable_kernel")
def test_the_backward_traces_the_contraction_into_its_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the contraction runs in Triton, the functionalized backward holds the kernel wrappers (two per
    dY), not an op: on CPU tensors the same path is taken by declaring every Triton dtype Triton's."""
    monkeypatch.setattr(device, "use_triton", lambda t, dtype: device.triton_dtype(dtype))
    x = _data(2, 37, 24, dtype=torch.float32).to(DEVICE)
    c, f, alpha = torch.ops.pamm.compress(x, torch.tensor(3), 1, 4, 1, 1, math.inf, 0)
    weights = [_data(m, 24, dtype=torch.float32, seed=s).to(DEVICE).requires_grad_() for s, m in ((1, 16), (2, 8))]
    backend, graphs = _recording_backend()

    def step(x: torch.Tensor) -> torch.Tensor:
        ys = torch.ops.pamm.linear_group(x, weights, [], [False, False], c, f, alpha)
        return sum(y.square().sum() for y in ys)

    torch.compile(step, backend=backend, fullgraph=True)(x).backward()
    backward = graphs[-1].code
    assert backward.count("triton_kernel_wrapper_functional(") == 4 and "pamm.contract" not in backward
    grads = [2 * torch.nn.functional.linear(x, w).detach() for w in weights]
    bt = contract.reference([g.cpu() for g in grads], f.cpu(), alpha.cpu(), c.shape[0])
    expected = bt.t().mm(c.cpu().float())
    torch.testing.assert_close(torch.cat([w.grad for w in weights]).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_backward_picks_the_contraction_by_device() -> None:
    """CUDA: the Triton launcher traced (kernels in the graph); CPU: the opaque pamm::contract."""
    x = _data(2, 37, 24, dtype=torch.float32).to(DEVICE)
    c, f, alpha = torch.ops.pamm.compress(x, torch.tensor(3), 1, 4, 1, 1, math.inf, 0)
    weights = [_data(16, 24, dtype=torch.float32, seed=s).to(DEVICE).requires_grad_() for s in (1, 2)]
    backend, graphs = _recording_backend()

    def step(x: torch.Tensor) -> torch.Tensor:
        ys = torch.ops.pamm.linear_group(x, weights, [], [False, False], c, f, alpha)
        return sum(y.square().sum() for y in ys)

    torch.compile(step, backend=backend, fullgraph=True)(x).backward()
    backward = graphs[-1].code
    if DEVICE == "cuda":
        assert "triton_kernel_wrapper_functional(" in backward and "pamm.contract" not in backward
    else:
        assert "torch.ops.pamm.contract.default(" in backward and "triton_kernel_wrapper" not in backward
    grads = [2 * torch.nn.functional.linear(x, w).detach() for w in weights]
    bt = contract.reference([g.cpu() for g in grads], f.cpu(), alpha.cpu(), c.shape[0])
    expected = bt.t().mm(c.cpu().float())
    torch.testing.assert_close(torch.cat([w.grad for w in weights]).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_contract_balances_a_skewed_segment() -> None:
    """A padded batch puts most rows on one generator: its segment spans several programs and the
    partial sums still add up (in a fixed order) to the reference."""
    b, k = 3 * contract_triton.CHUNK + 77, 6
    grads, f, alpha = _contract_inputs(b, [40, 9], k, torch.float32)
    f[: b - 30] = 2
    out = contract_triton.contract([g.to(DEVICE) for g in grads], f.to(DEVICE), alpha.to(DEVICE), k)
    torch.testing.assert_close(out.cpu(), contract.reference(grads, f, alpha, k), rtol=1e-5, atol=1e-4)
    again = contract_triton.contract([g.to(DEVICE) for g in grads], f.to(DEVICE), alpha.to(DEVICE), k)
    assert torch.equal(out, again)


def test_contract_propagates_nan_from_rows_with_zero_alpha() -> None:
    """Rows with alpha = 0 (dropped, padding) are read like the rest: plain's dY^T X is NaN when a dY
    row is NaN even where X's row is zero, so B~ must be NaN there too (and equal the reference)."""
    grads, f, alpha = _contract_inputs(90, [20], 4, torch.float32)
    alpha[::3] = 0
    poisoned = grads[0].clone()
    poisoned[3, 5] = float("nan")
    out = contract_triton.contract([poisoned.to(DEVICE)], f.to(DEVICE), alpha.to(DEVICE), 4).cpu()
    ref = contract.reference([poisoned], f, alpha, 4)
    assert torch.isnan(out[int(f[3]), 5]) and int(torch.isnan(out).sum()) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_assign_poisons_non_finite_rows_like_the_reference() -> None:
    """A NaN/Inf row (or generator) gets alpha = NaN, so it reaches dW as under plain; the eps rule
    does not hide it."""
    x = _data(70, 40, dtype=torch.float32, seed=11)
    x[5, 3] = float("nan")
    x[60, 0] = float("inf")
    c = x[[0, 10, 20]].clone()
    for eps in (math.inf, 0.9):
        f, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE), eps)
        _, alpha_ref = assign.reference(x, c, eps)
        assert (~torch.isfinite(alpha.cpu())).nonzero().flatten().tolist() == [5, 60]
        torch.testing.assert_close(alpha.cpu(), alpha_ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    c[1, 0] = float("nan")
    _, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE))
    assert torch.isnan(alpha).all()


def test_assign_eps_rule_over_several_generator_tiles() -> None:
    """The row norms are summed on the first generator tile only; k > BLOCK_K takes several tiles."""
    x = _data(70, 40, dtype=torch.float32, seed=9)
    c = _data(150, 40, dtype=torch.float32, seed=10)
    f, alpha = assign_triton.assign(x.to(DEVICE), c.to(DEVICE), 0.9)
    f_ref, alpha_ref = assign.reference(x, c, 0.9)
    assert 0 < int((alpha_ref == 0).sum()) < 70
    assert torch.equal(alpha.cpu() == 0, alpha_ref == 0)
    _assert_assign(x, c, 0.9)


@pytest.mark.parametrize("allow", [False, True])
def test_fp32_dot_precision_follows_torch_tf32_setting(allow: bool) -> None:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        assert triton_util.dot_precision() == ("tf32" if allow else "ieee")
        x = _data(60, 33, dtype=torch.float32, seed=11)
        f, alpha = assign_triton.assign(x.to(DEVICE), x[[3, 17, 40]].to(DEVICE))
        assert f.cpu()[[3, 17, 40]].tolist() == [0, 1, 2] and torch.isfinite(alpha).all()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_float64_is_left_to_the_exact_reference() -> None:
    from pamm_fx import kernels

    assert not kernels.triton_dtype(torch.float64) and kernels.triton_dtype(torch.bfloat16)
    x = _data(10, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        assign_triton.assign(x.to(DEVICE), x[:2].to(DEVICE))


def test_has_triton_launches_a_kernel_and_falls_back_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pamm_fx import kernels
    from pamm_fx.kernels import probe

    kernels.has_triton.cache_clear()
    try:
        with torch._subclasses.fake_tensor.FakeTensorMode():  # asked while torch.compile traces
            assert kernels.has_triton(DEVICE)
        kernels.has_triton.cache_clear()

        def broken(device: str) -> None:
            raise RuntimeError("no ptxas")

        monkeypatch.setattr(probe, "probe", broken)
        with caplog.at_level("WARNING", logger="pamm_fx.kernels"):
            assert not kernels.has_triton(DEVICE)
        assert "no ptxas" in caplog.text and "reference" in caplog.text
    finally:
        kernels.has_triton.cache_clear()


def test_compress_op_opcheck_on_the_kernels_device() -> None:
    """pamm::compress is one op: on CUDA its eager body launches the Triton assignment (on the CPU, the
    reference), and Inductor keeps it whole there (its decomposition declines)."""
    from pamm_fx.ops.compress import _compress_decomposition

    x = _data(75, 40, dtype=torch.float32).to(DEVICE)
    for eps in (math.inf, 0.5):
        torch.library.opcheck(torch.ops.pamm.compress.default, (x, torch.tensor(3), 1, 8, 1, 1, eps, 0))
    kept_whole = _compress_decomposition(x, torch.tensor(3), 1, 8, 1, 1, math.inf, 0) is NotImplemented
    assert kept_whole == (DEVICE == "cuda")
