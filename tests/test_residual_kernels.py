"""The low-bit residual (PAMM + stochastically rounded R = X - alpha * C_f): Triton kernels vs the reference.

Set-up as in tests/test_triton_kernels.py: without a GPU the kernels run on CPU tensors under
triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel module is imported); with a
GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from triton_setup import InterpretedFunction, TraceableInterpreted, kernel_device  # noqa: E402  (before pamm_fx: sets TRITON_INTERPRET)

from pamm_fx.kernels import residual, residual_triton  # noqa: E402

_INTERPRETED, DEVICE = kernel_device(residual_triton._quantize_kernel)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["reference", "triton"]


def _quantize(impl: str, x: torch.Tensor, c: torch.Tensor, f: torch.Tensor, alpha: torch.Tensor, seed: int,
              salt: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, lo, scale (on the CPU) from the reference or from the Triton kernel on DEVICE."""
    if impl == "reference":
        return residual.quantize_reference(x, c, f, alpha, torch.tensor(seed), salt, bits)
    out = residual_triton.quantize_residual(x.to(DEVICE), c.to(DEVICE), f.to(DEVICE), alpha.to(DEVICE),
                                            torch.tensor(seed, device=DEVICE), salt, bits)
    return tuple(t.cpu() for t in out)


def _dequantize(impl: str, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, n: int, bits: int,
                dtype: torch.dtype) -> torch.Tensor:
    if impl == "reference":
        return residual.dequantize_reference(q, lo, scale, n, bits, dtype)
    return residual_triton.dequantize_residual(q.to(DEVICE), lo.to(DEVICE), scale.to(DEVICE), n, bits, dtype).cpu()


