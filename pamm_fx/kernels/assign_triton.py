"""Triton kernel for the compression step: nearest generator and projection scale per row.

One program owns BLOCK_B rows of X and walks the k generators in BLOCK_K tiles,
keeping a running (best score, index, dot) per row, so no b x k similarity matrix
exists anywhere. Dot products accumulate in float32. Semantics are those of
:func:`pamm_fx.kernels.assign.reference` and the rule of :mod:`pamm_fx.kernels.assign_rule`
(zero-norm generators score 0, all-zero rows get f = 0 and alpha = 0, the eps/beta rule,
alpha = NaN for a row with a non-finite similarity: the norms and beta come from there, the
keep test and the poisoning are that module's ``keep`` and ``poison_non_finite`` written
in-kernel). Ties: f maximises the *computed* float32 score, and among bitwise-equal computed
scores it is the smallest index (a later tile wins only when strictly greater). Scores that
are equal in exact arithmetic, e.g.
duplicate generators in different tiles, may round apart because ``tl.dot``'s summation
order belongs to the backend, so either copy may win; both give the same X~.
When k fits one tile (k <= BLOCK_K = 128) X is read exactly once, also with a
finite eps (the row norms are summed during the first tile's pass). Pointer
offsets are int64, so tensors past 2^31 elements (or a transposed X whose column
stride is large) index correctly.

Precision: float32 inputs use TF32 tensor cores only when torch allows it for
matmuls (``torch.backends.cuda.matmul.allow_tf32``), else ``input_precision="ieee"``,
which matches the reference; bf16/fp16 inputs go to the tensor cores as they are
with a float32 accumulator (under the interpreter bf16 tiles are upcast to float32
first, which gives the same exact products). float64 never comes here
(:func:`pamm_fx.kernels.device.triton_dtype`). The score is ``|<X_i, C_j>| * (1 / ||C_j||)``
rather than the reference's ``|<X_i, C_j / ||C_j||>|``, so scores agree to float32
rounding, not bitwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from pamm_fx.kernels import assign_rule
from pamm_fx.kernels.triton_util import INTERPRETED, check_dtype, dot_precision

__all__ = ["assign"]


@triton.jit
def _assign_kernel(
    x_ptr,
    c_ptr,
    inv_ptr,
    f_ptr,
    alpha_ptr,
    dropped_ptr,
    b,
    n,
    k,
    stride_xb,
    stride_xn,
    stride_cb,
    stride_cn,
    eps_sq,
    USE_EPS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < b
    best = tl.full((BLOCK_B,), -1.0, tl.float32)
    arg = tl.zeros((BLOCK_B,), tl.int32)
    best_dot = tl.zeros((BLOCK_B,), tl.float32)
    row_sq = tl.zeros((BLOCK_B,), tl.float32)
    bad = tl.zeros((BLOCK_B,), tl.int32)  # a similarity is NaN/Inf: the row or a generator is not finite
    for j0 in range(0, k, BLOCK_K):
        gens = j0 + tl.arange(0, BLOCK_K)
        gen_ok = gens < k
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
        for n0 in range(0, n, BLOCK_N):
            cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            col_ok = cols < n
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xn,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            ct = tl.load(
                c_ptr + gens[None, :].to(tl.int64) * stride_cb + cols[:, None] * stride_cn,
                mask=col_ok[:, None] & gen_ok[None, :],
                other=0.0,
            )
            if USE_EPS:
                if j0 == 0:  # the row norms ride on the first tile's pass: X is read once per tile
                    xf = xt.to(tl.float32)
                    row_sq += tl.sum(xf * xf, axis=1)
            if UPCAST:
                acc = tl.dot(xt.to(tl.float32), ct.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(xt, ct, acc)
        inv = tl.load(inv_ptr + gens, mask=gen_ok, other=0.0)
        bad = tl.maximum(bad, tl.max(tl.where(gen_ok[None, :] & (acc * 0.0 != 0.0), 1, 0), axis=1))
        score = tl.where(gen_ok[None, :], tl.abs(acc) * inv[None, :], -1.0)
        top = tl.max(score, axis=1)
        top_idx = tl.min(tl.where(score == top[:, None], gens[None, :], k), axis=1)
        top_dot = tl.sum(tl.where(gens[None, :] == top_idx[:, None], acc, 0.0), axis=1)
        better = top > best
        best = tl.where(better, top, best)
        arg = tl.where(better, top_idx, arg)
        best_dot = tl.where(better, top_dot, best_dot)
    inv_arg = tl.load(inv_ptr + arg, mask=row_ok, other=0.0)
    sim = best_dot * inv_arg
    alpha = sim * inv_arg
    if USE_EPS:
        keep = tl.maximum(row_sq - sim * sim, 0.0) <= eps_sq * row_sq  # assign_rule.keep
        alpha = tl.where(keep, alpha, 0.0)
        tl.store(dropped_ptr + pid, tl.sum(tl.where(row_ok & (~keep), 1, 0), axis=0))
    alpha = tl.where(bad > 0, float("nan"), alpha)  # assign_rule.poison_non_finite
    tl.store(f_ptr + rows, arg, mask=row_ok)
    tl.store(alpha_ptr + rows, alpha, mask=row_ok)


def _blocks(k: int | torch.SymInt, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_K, BLOCK_N, num_warps): the register tile BLOCK_B x BLOCK_K stays <= 16K fp32.

    Eight warps and 16-column float32 steps keep every contiguous launch within 255 registers
    without spilling on sm_80 and sm_90 (four warps for small tiles and 32 float32 columns spilled
    8-52 bytes in 8 of 64 (configuration, target) pairs: ``benchmarks/kernel_registers.py``,
    checked by ``tests/test_kernel_compile.py``).
    A symbolic k (dynamic shapes) takes the widest tile instead of guarding on its size.
    """
    block_k = 128 if isinstance(k, torch.SymInt) else min(128, max(16, triton.next_power_of_2(k)))
    block_b = 128 if block_k <= 64 else 64
    return block_b, block_k, 16 if dtype == torch.float32 else 64, 8


def assign(x: Tensor, c: Tensor, eps: float = math.inf) -> tuple[Tensor, Tensor]:
    """Triton twin of :func:`pamm_fx.kernels.assign.reference` (same arguments, same results up to
    rounding), launched at once; the body reads no tensor value on the host."""
    check_dtype(x.dtype, "assignment")
    b, n = x.shape
    k = c.shape[0]
    f = torch.zeros(b, dtype=torch.int32, device=x.device)
    alpha = torch.zeros(b, dtype=torch.float32, device=x.device)
    if b == 0 or k == 0:
        return f, alpha
    inv_norm = assign_rule.inverse_norms(c)
    c = c.to(x.dtype)
    block_b, block_k, block_n, num_warps = _blocks(k, x.dtype)
    programs = triton.cdiv(b, block_b)
    use_eps = math.isfinite(eps)
    dropped = torch.zeros(programs if use_eps else 1, dtype=torch.int32, device=x.device)
    _assign_kernel[(programs,)](
        x,
        c,
        inv_norm,
        f,
        alpha,
        dropped,
        b,
        n,
        k,
        x.stride(0),
        x.stride(1),
        c.stride(0),
        c.stride(1),
        eps * eps if use_eps else 0.0,
        USE_EPS=use_eps,
        UPCAST=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and INTERPRETED),
        PRECISION=dot_precision() if x.dtype == torch.float32 else "ieee",
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    if use_eps:
        alpha = assign_rule.rescale(alpha, dropped.sum(), b)
    return f, alpha
