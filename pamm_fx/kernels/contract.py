"""The backward contraction B~ = P^T [dY_1 | dY_2 | ...]: the reference and the implementations.

:func:`reference` (plain torch, a sparse product that reads each dY once) is the CPU path and what the
Triton kernels (:mod:`~pamm_fx.kernels.contract_triton`) must match; :data:`KERNELS` declares both. There
is no aten form: on CPU the backward keeps ``pamm::contract`` opaque (a sparse product Inductor would not
improve), on CUDA it traces the Triton launcher itself (:func:`pamm_fx.ops.contract.weight_contraction`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from pamm_fx.kernels import device
from pamm_fx.kernels.device import Kernels

__all__ = ["KERNELS", "accumulation_dtype", "reference"]


def _csr_p_t(f: Tensor, alpha: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """P^T (k x b) as CSR: rows = generators, columns = tokens sorted by generator.

    Row pointers come from a search in the sorted f rather than ``bincount``, which reads
    max(f) on the host (a synchronisation on CUDA).
    """
    sorted_f, order = torch.sort(f, stable=True)
    crow = torch.searchsorted(sorted_f, torch.arange(k + 1, dtype=sorted_f.dtype, device=f.device))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, order, alpha[order].to(dtype), (k, f.shape[0]), check_invariants=False)


def accumulation_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """B~'s dtype: float64 when any dY is float64 (float64 models get float64-exact weight gradients at
    ratio 1), else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def reference(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ = P^T [dY_1 | dY_2 | ...], with P^T (k x b) the one-hot-times-alpha matrix, stored sparse.

    grads: per-projection output gradients, each (..., m_j) with b rows in all.
    Returns B~ (k, sum m_j) in :func:`accumulation_dtype` (float32, or float64 for float64 dY). P^T is
    built as a CSR matrix (rows = generators, columns = tokens sorted by generator), so each dY_j is
    read once by a sparse x dense product: no b x M concatenation, no scaled copy of dY, no atomics.
    Every output row is summed by one thread in a fixed order: bitwise deterministic. Stored zeros
    (alpha = 0 rows) are multiplied, not skipped, so a NaN/Inf in any dY row reaches B~ as it reaches
    plain's dY^T X. A dY in the accumulation dtype is read as it is; other dtypes are upcast
    :data:`~pamm_fx.kernels.device.ROW_CHUNK` rows at a time (one CSR block per row chunk), so no full
    upcast copy of a dY exists.
    """
    flat = [g.reshape(-1, g.shape[-1]) for g in grads]
    on = f.device
    b = f.shape[0]
    acc = accumulation_dtype([g.dtype for g in flat])
    if k == 0 or b == 0:
        return torch.zeros(k, sum(g.shape[1] for g in flat), dtype=acc, device=on)
    if all(g.dtype == acc for g in flat):
        p_t = _csr_p_t(f, alpha, k, acc)
        return torch.cat([p_t @ g for g in flat], dim=1)
    out = torch.zeros(k, sum(g.shape[1] for g in flat), dtype=acc, device=on)
    chunk = device.ROW_CHUNK
    for r0 in range(0, b, chunk):
        p_t = _csr_p_t(f[r0 : r0 + chunk], alpha[r0 : r0 + chunk], k, acc)
        out += torch.cat([p_t @ g[r0 : r0 + chunk].to(acc) for g in flat], dim=1)
    return out


def _triton() -> Callable[..., Tensor]:
    from pamm_fx.kernels import contract_triton

    return contract_triton.contract


def _decides(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> tuple[Tensor, torch.dtype]:
    """Triton only when every dY may go there: f's device and the widest of the dY dtypes (float64 wins)."""
    dtypes = [g.dtype for g in grads]
    return f, next((d for d in dtypes if not device.triton_dtype(d)), dtypes[0] if dtypes else f.dtype)


#: The contraction's implementations: ``(grads, f, alpha, k) -> B~``. No aten form (see the module docstring).
KERNELS = Kernels(reference, None, _triton, _decides)