def _inputs(b: int, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """X, generators C drawn from X's rows, a random assignment f and scales alpha (a PAMM-like state)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, generator=gen).to(dtype)
    c = x[torch.randperm(b, generator=gen)[:k]].clone() if b else torch.randn(k, n, generator=gen).to(dtype)
    f = torch.randint(0, c.shape[0], (b,), generator=gen, dtype=torch.int32)
    alpha = torch.randn(b, generator=gen)
    return x, c, f, alpha


def _exact_residual(x: torch.Tensor, c: torch.Tensor, f: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x.double() - alpha.double()[:, None] * c.double()[f.long()]


def _noise(seed: int, salt: int, b: int, n: int) -> torch.Tensor:
    """The format's rounding noise u (b, n) in float64, from the reference's hash."""
    key = residual.noise_key(torch.tensor(seed), salt)
    rows = torch.arange(b, dtype=torch.int64)
    h = residual._mix32(residual._mix32(rows ^ key)[:, None] ^ torch.arange(n, dtype=torch.int64)[None, :])
    return (h >> 8).double() * 2.0**-24


def _codes(q: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    return ((q.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(q.shape[0], -1)[:, :n]


@pytest.mark.parametrize("bits", residual.BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n", [(37, 13), (1, 1), (5, 100), (3, 2100)], ids=["odd", "b1_n1", "n100", "two_tiles"])
def test_quantize_matches_reference(dtype: torch.dtype, bits: int, b: int, n: int) -> None:
    """Same hash, same lo and scale; q is bitwise the reference's wherever the noise is not within
    rounding of v's fraction (a fused X - alpha * C may move R by one rounding on a GPU)."""
    x, c, f, alpha = _inputs(b, n, 4, dtype)
    q_ref, lo_ref, scale_ref = _quantize("reference", x, c, f, alpha, 11, 3, bits)
    q, lo, scale = _quantize("triton", x, c, f, alpha, 11, 3, bits)
    assert q.dtype == torch.uint8 and q.shape == (b, math.ceil(n * bits / 8)) and lo.dtype == scale.dtype == torch.float32
    torch.testing.assert_close(lo, lo_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    codes, codes_ref = _codes(q, n, bits), _codes(q_ref, n, bits)
    v = (_exact_residual(x, c, f, alpha) - lo_ref.double()[:, None]) / scale_ref.double()[:, None]
    near = (v - v.floor() - _noise(11, 3, b, n)).abs() < 1e-4
    assert torch.equal(codes[~near], codes_ref[~near])
    assert ((codes - codes_ref).abs() <= 1).all()
    if _INTERPRETED:
        assert torch.equal(q, q_ref)
    assert not (q_ref[:, -1] >> ((n * bits) % 8 or 8)).any()  # padding bits are zero
    deq, deq_ref = _dequantize("triton", q_ref, lo_ref, scale_ref, n, bits, dtype), \
        _dequantize("reference", q_ref, lo_ref, scale_ref, n, bits, dtype)
    assert deq.dtype == dtype and deq.shape == (b, n)
    # One rounding of the output dtype (the interpreter truncates float32 -> bfloat16).
    torch.testing.assert_close(deq.float(), deq_ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reconstruct_matches_reference_and_is_x_at_ratio_one(dtype: torch.dtype) -> None:
    """X^ = alpha * C_f + deq(q): the backward's operand; at ratio 1 it is X bit for bit."""
    x, c, f, alpha = _inputs(37, 45, 5, dtype, seed=3)
    q, lo, scale = _quantize("reference", x, c, f, alpha, 4, 1, 4)
    ref = residual.reconstruct_reference(q, lo, scale, c, f, alpha, 4, 45, dtype)
    got = residual_triton.reconstruct(q.to(DEVICE), lo.to(DEVICE), scale.to(DEVICE), c.to(DEVICE), f.to(DEVICE),
                                      alpha.to(DEVICE), 4, 45, dtype).cpu()
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    deq = residual.dequantize_reference(q, lo, scale, 45, 4, torch.float32)
    torch.testing.assert_close(ref.float(), (alpha[:, None] * c.float()[f.long()] + deq).to(dtype).float())
    ident = torch.arange(37, dtype=torch.int32)
    for impl in IMPLS:
        q, lo, scale = _quantize(impl, x, x, ident, torch.ones(37), 4, 1, 2)
        args = (q, lo, scale, x, ident, torch.ones(37), 2, 45, dtype)
        x_hat = residual.reconstruct_reference(*args) if impl == "reference" else \
            residual_triton.reconstruct(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)).cpu()
        assert torch.equal(x_hat, x)


def test_format_packs_codes_little_end_first() -> None:
    """Integral v rounds to itself: element j sits in byte j // (8 // bits) at bit (j % (8 // bits)) * bits."""
    levels = [0, 1, 2, 3, 3, 2, 1, 0, 1]
    x = torch.tensor([levels], dtype=torch.float32)
    zero = (torch.zeros(1, 9), torch.zeros(1, dtype=torch.int32), torch.zeros(1))
    for impl in IMPLS:
        q, lo, scale = _quantize(impl, x, *zero, 5, 0, 2)
        assert q.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4, 1]]
        assert lo.tolist() == [0.0] and scale.tolist() == [1.0]
        q, lo, scale = _quantize(impl, x * 5, *zero, 5, 0, 4)
        assert q.tolist() == [[0 | 5 << 4, 10 | 15 << 4, 15 | 10 << 4, 5, 5]] and scale.tolist() == [1.0]
        assert torch.equal(_dequantize(impl, q, lo, scale, 9, 4, torch.float32), x * 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_unbiased_over_salts(impl: str) -> None:
    """E[deq(q(R))] = R: the mean over many salts converges like 1/sqrt(salts), with per-element
    variance at most scale^2 / 4. Fixed inputs and salts: deterministic, cannot flake. Rounding to
    nearest (or down) leaves a bias of up to scale / 2 and fails every bound."""
    salts = 128
    x, c, f, alpha = _inputs(6, 40, 2, torch.float32, seed=4)
    r = _exact_residual(x, c, f, alpha)
    for bits in residual.BITS:
        draws = []
        for salt in range(salts):
            q, lo, scale = _quantize(impl, x, c, f, alpha, 99, salt, bits)
            draws.append(_dequantize(impl, q, lo, scale, 40, bits, torch.float32).double())
        err = torch.stack(draws) - r
        step = scale.double()[:, None]
        assert (err.abs() <= step * (1 + 1e-5) + 1e-6).all()  # at most one level away
        assert (err.square().mean(0).sum(1) <= 40 * step[:, 0].square() / 4 * 1.2 + 1e-10).all()
        mean = err.mean(0)
        assert err[0].norm() > 0.1 * step.norm()  # each draw is noisy ...
        assert mean.norm() <= 2 / math.sqrt(salts) * err.square().mean(0).sum().sqrt()  # ... the mean is not biased
        assert (mean.abs() <= 4 * step / (2 * math.sqrt(salts)) + 1e-6).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_and_constant_residuals_are_exact(impl: str, dtype: torch.dtype) -> None:
    """Ratio 1 (C = X, f = identity, alpha = 1) gives R = 0, stored as scale 0 and dequantized to exact
    zeros; a constant residual row is exact too."""
    x, _, _, _ = _inputs(19, 21, 1, dtype, seed=2)
    ident = torch.arange(19, dtype=torch.int32)
    for bits in residual.BITS:
        q, lo, scale = _quantize(impl, x, x, ident, torch.ones(19), 1, 0, bits)
        assert not q.any() and not lo.any() and not scale.any()
        assert torch.equal(_dequantize(impl, q, lo, scale, 21, bits, dtype), torch.zeros(19, 21, dtype=dtype))
    const = torch.full((3, 21), 0.3).to(dtype)
    q, lo, scale = _quantize(impl, const, x[:1], torch.zeros(3, dtype=torch.int32), torch.zeros(3), 1, 0, 4)
    assert torch.equal(_dequantize(impl, q, lo, scale, 21, 4, dtype), const)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_rows_dequantize_to_nan(impl: str, dtype: torch.dtype) -> None:
    """NaN/Inf in X (or in alpha) poisons exactly its row, as plain's dW would carry it; a finite row
    whose range overflows the float32 scale is NaN too rather than silently finite."""
    x, c, f, alpha = _inputs(8, 30, 2, dtype, seed=5)
    x[1, 3] = math.nan
    x[2, 29] = math.inf
    x[3, 0] = -math.inf
    x[4, :2] = torch.tensor([3e38, -3e38]).to(dtype)
    alpha[5] = math.nan
    for bits in residual.BITS:
        q, lo, scale = _quantize(impl, x, c, f, alpha, 2, 0, bits)
        deq = _dequantize(impl, q, lo, scale, 30, bits, dtype)
        assert deq[1:6].isnan().all() and scale[1:6].isnan().all()
        assert torch.isfinite(deq[[0, 6, 7]]).all()
        assert not q[1:6].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_shapes(impl: str) -> None:
    for b, n in [(0, 10), (4, 0), (0, 0)]:
        x, c, f, alpha = _inputs(b, n, 1, torch.float32)
        q, lo, scale = _quantize(impl, x, c, f, alpha, 0, 0, 4)
        assert q.shape == (b, math.ceil(n / 2)) and lo.shape == scale.shape == (b,)
        assert _dequantize(impl, q, lo, scale, n, 4, torch.float32).shape == (b, n)


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_is_a_pure_function_of_seed_salt_row_column(impl: str) -> None:
    """A second call (a recomputation) gives the same bits; another seed or salt other bits; a row's
    codes do not depend on the other rows or on b (counter-based noise)."""
    x, c, f, alpha = _inputs(40, 33, 3, torch.float32, seed=6)
    first = _quantize(impl, x, c, f, alpha, 7, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, _quantize(impl, x, c, f, alpha, 7, 2, 2)))
    assert not torch.equal(first[0], _quantize(impl, x, c, f, alpha, 8, 2, 2)[0])
    assert not torch.equal(first[0], _quantize(impl, x, c, f, alpha, 7, 3, 2)[0])
    assert not torch.equal(first[0], _quantize(impl, x, c, f, alpha, 7 + (1 << 32), 2, 2)[0])
    head = _quantize(impl, x[:9], c, f[:9], alpha[:9], 7, 2, 2)
    assert torch.equal(head[0], first[0][:9])


