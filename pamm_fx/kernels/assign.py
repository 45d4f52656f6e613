"""The compression's assignment: nearest generator (by absolute cosine) and projection scale per row.

Three implementations of one contract, with the shared math in :mod:`~pamm_fx.kernels.assign_rule`:

* :func:`reference`: plain torch in row chunks, so that no b x k similarity matrix and no b x n
  float32 copy of X ever exists in full (the whole point is to save memory); the CPU path of the
  eager op and the reference every other implementation must match.
* :func:`aten`: whole-tensor aten ops for Inductor to fuse (measured faster than the chunked
  kernel on CPU once compiled).
* :mod:`~pamm_fx.kernels.assign_triton`: the Triton kernel (CUDA).

:data:`KERNELS` declares them; :class:`pamm_fx.kernels.device.Kernels` chooses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pamm_fx.kernels import assign_rule, device
from pamm_fx.kernels.device import Kernels, work_dtype

__all__ = ["GEN_CHUNK", "KERNELS", "aten", "reference"]

#: Generators per similarity block: with :data:`pamm_fx.kernels.device.ROW_CHUNK` rows of X this bounds
#: the transient similarity block to ROW_CHUNK * GEN_CHUNK float32 values (8 MiB).
GEN_CHUNK = 1024


def reference(x: Tensor, c: Tensor, eps: float = math.inf) -> tuple[Tensor, Tensor]:
    """Nearest generator (by absolute cosine) and projection scale for every row.

    x: (b, n), c: (k, n), any floating dtype; accumulation is float32 (float64 for float64 X).
    Returns f (b,) int32 and alpha (b,) float32 with X~_i = alpha_i * c[f_i].
    Ties in the computed scores go to the smallest generator index (the Triton kernel
    promises the same on its own float32 scores, which may round exact ties apart).
    Zero-norm generators, non-finite rows and the eps rule: :mod:`~pamm_fx.kernels.assign_rule`.
    """
    b, k = x.shape[0], c.shape[0]
    f = torch.zeros(b, dtype=torch.int32, device=x.device)
    alpha = torch.zeros(b, dtype=torch.float32, device=x.device)
    if b == 0 or k == 0:
        return f, alpha
    work = work_dtype(x.dtype)
    chunk = device.ROW_CHUNK
    inv_norm = assign_rule.inverse_norms(c, work)
    cn = c.to(work) * inv_norm[:, None]
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    for r0 in range(0, b, chunk):
        xc = x[r0 : r0 + chunk].to(work)
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
            kept = assign_rule.keep((xc * xc).sum(dim=1), signed, eps)
            a = torch.where(kept, a, torch.zeros_like(a))
            dropped += (~kept).sum()
        f[r0 : r0 + chunk] = arg.to(torch.int32)
        alpha[r0 : r0 + chunk] = assign_rule.poison_non_finite(a, finite)
    if math.isfinite(eps):
        alpha = assign_rule.rescale(alpha, dropped, b)
    return f, alpha


def aten(rows: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`reference` in whole-tensor aten ops, for Inductor to fuse.

    The b x k similarity exists transiently (Inductor fuses |.|, the argmax and the gather
    into one pass over it); the chunked eager kernel avoids it but measured slower on CPU.
    """
    work = work_dtype(rows.dtype)
    inv = assign_rule.inverse_norms(c, work)
    xf = rows.to(work)
    sim = xf @ (c.to(work) * inv[:, None]).t()
    arg = sim.abs().argmax(dim=1)
    signed = sim.gather(1, arg[:, None]).squeeze(1)
    alpha = signed * inv[arg]
    if math.isfinite(eps):
        kept = assign_rule.keep((xf * xf).sum(dim=1), signed, eps)
        alpha = assign_rule.rescale(torch.where(kept, alpha, torch.zeros_like(alpha)), (~kept).sum(), rows.shape[0])
    return arg.to(torch.int32), assign_rule.poison_non_finite(alpha, torch.isfinite(sim).all(dim=1))


def _triton() -> Callable[..., tuple[Tensor, Tensor]]:
    from pamm_fx.kernels import assign_triton

    return assign_triton.assign


#: The assignment's implementations: ``(rows, c, eps) -> (f, alpha)``, decided by X's device and dtype.
KERNELS = Kernels(reference, aten, _triton, lambda x, c, eps: (x, x.dtype))
