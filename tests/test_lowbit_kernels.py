"""The low-bit format (X, or PAMM's residual R = X - alpha * C_f, stochastically rounded): Triton kernels vs the
reference, and the format's own properties.

Set-up as in tests/test_triton_kernels.py: without a GPU the kernels run on CPU tensors under
triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel module is imported); with a
GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_setup import kernel_device  # noqa: E402  (before pamm_fx: sets TRITON_INTERPRET)

from pamm_fx.kernels import device, hashing, lowbit, quantize, quantize_triton  # noqa: E402

_INTERPRETED, DEVICE = kernel_device(quantize_triton._quantize_kernel)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["reference", "triton"]


def _quantize(impl: str, x: torch.Tensor, c: torch.Tensor, f: torch.Tensor, alpha: torch.Tensor, seed: int,
              salt: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, lo, scale (on the CPU) from the reference or from the Triton kernel on DEVICE."""
    key = lowbit.noise_key(torch.tensor(seed), salt)
    if impl == "reference":
        return quantize.reference(x, c, f, alpha, key, bits)
    on = (None if t is None else t.to(DEVICE) for t in (x, c, f, alpha, key))
    return tuple(t.cpu() for t in quantize_triton.quantize(*on, bits))


def _dequantize(impl: str, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, n: int, bits: int,
                dtype: torch.dtype) -> torch.Tensor:
    return _reconstruct(impl, q, lo, scale, None, None, None, bits, n, dtype)