def test_reference_chunks_match_the_whole_tensor_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked CPU path and the aten form Inductor compiles are bitwise the same (row indices feed the noise)."""
    monkeypatch.setattr(residual, "ROW_CHUNK", 7)
    x, c, f, alpha = _inputs(30, 17, 3, torch.bfloat16, seed=7)
    for bits in residual.BITS:
        chunked = residual.quantize_reference(x, c, f, alpha, torch.tensor(5), 1, bits)
        whole = residual.quantize_aten(x, c, f, alpha, torch.tensor(5), 1, bits)
        assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
        assert torch.equal(residual.reconstruct_reference(*chunked, c, f, alpha, bits, 17, x.dtype),
                           residual.reconstruct_aten(*whole, c, f, alpha, bits, 17, x.dtype))
        chunked = residual.quantize_reference(x, None, None, None, torch.tensor(5), 1, bits)  # sr: no base
        whole = residual.quantize_aten(x, None, None, None, torch.tensor(5), 1, bits)
        assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
        assert torch.equal(residual.reconstruct_reference(*chunked, None, None, None, bits, 17, x.dtype),
                           residual.reconstruct_aten(*whole, None, None, None, bits, 17, x.dtype))


def test_float64_stays_float64_on_the_reference() -> None:
    x, c, f, alpha = _inputs(9, 10, 2, torch.float64, seed=8)
    q, lo, scale = residual.quantize_reference(x, c, f, alpha, torch.tensor(1), 0, 8)
    assert lo.dtype == scale.dtype == torch.float64
    deq = residual.dequantize_reference(q, lo, scale, 10, 8, torch.float64)
    assert deq.dtype == torch.float64
    assert ((deq - _exact_residual(x, c, f, alpha)).abs() <= scale[:, None] * (1 + 1e-12)).all()
    const = torch.full((2, 10), 0.1, dtype=torch.float64)  # not a float32 value
    q, lo, scale = residual.quantize_reference(const, c, f[:2], torch.zeros(2), torch.tensor(1), 0, 2)
    assert torch.equal(residual.dequantize_reference(q, lo, scale, 10, 2, torch.float64), const)
    with pytest.raises(TypeError, match="float64"):
        residual_triton.quantize_residual(x.to(DEVICE), c.to(DEVICE), f.to(DEVICE), alpha.to(DEVICE),
                                          torch.tensor(1, device=DEVICE), 0, 8)


def test_bits_are_validated() -> None:
    x, c, f, alpha = _inputs(3, 4, 1, torch.float32)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        residual.quantize_reference(x, c, f, alpha, torch.tensor(0), 0, 3)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        residual_triton.quantize_residual(x.to(DEVICE), c.to(DEVICE), f.to(DEVICE), alpha.to(DEVICE),
                                          torch.tensor(0, device=DEVICE), 0, 1)


@pytest.fixture
def traceable_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    if _INTERPRETED:
        for name, fn in list(vars(residual_triton).items()):
            if isinstance(fn, InterpretedFunction):
                monkeypatch.setattr(residual_triton, name, TraceableInterpreted(fn))


@pytest.mark.usefixtures("traceable_kernel")
def test_triton_ops_opcheck() -> None:
    x, c, f, alpha = (t.to(DEVICE) for t in _inputs(21, 19, 3, torch.bfloat16))
    seed = torch.tensor(4, device=DEVICE)
    torch.library.opcheck(torch.ops.pamm.quantize_residual_triton.default, (x, c, f, alpha, seed, 1, 2))
    q, lo, scale = torch.ops.pamm.quantize_residual_triton(x, c, f, alpha, seed, 1, 2)
    torch.library.opcheck(torch.ops.pamm.dequantize_residual_triton.default, (q, lo, scale, 19, 2, torch.bfloat16))
    torch.library.opcheck(torch.ops.pamm.reconstruct_residual_triton.default,
                          (q, lo, scale, c, f, alpha, 2, 19, torch.bfloat16))
    torch.library.opcheck(torch.ops.pamm.quantize_residual_triton.default, (x, None, None, None, seed, 1, 8))
    q, lo, scale = torch.ops.pamm.quantize_residual_triton(x, None, None, None, seed, 1, 8)
    torch.library.opcheck(torch.ops.pamm.reconstruct_residual_triton.default,
                          (q, lo, scale, None, None, None, 8, 19, torch.bfloat16))


@pytest.mark.usefixtures("traceable_kernel")
def test_triton_ops_trace_into_their_kernels() -> None:
    """AOTAutograd decomposes the ops: the graph holds the kernel wrappers, so Inductor schedules them."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm

    x, c, f, alpha = (t.to(DEVICE) for t in _inputs(21, 19, 3, torch.float32))
    seed = torch.tensor(4, device=DEVICE)

    def roundtrip(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        q, lo, scale = torch.ops.pamm.quantize_residual_triton(x, c, f, alpha, seed, 1, 4)
        qx, lox, scalex = torch.ops.pamm.quantize_residual_triton(x, None, None, None, seed, 1, 8)  # sr: no base
        return (torch.ops.pamm.dequantize_residual_triton(q, lo, scale, 19, 4, torch.float32),
                torch.ops.pamm.reconstruct_residual_triton(q, lo, scale, c, f, alpha, 4, 19, torch.float32),
                torch.ops.pamm.reconstruct_residual_triton(qx, lox, scalex, None, None, None, 8, 19, torch.float32))

    out = torch.compile(roundtrip, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(x, seed)
    code = graphs[0].code
    assert code.count("triton_kernel_wrapper_functional(") == 5 and "pamm" not in code
    assert all(torch.equal(a, b) for a, b in zip(out, roundtrip(x, seed)))


@pytest.mark.parametrize("bits", residual.BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n", [(37, 13), (3, 2100)], ids=["odd", "two_tiles"])
def test_no_base_quantizes_x_itself_and_matches_reference(dtype: torch.dtype, bits: int, b: int, n: int) -> None:
    """``estimator="sr"``: without C, f, alpha the kernel quantizes X (HAS_BASE=False), bitwise the reference's
    under the interpreter, which equals the base path with a zero base; the reconstruction is the dequantization."""
    x = _inputs(b, n, 4, dtype)[0]
    q_ref, lo_ref, scale_ref = residual.quantize_reference(x, None, None, None, torch.tensor(11), 3, bits)
    zero_base = (x[:1], torch.zeros(b, dtype=torch.int32), torch.zeros(b))
    assert all(torch.equal(a, z) for a, z in zip((q_ref, lo_ref, scale_ref),
                                                 _quantize("reference", x, *zero_base, 11, 3, bits)))
    q, lo, scale = (t.cpu() for t in residual_triton.quantize_residual(
        x.to(DEVICE), None, None, None, torch.tensor(11, device=DEVICE), 3, bits))
    torch.testing.assert_close(lo, lo_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if _INTERPRETED:
        assert torch.equal(q, q_ref)
    else:
        assert ((_codes(q, n, bits) - _codes(q_ref, n, bits)).abs() <= 1).all()
    ref = residual.reconstruct_reference(q_ref, lo_ref, scale_ref, None, None, None, bits, n, dtype)
    got = residual_triton.reconstruct(q_ref.to(DEVICE), lo_ref.to(DEVICE), scale_ref.to(DEVICE), None, None, None,
                                      bits, n, dtype).cpu()
    assert got.dtype == ref.dtype == dtype and got.shape == (b, n)
    assert torch.equal(ref, residual.dequantize_reference(q_ref, lo_ref, scale_ref, n, bits, dtype))
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    err = (ref.double() - x.double()).abs()
    assert (err <= scale_ref.double()[:, None] * (1 + 1e-5) + torch.finfo(dtype).eps * x.double().abs()).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_base_nan_rows_and_float64(impl: str) -> None:
    """A non-finite row of X dequantizes to NaN (others stay finite); float64 X keeps float64 on the reference."""
    x = _inputs(6, 30, 2, torch.float32, seed=4)[0]
    x[2, 5], x[4, 0] = math.nan, math.inf
    if impl == "reference":
        q, lo, scale = residual.quantize_reference(x, None, None, None, torch.tensor(2), 0, 8)
    else:
        q, lo, scale = (t.cpu() for t in residual_triton.quantize_residual(
            x.to(DEVICE), None, None, None, torch.tensor(2, device=DEVICE), 0, 8))
    deq = residual.reconstruct_reference(q, lo, scale, None, None, None, 8, 30, torch.float32)
    assert deq[[2, 4]].isnan().all() and torch.isfinite(deq[[0, 1, 3, 5]]).all()
    x64 = _inputs(9, 10, 2, torch.float64, seed=8)[0]
    q, lo, scale = residual.quantize_reference(x64, None, None, None, torch.tensor(1), 0, 8)
    deq = residual.reconstruct_reference(q, lo, scale, None, None, None, 8, 10, torch.float64)
    assert lo.dtype == deq.dtype == torch.float64
    assert ((deq - x64).abs() <= scale[:, None] * (1 + 1e-12)).all()


def test_base_must_be_all_or_nothing() -> None:
    x, c, f, alpha = _inputs(3, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="all three or none"):
        residual.quantize_reference(x, c, None, alpha, torch.tensor(0), 0, 4)
