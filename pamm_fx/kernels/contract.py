"""The backward contraction B~ = P^T [dY_1 | dY_2 | ...]: the reference and the dispatcher.

:func:`reference` (plain torch, a sparse product that reads each dY once) is the CPU path and
what the Triton kernels (:mod:`~pamm_fx.kernels.contract_triton`) must match. :func:`contract`
(eager) and :func:`triton_traceable` (the Triton op torch.compile traces into, or None where
the reference serves) are the only places that choose Triton or torch for this primitive.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from pamm_fx.kernels.device import use_triton

__all__ = ["ROW_CHUNK", "accumulation_dtype", "contract", "reference", "triton_traceable"]

#: Rows of dY upcast at a time (one CSR block per chunk) when dY is not in the accumulation dtype.
ROW_CHUNK = 2048


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
    ROW_CHUNK rows at a time (one CSR block per row chunk), so no full upcast copy of a dY exists.
    """
    flat = [g.reshape(-1, g.shape[-1]) for g in grads]
    device = f.device
    b = f.shape[0]
    acc = accumulation_dtype([g.dtype for g in flat])
    if k == 0 or b == 0:
        return torch.zeros(k, sum(g.shape[1] for g in flat), dtype=acc, device=device)
    if all(g.dtype == acc for g in flat):
        p_t = _csr_p_t(f, alpha, k, acc)
        return torch.cat([p_t @ g for g in flat], dim=1)
    out = torch.zeros(k, sum(g.shape[1] for g in flat), dtype=acc, device=device)
    for r0 in range(0, b, ROW_CHUNK):
        p_t = _csr_p_t(f[r0 : r0 + ROW_CHUNK], alpha[r0 : r0 + ROW_CHUNK], k, acc)
        out += torch.cat([p_t @ g[r0 : r0 + ROW_CHUNK].to(acc) for g in flat], dim=1)
    return out


def contract(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
    """B~ (k, sum m_j), eagerly: the Triton kernels on CUDA, else :func:`reference`."""
    if all(use_triton(f, g.dtype) for g in grads):
        from pamm_fx.kernels import contract_triton

        return contract_triton.contract(grads, f, alpha, k)
    return reference(grads, f, alpha, k)


def triton_traceable(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor | None:
    """B~ through the Triton op that AOTAutograd decomposes (so Inductor sees the kernels), or None
    where the tensors go to the reference (the caller then emits its opaque custom op)."""
    if not all(use_triton(f, g.dtype) for g in grads):
        return None
    from pamm_fx.kernels import contract_triton

    return contract_triton.contract_triton(grads, f, alpha, k)
