"""dW = dY^T X^ straight from the low-bit codes: Triton kernel vs chunked reference vs the explicit
``dY^T @ decode(...)``, with and without the PAMM base.

Set-up as in tests/test_lowbit_kernels.py: without a GPU the kernel runs on CPU tensors under
triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel module is imported); with a GPU
the same tests run the compiled kernel on CUDA tensors. Sizes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import kernel_device  # noqa: E402  (before pamm_fx: sets TRITON_INTERPRET)

from pamm_fx.kernels import dequant_matmul, dequant_matmul_triton, device, lowbit, quantize  # noqa: E402

_INTERPRETED, DEVICE = kernel_device(dequant_matmul_triton._weight_grad_kernel)
#: Worst relative error of rounding X^ to the operand dtype, per element: the interpreter truncates
#: float32 -> bf16/fp16 (the GPU rounds to nearest, half of this); float32 is only summation order.
ROUNDING = {torch.float32: 2.0**-18, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _quantize(x: torch.Tensor, c: torch.Tensor | None, f: torch.Tensor | None, alpha: torch.Tensor | None, seed: int,
              salt: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize.reference(x, c, f, alpha, lowbit.noise_key(torch.tensor(seed), salt), bits)


def _ref(dy: torch.Tensor, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, n: int,
         c: torch.Tensor | None = None, f: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequant_matmul.reference(dy, q, lo, scale, c, f, alpha, bits, n, out_dtype)


def _aten(dy: torch.Tensor, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, n: int,
          c: torch.Tensor | None = None, f: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequant_matmul.aten(dy, q, lo, scale, c, f, alpha, bits, n, out_dtype)


def _case(b: int, n: int, m: int, dtype: torch.dtype, bits: int, base: bool,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """dY and (q, lo, scale) of X (or of PAMM's residual, with the base's c, f, alpha in the dict)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, generator=gen).to(dtype)
    dy = torch.randn(b, m, generator=gen).to(dtype)
    kw: dict = {}
    if base:
        c = x[:3].clone() if b >= 3 else torch.randn(3, n, generator=gen).to(dtype)
        kw = dict(c=c, f=torch.randint(0, 3, (b,), generator=gen, dtype=torch.int32),
                  alpha=torch.randn(b, generator=gen))
    q, lo, scale = _quantize(x, kw.get("c"), kw.get("f"), kw.get("alpha"), seed, 1, bits)
    return dy, q, lo, scale, kw


def _x_hat(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, n: int, dtype: torch.dtype,
           kw: dict) -> torch.Tensor:
    base = lowbit.base_rows(kw.get("c"), kw.get("f"), kw.get("alpha"), lo.dtype)
    return lowbit.decode(q, lo, scale, n, bits, dtype, base)


def _triton(dy: torch.Tensor, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, n: int, kw: dict,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    on = {k: v.to(DEVICE) for k, v in kw.items()}
    return dequant_matmul_triton.weight_grad(dy.to(DEVICE), q.to(DEVICE), lo.to(DEVICE), scale.to(DEVICE), on.get("c"),
                                             on.get("f"), on.get("alpha"), bits, n, out_dtype).cpu()


def _bound(dy: torch.Tensor, x_hat: torch.Tensor, rel: float) -> torch.Tensor:
    """Elementwise error bound: ``rel`` of |dY|^T |X^| (what rounding each product's X^ factor can move)."""
    return rel * dy.double().abs().t() @ x_hat.double().abs() + 1e-6


@pytest.mark.parametrize("base", [True, False], ids=["pamm_sr", "sr"])
@pytest.mark.parametrize("bits", lowbit.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_reference_and_explicit_agree(dtype: torch.dtype, bits: int, base: bool) -> None:
    """b = 45 is not a multiple of BLOCK_K, n = 37 (odd) not of the packing or BLOCK_N, m = 20 not of BLOCK_M."""
    b, n, m = 45, 37, 20
    dy, q, lo, scale, kw = _case(b, n, m, dtype, bits, base)
    x_hat = _x_hat(q, lo, scale, bits, n, dtype, kw)
    exact = dy.double().t() @ x_hat.double()  # the products of the operands the GEMM sees, summed exactly
    ref = _ref(dy, q, lo, scale, bits, n, **kw, out_dtype=torch.float32)
    tri = _triton(dy, q, lo, scale, bits, n, kw, torch.float32)
    explicit = (dy.t() @ x_hat).float()
    assert ref.shape == tri.shape == (m, n) and ref.dtype == tri.dtype == torch.float32
    assert ((ref.double() - exact).abs() <= _bound(dy, x_hat, 2.0**-18)).all()  # float32 summation only
    assert ((tri.double() - exact).abs() <= _bound(dy, x_hat, ROUNDING[dtype])).all()
    torch.testing.assert_close(explicit, ref, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)))
    # The whole-tensor aten form is the explicit path itself.
    torch.testing.assert_close(_aten(dy, q, lo, scale, bits, n, **kw, out_dtype=torch.float32),
                               explicit, rtol=0, atol=0)


