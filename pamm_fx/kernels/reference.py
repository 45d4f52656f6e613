"""Plain-torch PAMM kernels: the CPU path and the reference every other kernel must match.

``assign`` works in row chunks so that no b x k similarity matrix and no b x n
float32 copy of X ever exists in full (the whole point is to save memory);
``contract`` reads each dY once through a sparse product.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "GEN_CHUNK",
    "ROW_CHUNK",
    "accumulation_dtype",
    "assign",
    "compute_dtype",
    "contract",
    "poison_non_finite",
]

#: Rows of X per similarity block. With GEN_CHUNK this bounds the transient
#: similarity block to ROW_CHUNK * GEN_CHUNK float32 values (8 MiB).
ROW_CHUNK = 2048
#: Generators per similarity block.
GEN_CHUNK = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the assignment's similarities are computed: float64 for float64 X, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def poison_non_finite(alpha: Tensor, finite: Tensor) -> Tensor:
    """alpha = NaN for rows whose similarity to some generator is not finite.

    Such a row holds a NaN/Inf, or a generator does (and a generator is a row of X): plain's
    dW = dY^T X is then not finite either, so the row must carry the NaN into B~ and dW (a
    ``top > best`` scan would otherwise skip it and report a finite gradient to a NaN check or a
    GradScaler). Only a finite row whose dot product overflows float32 is poisoned needlessly.
    """
    return torch.where(finite, alpha, torch.full_like(alpha, math.nan)).to(torch.float32)


def assign(x: Tensor, c: Tensor, eps: float = math.inf) -> tuple[Tensor, Tensor]:
    """Nearest generator (by absolute cosine) and projection scale for every row.

    x: (b, n), c: (k, n), any floating dtype; accumulation is float32 (float64 for float64 X).
    Returns f (b,) int32 and alpha (b,) float32 with X~_i = alpha_i * c[f_i]. A row whose
    similarity to any generator is not finite gets alpha = NaN (:func:`poison_non_finite`),
    whatever eps says.
    Ties in the computed scores go to the smallest generator index (the Triton kernel
    promises the same on its own float32 scores, which may round exact ties apart). Zero-norm generators never win over
    a non-zero one and give alpha = 0; all-zero rows get f = 0, alpha = 0.
    With a finite ``eps``, rows with ||X_i - X~_i|| > eps * ||X_i|| get alpha = 0
    and the kept rows are rescaled by b / (b - dropped).
    """
    b, k = x.shape[0], c.shape[0]
    f = torch.zeros(b, dtype=torch.int32, device=x.device)
    alpha = torch.zeros(b, dtype=torch.float32, device=x.device)
    if b == 0 or k == 0:
        return f, alpha
    work = compute_dtype(x.dtype)
    cf = c.to(work)
    norms = torch.linalg.vector_norm(cf, dim=1)
    inv_norm = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    cn = cf * inv_norm[:, None]
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    for r0 in range(0, b, ROW_CHUNK):
        xc = x[r0 : r0 + ROW_CHUNK].to(work)
        best = torch.full((xc.shape[0],), -1.0, dtype=work, device=x.device)
        arg = torch.zeros(xc.shape[0], dtype=torch.int64, device=x.device)
        signed = torch.zeros(xc.shape[0], dtype=work, device=x.device)
        finite = torch.ones(xc.shape[0], dtype=torch.bool, device=x.device)
        for j0 in range(0, k, GEN_CHUNK):
            sim = xc @ cn[j0 : j0 + GEN_CHUNK].T
            finite &= torch.isfinite(sim).all(dim=1)
            top, top_idx = sim.abs().max(dim=1)
            better = top > best
            best = torch.where(better, top, best)
            arg = torch.where(better, top_idx + j0, arg)
            signed = torch.where(better, sim.gather(1, top_idx[:, None]).squeeze(1), signed)
        a = signed * inv_norm[arg]
        if math.isfinite(eps):
            row_sq = (xc * xc).sum(dim=1)
            err_sq = (row_sq - signed * signed).clamp_min(0)
            keep = err_sq <= (eps * eps) * row_sq
            a = torch.where(keep, a, torch.zeros_like(a))
            dropped += (~keep).sum()
        f[r0 : r0 + ROW_CHUNK] = arg.to(torch.int32)
        alpha[r0 : r0 + ROW_CHUNK] = poison_non_finite(a, finite)
    if math.isfinite(eps):  # beta = b / (b - dropped), on the device: no host synchronisation
        beta = torch.where((dropped > 0) & (dropped < b), b / (b - dropped).double(), 1.0)
        alpha *= beta.float()
    return f, alpha


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


def contract(grads: list[Tensor], f: Tensor, alpha: Tensor, k: int) -> Tensor:
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