def _reconstruct(impl: str, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, c: torch.Tensor | None,
                 f: torch.Tensor | None, alpha: torch.Tensor | None, bits: int, n: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """X^ = alpha * C_f + deq(q) (deq(q) without a base), from the format's decode or the Triton kernel."""
    if impl == "reference":
        return lowbit.decode(q, lo, scale, n, bits, dtype, lowbit.base_rows(c, f, alpha, lo.dtype))
    on = [None if t is None else t.to(DEVICE) for t in (q, lo, scale, c, f, alpha)]
    return quantize_triton.decode(*on[:3], n, bits, dtype, *on[3:]).cpu()


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
    key = lowbit.noise_key(torch.tensor(seed), salt)
    rows = torch.arange(b, dtype=torch.int64)
    h = hashing.mix32(hashing.mix32(rows ^ key)[:, None] ^ torch.arange(n, dtype=torch.int64)[None, :])
    return (h >> 8).double() * 2.0**-24


def _codes(q: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    return ((q.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(q.shape[0], -1)[:, :n]


@pytest.mark.parametrize("bits", lowbit.BITS)
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
    ref = _reconstruct("reference", q, lo, scale, c, f, alpha, 4, 45, dtype)
    got = _reconstruct("triton", q, lo, scale, c, f, alpha, 4, 45, dtype)
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    deq = lowbit.decode(q, lo, scale, 45, 4, torch.float32)
    torch.testing.assert_close(ref.float(), (alpha[:, None] * c.float()[f.long()] + deq).to(dtype).float())
    ident = torch.arange(37, dtype=torch.int32)
    for impl in IMPLS:
        q, lo, scale = _quantize(impl, x, x, ident, torch.ones(37), 4, 1, 2)
        x_hat = _reconstruct(impl, q, lo, scale, x, ident, torch.ones(37), 2, 45, dtype)
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
    for bits in lowbit.BITS:
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
    for bits in lowbit.BITS:
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
    for bits in lowbit.BITS:
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
    monkeypatch.setattr(device, "ROW_CHUNK", 7)
    x, c, f, alpha = _inputs(30, 17, 3, torch.bfloat16, seed=7)
    key = lowbit.noise_key(torch.tensor(5), 1)
    for bits in lowbit.BITS:
        for base in ((c, f, alpha), (None, None, None)):  # pamm_sr, and sr (no base)
            chunked = quantize.reference(x, *base, key, bits)
            whole = quantize.aten(x, *base, key, bits)
            assert all(torch.equal(a, b) for a, b in zip(chunked, whole))


def test_float64_stays_float64_on_the_reference() -> None:
    x, c, f, alpha = _inputs(9, 10, 2, torch.float64, seed=8)
    q, lo, scale = _quantize("reference", x, c, f, alpha, 1, 0, 8)
    assert lo.dtype == scale.dtype == torch.float64
    deq = lowbit.decode(q, lo, scale, 10, 8, torch.float64)
    assert deq.dtype == torch.float64
    assert ((deq - _exact_residual(x, c, f, alpha)).abs() <= scale[:, None] * (1 + 1e-12)).all()
    const = torch.full((2, 10), 0.1, dtype=torch.float64)  # not a float32 value
    q, lo, scale = _quantize("reference", const, c, f[:2], torch.zeros(2), 1, 0, 2)
    assert torch.equal(lowbit.decode(q, lo, scale, 10, 2, torch.float64), const)
    with pytest.raises(TypeError, match="float64"):
        _quantize("triton", x, c, f, alpha, 1, 0, 8)


def test_bits_are_validated() -> None:
    x, c, f, alpha = _inputs(3, 4, 1, torch.float32)
    for impl, bits in (("reference", 3), ("triton", 1)):
        with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
            _quantize(impl, x, c, f, alpha, 0, 0, bits)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        lowbit.LowBit(3)


def test_quantize_op_opcheck_on_the_kernels_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """pamm::quantize is one op: on CUDA its eager body launches the Triton kernel (on the CPU, the reference),
    and Inductor keeps it whole there: its decomposition declines where the Triton kernel runs (checked on CPU
    tensors by declaring every Triton dtype Triton's)."""
    from pamm_fx.ops.lowbit import _quantize_decomposition

    x, c, f, alpha = (t.to(DEVICE) for t in _inputs(21, 19, 3, torch.bfloat16))
    seed = torch.tensor(4, device=DEVICE)
    torch.library.opcheck(torch.ops.pamm.quantize.default, (x, c, f, alpha, seed, 1, 2))
    torch.library.opcheck(torch.ops.pamm.quantize.default, (x, None, None, None, seed, 1, 8))
    assert (_quantize_decomposition(x, None, None, None, seed, 1, 8) is NotImplemented) == (DEVICE == "cuda")
    monkeypatch.setattr(device, "use_triton", lambda t, dtype: device.triton_dtype(dtype))
    assert _quantize_decomposition(x, None, None, None, seed, 1, 8) is NotImplemented
    assert _quantize_decomposition(x.double(), None, None, None, seed, 1, 8) is not NotImplemented


@pytest.mark.parametrize("bits", lowbit.BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n", [(37, 13), (3, 2100)], ids=["odd", "two_tiles"])
def test_no_base_quantizes_x_itself_and_matches_reference(dtype: torch.dtype, bits: int, b: int, n: int) -> None:
    """``estimator="sr"``: without C, f, alpha the kernel quantizes X (HAS_BASE=False), bitwise the reference's
    under the interpreter, which equals the base path with a zero base; the reconstruction is the dequantization."""
    x = _inputs(b, n, 4, dtype)[0]
    q_ref, lo_ref, scale_ref = _quantize("reference", x, None, None, None, 11, 3, bits)
    zero_base = (x[:1], torch.zeros(b, dtype=torch.int32), torch.zeros(b))
    assert all(torch.equal(a, z) for a, z in zip((q_ref, lo_ref, scale_ref),
                                                 _quantize("reference", x, *zero_base, 11, 3, bits)))
    q, lo, scale = _quantize("triton", x, None, None, None, 11, 3, bits)
    torch.testing.assert_close(lo, lo_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if _INTERPRETED:
        assert torch.equal(q, q_ref)
    else:
        assert ((_codes(q, n, bits) - _codes(q_ref, n, bits)).abs() <= 1).all()
    ref = _reconstruct("reference", q_ref, lo_ref, scale_ref, None, None, None, bits, n, dtype)
    got = _reconstruct("triton", q_ref, lo_ref, scale_ref, None, None, None, bits, n, dtype)
    assert got.dtype == ref.dtype == dtype and got.shape == (b, n)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    err = (ref.double() - x.double()).abs()
    assert (err <= scale_ref.double()[:, None] * (1 + 1e-5) + torch.finfo(dtype).eps * x.double().abs()).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_base_nan_rows_and_float64(impl: str) -> None:
    """A non-finite row of X dequantizes to NaN (others stay finite); float64 X keeps float64 on the reference."""
    x = _inputs(6, 30, 2, torch.float32, seed=4)[0]
    x[2, 5], x[4, 0] = math.nan, math.inf
    q, lo, scale = _quantize(impl, x, None, None, None, 2, 0, 8)
    deq = lowbit.decode(q, lo, scale, 30, 8, torch.float32)
    assert deq[[2, 4]].isnan().all() and torch.isfinite(deq[[0, 1, 3, 5]]).all()
    x64 = _inputs(9, 10, 2, torch.float64, seed=8)[0]
    q, lo, scale = _quantize("reference", x64, None, None, None, 1, 0, 8)
    deq = lowbit.decode(q, lo, scale, 10, 8, torch.float64)
    assert lo.dtype == deq.dtype == torch.float64
    assert ((deq - x64).abs() <= scale[:, None] * (1 + 1e-12)).all()


def test_base_must_be_all_or_nothing() -> None:
    x, c, f, alpha = _inputs(3, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="all three or none"):
        _quantize("reference", x, c, None, alpha, 0, 0, 4)
