"""Benchmark the PAMM kernels: CPU chunk sizes of the plain-torch path, GPU bandwidth of the Triton kernels.

CPU: ``assign_kernels.reference`` for every (ROW_CHUNK, GEN_CHUNK) candidate at b = 8192
tokens, so the defaults in ``pamm_fx/kernels/assign.py`` are the fastest measured
(GEN_CHUNK only matters once k > GEN_CHUNK, hence the large-k row), and
``contract_kernels.reference`` (a CSR sparse x dense product) against the alternatives it
replaced and against the exact weight-gradient GEMM it stands in for.
GPU (only when CUDA is available): achieved bandwidth of assign (X read once), the
whole ``pamm::compress`` op (sampling, gather of C, assign) and contract (dY read
once) against an HBM roofline; bytes counted are the minimum traffic (X or dY once,
plus C, f, alpha, B~).

    /work/venv/bin/python benchmarks/bench_kernels.py [--cpu-only | --gpu-only] [--runs N]
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from functools import partial

import torch
from _common import median_s

import pamm_fx.ops  # noqa: F401  (registers the pamm:: ops)
from pamm_fx.kernels import assign as assign_kernels
from pamm_fx.kernels import contract as contract_kernels
from pamm_fx.kernels import device

CPU_SHAPES = [(8192, 512, 128), (8192, 512, 16), (8192, 1024, 128), (8192, 1024, 16), (8192, 512, 2048)]
ROW_CHUNKS = [512, 1024, 2048, 4096, 8192]
GEN_CHUNKS = [256, 1024, 4096]


def bench_cpu(runs: int) -> None:
    """One table per primitive: median ms per (shape, chunk) with the current default marked."""
    defaults = (device.ROW_CHUNK, assign_kernels.GEN_CHUNK)
    print(f"## CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {runs}")
    print("| op | b | n | k | ROW_CHUNK | GEN_CHUNK | ms |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    try:
        for b, n, k in CPU_SHAPES:
            x = torch.randn(b, n, generator=gen)
            c = x[torch.randperm(b, generator=gen)[:k].sort().values]
            gens = GEN_CHUNKS if k > min(GEN_CHUNKS) else [defaults[1]]
            for row in ROW_CHUNKS:
                for gc in gens:
                    device.ROW_CHUNK, assign_kernels.GEN_CHUNK = row, gc
                    ms = 1e3 * median_s(partial(assign_kernels.reference, x, c), runs)
                    mark = " (default)" if (row, gc) == defaults else ""
                    print(f"| assign | {b} | {n} | {k} | {row} | {gc}{mark} | {ms:.1f} |")
            if k > max(GEN_CHUNKS):
                continue
            dys = [torch.randn(b, n, generator=gen) for _ in range(3)]
            f, alpha = assign_kernels.reference(x, c)
            for name, fn in _contract_alternatives(dys, f, alpha, k, x).items():
                ms = 1e3 * median_s(fn, runs)
                print(f"| contract 3x{n}: {name} | {b} | {n} | {k} | - | - | {ms:.1f} |")
    finally:
        device.ROW_CHUNK, assign_kernels.GEN_CHUNK = defaults


def _contract_alternatives(
    dys: list[torch.Tensor], f: torch.Tensor, alpha: torch.Tensor, k: int, x: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """The CSR product in use, the alternatives it replaced, and the exact weight gradient for scale."""

    def index_add_chunked(row: int = 2048) -> torch.Tensor:
        out = torch.zeros(k, sum(d.shape[1] for d in dys))
        for r0 in range(0, f.shape[0], row):
            block = torch.cat([d[r0 : r0 + row] for d in dys], 1) * alpha[r0 : r0 + row, None]
            out.index_add_(0, f[r0 : r0 + row].long(), block)
        return out

    def one_hot_gemm() -> torch.Tensor:
        p_t = torch.zeros(k, f.shape[0]).index_put_((f.long(), torch.arange(f.shape[0])), alpha)
        return torch.cat([p_t @ d for d in dys], 1)

    return {
        "CSR sparse x dense (default)": partial(contract_kernels.reference, dys, f, alpha, k),
        "chunked index_add": index_add_chunked,
        "one-hot dense GEMM": one_hot_gemm,
        "exact dW = dY^T X (what PAMM replaces)": lambda: [d.T @ x for d in dys],
    }


def _cuda_median_s(fn: Callable[[], object], runs: int) -> float:
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def copy_bandwidth(runs: int = 20, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth of this GPU in bytes/s (read + write counted), measured now."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _cuda_median_s(lambda: dst.copy_(src), runs)


def bench_gpu(runs: int) -> list[dict[str, object]]:
    """Bandwidth of assign/contract (Triton) and the plain-torch path on CUDA, LLaMA-1B-like shapes, bf16."""
    b, n = 16384, 2048
    m3 = 3 * n
    roofline = copy_bandwidth()
    print(f"\n## GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, median of {runs}")
    print(f"roofline: device-to-device copy {roofline / 1e12:.2f} TB/s (measured now); b={b}, n={n}, dY width 3n={m3}")
    print("| op | r | k | impl | us | GB moved | TB/s | % roofline |")
    print("|---|---|---|---|---|---|---|---|")
    x = torch.randn(b, n, device="cuda", dtype=torch.bfloat16)
    dys = [torch.randn(b, n, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    seed = torch.tensor(0, device="cuda")
    rows: list[dict[str, object]] = []
    for den in (512, 64):
        k = b // den
        c = x[torch.randperm(b, device="cuda")[:k].sort().values]
        f, alpha = assign_kernels.KERNELS.eager(x, c, math.inf)
        compress = partial(torch.ops.pamm.compress, x, seed, 1, den, 1, 1, math.inf, 0)
        cases = [
            ("assign", "triton", partial(assign_kernels.KERNELS.eager, x, c, math.inf), 2 * (b * n + k * n) + 8 * b),
            ("assign", "torch", partial(assign_kernels.reference, x, c), 2 * (b * n + k * n) + 8 * b),
            ("compress op", "triton", compress, 2 * (b * n + 2 * k * n) + 8 * b),
            ("contract", "triton", partial(contract_kernels.KERNELS.eager, dys, f, alpha, k),
             2 * b * m3 + 8 * b + 4 * k * m3),
            ("contract", "torch", partial(contract_kernels.reference, dys, f, alpha, k),
             2 * b * m3 + 8 * b + 4 * k * m3),
        ]
        for op, impl, fn, nbytes in cases:
            s = _cuda_median_s(fn, runs)
            bw = nbytes / s
            print(
                f"| {op} | 1/{den} | {k} | {impl} | {s * 1e6:.0f} | {nbytes / 1e9:.3f} | {bw / 1e12:.2f} "
                f"| {100 * bw / roofline:.0f}% |"
            )
            rows.append({"op": op, "ratio": f"1/{den}", "k": k, "impl": impl, "us": s * 1e6,
                         "tb_s": bw / 1e12, "pct_copy": 100 * bw / roofline})
        twice = [contract_kernels.KERNELS.eager(dys, f, alpha, k) for _ in range(2)]
        same = torch.equal(*twice)
        print(f"contract bitwise deterministic over 2 runs (k={k}): {same}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true")
    group.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args()
    if not args.gpu_only:
        bench_cpu(args.runs)
    if not args.cpu_only:
        if torch.cuda.is_available():
            bench_gpu(max(args.runs, 20))
        else:
            print("\n(no CUDA device: GPU section skipped)")


if __name__ == "__main__":
    main()