@pytest.mark.parametrize("base", [True, False], ids=["pamm_sr", "sr"])
def test_reference_float64_and_chunks(base: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 stays float64 end to end; ROW_CHUNK rows at a time sum to the whole product."""
    b, n, m = 29, 13, 6
    dy, q, lo, scale, kw = _case(b, n, m, torch.float64, 4, base)
    assert lo.dtype == torch.float64
    explicit = dy.t() @ _x_hat(q, lo, scale, 4, n, torch.float64, kw)
    monkeypatch.setattr(device, "ROW_CHUNK", 8)
    out = _ref(dy, q, lo, scale, 4, n, **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, explicit, rtol=1e-12, atol=1e-12)
    # The op's eager body keeps float64 (and every CPU tensor) on the reference.
    eager = dequant_matmul.KERNELS.eager(dy, q, lo, scale, kw.get("c"), kw.get("f"), kw.get("alpha"), 4, n)
    torch.testing.assert_close(eager, out, rtol=0, atol=0)


@pytest.mark.parametrize("split", [False, True])
def test_several_tiles_and_split_rows(split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 x 2 tiles of dW (64 x 64 for IEEE float32); with split, the rows go to 4 slices whose float32
    partials add up."""
    b, n, m = 70, 75, 66
    dy, q, lo, scale, kw = _case(b, n, m, torch.float32, 2, True)
    assert dequant_matmul_triton._blocks(m, n, torch.float32, "ieee")[:2] == (64, 64)
    if split:
        monkeypatch.setattr(dequant_matmul_triton, "MIN_SPLIT_ROWS", 16)
        assert dequant_matmul_triton._split(b, 4) == 4
    ref = _ref(dy, q, lo, scale, 2, n, **kw)
    torch.testing.assert_close(_triton(dy, q, lo, scale, 2, n, kw), ref, rtol=1e-5, atol=1e-5)
    traced = dequant_matmul.KERNELS.traced(dy, q, lo, scale, kw["c"], kw["f"], kw["alpha"], 2, n)
    torch.testing.assert_close(traced, _aten(dy, q, lo, scale, 2, n, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("base", [True, False], ids=["pamm_sr", "sr"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_nan_row_poisons_every_column(impl: str, base: bool) -> None:
    """A non-finite row of X (lo = scale = NaN) makes all of dW NaN, as plain's dY^T X; others stay finite."""
    b, n, m = 21, 11, 5
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, n, generator=gen)
    x[7, 4] = float("inf")
    dy = torch.randn(b, m, generator=gen)
    kw = dict(c=torch.randn(2, n, generator=gen), f=torch.randint(0, 2, (b,), generator=gen, dtype=torch.int32),
              alpha=torch.randn(b, generator=gen)) if base else {}
    q, lo, scale = _quantize(x, kw.get("c"), kw.get("f"), kw.get("alpha"), 0, 1, 4)
    assert lo[7].isnan() and scale[7].isnan()
    fn = _ref if impl == "reference" else \
        lambda *a, **k: _triton(*a, kw=k, out_dtype=None)
    assert fn(dy, q, lo, scale, 4, n, **kw).isnan().all()
    keep = torch.arange(b) != 7
    kw_ok = {k: (v if k == "c" else v[keep]) for k, v in kw.items()}
    assert fn(dy[keep], q[keep], lo[keep], scale[keep], 4, n, **kw_ok).isfinite().all()


@pytest.mark.parametrize(("impl", "b", "n", "m"), [
    *((impl, *shape) for impl in ("reference", "triton") for shape in ((0, 9, 4), (5, 0, 4), (5, 9, 0))),
    *(("aten", *shape) for shape in ((0, 9, 4), (5, 0, 4), (5, 9, 0))),
])
def test_empty_shapes(impl: str, b: int, n: int, m: int) -> None:
    """No rows (or no columns): dW is zeros (m x n), as plain's dY^T X over an empty batch."""
    dy, q, lo, scale, kw = _case(b, n, m, torch.bfloat16, 2, True)
    if impl == "triton":
        out = _triton(dy, q, lo, scale, 2, n, kw, torch.float32)
    else:
        fn = _ref if impl == "reference" else _aten
        out = fn(dy, q, lo, scale, 2, n, **kw, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32 and not out.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_plains_gemm_bit_for_bit_when_x_hat_is_x(dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """pamm_sr at ratio 1 (C = X, f = identity, alpha = 1: R = 0, X^ = X): up to ROW_CHUNK rows, dW in D is
    plain's dY^T X bit for bit; more rows are summed chunk by chunk in float32 (close, not bitwise). At this
    size a float32 sum rounded to bf16/fp16 once is not the 16-bit GEMM's bits on CPU."""
    b, n, m = 1000, 96, 80
    gen = torch.Generator().manual_seed(5)
    x, dy = torch.randn(b, n, generator=gen).to(dtype), torch.randn(b, m, generator=gen).to(dtype)
    kw = dict(c=x, f=torch.arange(b, dtype=torch.int32), alpha=torch.ones(b))
    q, lo, scale = _quantize(x, *kw.values(), 0, 1, 2)
    assert not scale.any()
    plain = dy.t().mm(x)
    assert torch.equal(_ref(dy, q, lo, scale, 2, n, **kw), plain)
    monkeypatch.setattr(device, "ROW_CHUNK", 256)
    chunked = _ref(dy, q, lo, scale, 2, n, **kw)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]  # a rounding of the sum
    torch.testing.assert_close(chunked.float(), plain.float(), rtol=tol, atol=tol * plain.float().abs().max().item())


def test_out_dtype_defaults_to_the_operand_dtype() -> None:
    """dY is cast to C's dtype (the backward's ``g.to(c.dtype)``), and dW comes back in it by default."""
    dy, q, lo, scale, kw = _case(9, 7, 3, torch.bfloat16, 8, True)
    for impl in (_ref, _aten):
        assert impl(dy.float(), q, lo, scale, 8, 7, **kw).dtype == torch.bfloat16
        assert impl(dy, q, lo, scale, 8, 7).dtype == torch.bfloat16
    assert _triton(dy.float(), q, lo, scale, 8, 7, kw).dtype == torch.bfloat16


def test_base_is_all_or_nothing() -> None:
    dy, q, lo, scale, kw = _case(4, 5, 2, torch.float32, 4, True)
    with pytest.raises(ValueError, match="all three or none"):
        _ref(dy, q, lo, scale, 4, 5, c=kw["c"])
    with pytest.raises(ValueError, match="bits"):
        _ref(dy, q, lo, scale, 3, 5)


def test_op_opcheck_on_the_kernels_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """pamm::dequant_weight_grad is one op: on CUDA its eager body launches the kernel (on the CPU, the
    reference), and Inductor keeps it whole where the kernel runs (its decomposition declines)."""
    from pamm_fx.ops.lowbit import _weight_grad_decomposition

    dy, q, lo, scale, kw = (t if not isinstance(t, dict) else {k: v.to(DEVICE) for k, v in t.items()}
                            for t in _case(21, 19, 6, torch.bfloat16, 2, True))
    dy, q, lo, scale = (t.to(DEVICE) for t in (dy, q, lo, scale))
    op = torch.ops.pamm.dequant_weight_grad.default
    torch.library.opcheck(op, (dy, q, lo, scale, kw["c"], kw["f"], kw["alpha"], 2, 19, torch.float32))
    torch.library.opcheck(op, (dy, q, lo, scale, None, None, None, 2, 19, torch.bfloat16))
    args = (dy, q, lo, scale, None, None, None, 2, 19, torch.bfloat16)
    assert (_weight_grad_decomposition(*args) is NotImplemented) == (DEVICE == "cuda")
    monkeypatch.setattr(device, "use_triton", lambda t, dtype: device.triton_dtype(dtype))
    assert _weight_grad_decomposition(*args) is NotImplemented
    out = _triton(dy, q, lo, scale, 2, 19, {k: v for k, v in kw.items()}, torch.float32)
    torch.testing.assert_close(out, op(dy, q, lo, scale, kw["c"], kw["f"], kw["alpha"], 2, 19, torch.float32).cpu(),
                               rtol=1e-2, atol=1e-2)
