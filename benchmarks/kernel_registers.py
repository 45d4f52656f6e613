"""Compile every Triton kernel for real GPU targets on a machine without a GPU; print registers and spills.

The interpreter (``TRITON_INTERPRET=1``, what the CPU test suite runs) accepts kernels that the real
compiler rejects (layouts, dot shapes, register pressure), so this compiles each kernel with
``triton.compile`` for an explicit ``GPUTarget("cuda", 80 | 90, 32)`` down to PTX and cubin, and reads
registers and spills from the wheel's bundled ``ptxas -v``. No GPU or driver is needed.

Configurations are the ones the launchers ship: every tile the assignment's ``_blocks`` picks (small to
large k) for each dtype, with and without eps, each ``tl.dot`` precision; the contraction's fixed tiles;
the low-bit quantize/decode tiles per dtype and bit width, with and without the PAMM base
(``HAS_BASE``: ``estimator="sr"`` quantizes X itself); the weight gradient read from the codes per dtype,
``tl.dot`` precision, bit width and base, at its widest and smallest tiles. Arguments are
specialized as a typical launch is (16-byte aligned pointers, sizes and row strides divisible by 16,
unit column strides folded to the constant 1), which is what the JIT compiles for contiguous tensors.

    python benchmarks/kernel_registers.py            # markdown table
    python benchmarks/kernel_registers.py --json     # one JSON object per configuration (tests read it)

Must run without ``TRITON_INTERPRET`` (``@triton.jit`` reads it at import); the script drops it and
re-executes itself if it is set. ``tests/test_kernel_compile.py`` runs it and fails on any compile error
or spill.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Compute capabilities compiled for (A100, H100).
TARGETS = (80, 90)
#: The kernel modules, by primitive: the one place a rename of a module changes.
ASSIGN_MODULE = "pamm_fx.kernels.assign_triton"
CONTRACT_MODULE = "pamm_fx.kernels.contract_triton"
QUANTIZE_MODULE = "pamm_fx.kernels.quantize_triton"
WEIGHT_GRAD_MODULE = "pamm_fx.kernels.dequant_matmul_triton"
#: Generator counts whose tiles are compiled (``_blocks`` dedupes them): every BLOCK_K it can pick.
K_VALUES = (1, 32, 64, 128, 4096)
#: Row widths n whose low-bit tiles are compiled: one that fits a tile, one that loops over tiles.
LOWBIT_N_VALUES = (512, 8192)
#: dW shapes (m, n) whose weight-gradient tiles are compiled: the widest tile (every bit width and base) and
#: the smallest (4-bit with a base).
WEIGHT_GRAD_SHAPES = ((4096, 4096), (16, 16))
#: torch dtype name -> Triton pointer element type.
ELEMENT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Config:
    """One compilation: a kernel, its specialized signature, constexprs and launch options."""

    kernel: str
    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]
    num_warps: int


#: How the arguments are specialized: "contiguous" as the JIT does for contiguous tensors with sizes that
#: are multiples of 16 (aligned pointers and sizes, unit column strides folded to the constant 1);
#: "strided" with no hint at all (a transposed or offset view, odd sizes).
LAYOUTS = ("contiguous", "strided")


def _sig(args: dict[str, str], unit: tuple[str, ...],
         layout: str) -> tuple[dict[str, str], dict[str, Any], tuple[str, ...]]:
    """(signature, constexprs for the unit strides, names with divisibility 16) of one ``layout``."""
    if layout == "strided":
        return args, {}, ()
    signature = {name: ("constexpr" if name in unit else t) for name, t in args.items()}
    aligned = tuple(name for name, t in args.items() if name not in unit and (t.startswith("*") or t == "i32"))
    return signature, dict.fromkeys(unit, 1), aligned


def assign_configs(layouts: tuple[str, ...] = LAYOUTS) -> Iterator[Config]:
    """``_assign_kernel`` over the tiles ``_blocks`` picks, dtypes, eps and (fp32) dot precisions."""
    import torch

    mod = importlib.import_module(ASSIGN_MODULE)
    for layout in layouts:
        for dtype_name, elem in ELEMENT.items():
            dtype = getattr(torch, dtype_name)
            signature, units, aligned = _sig(
                dict(x_ptr=f"*{elem}", c_ptr=f"*{elem}", inv_ptr="*fp32", f_ptr="*i32", alpha_ptr="*fp32",
                     dropped_ptr="*i32", b="i32", n="i32", k="i32", stride_xb="i32", stride_xn="i32",
                     stride_cb="i32", stride_cn="i32", eps_sq="fp32", USE_EPS="constexpr", UPCAST="constexpr",
                     PRECISION="constexpr", BLOCK_B="constexpr", BLOCK_K="constexpr", BLOCK_N="constexpr"),
                ("stride_xn", "stride_cn"), layout,
            )
            tiles = dict.fromkeys(mod._blocks(k, dtype) for k in K_VALUES)
            precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
            for block_b, block_k, block_n, num_warps in tiles:
                for use_eps in (False, True):
                    for precision in precisions:
                        yield Config(
                            kernel="_assign_kernel",
                            label=f"{layout} {dtype_name} {precision} eps={'yes' if use_eps else 'no'} "
                            f"B{block_b} K{block_k} N{block_n} w{num_warps}",
                            signature=signature,
                            constexprs=units | dict(USE_EPS=use_eps, UPCAST=dtype == torch.float32,
                                                    PRECISION=precision, BLOCK_B=block_b, BLOCK_K=block_k,
                                                    BLOCK_N=block_n),
                            aligned=aligned,
                            num_warps=num_warps,
                        )


def contract_configs(layouts: tuple[str, ...] = LAYOUTS) -> Iterator[Config]:
    """``_partial_kernel`` per dY dtype and ``_reduce_kernel``, at the module's fixed tiles."""
    mod = importlib.import_module(CONTRACT_MODULE)
    for layout in layouts:
        for dtype_name, elem in ELEMENT.items():
            signature, units, aligned = _sig(
                dict(g_ptr=f"*{elem}", order_ptr="*i64", offsets_ptr="*i64", chunk_gen_ptr="*i64",
                     chunk_ptr_ptr="*i64", alpha_ptr="*fp32", part_ptr="*fp32", k="i32", m="i32",
                     stride_gb="i32", stride_gm="i32", stride_part="i32", CHUNK="constexpr",
                     BLOCK_R="constexpr", BLOCK_M="constexpr"),
                ("stride_gm",), layout,
            )
            yield Config(
                kernel="_partial_kernel",
                label=f"{layout} {dtype_name} CHUNK{mod.CHUNK} R{mod.BLOCK_R} M{mod.BLOCK_M} w4",
                signature=signature,
                constexprs=units | dict(CHUNK=mod.CHUNK, BLOCK_R=mod.BLOCK_R, BLOCK_M=mod.BLOCK_M),
                aligned=aligned,
                num_warps=4,
            )
        signature, units, aligned = _sig(
            dict(part_ptr="*fp32", chunk_ptr_ptr="*i64", out_ptr="*fp32", m="i32", stride_part="i32",
                 stride_out="i32", col0="i32", BLOCK_M="constexpr"),
            (), layout,
        )
        yield Config(kernel="_reduce_kernel", label=f"{layout} float32 M{mod.BLOCK_M} w4", signature=signature,
                     constexprs=units | dict(BLOCK_M=mod.BLOCK_M), aligned=aligned, num_warps=4)


def quantize_configs(layouts: tuple[str, ...] = LAYOUTS) -> Iterator[Config]:
    """``_quantize_kernel`` and ``_decode_kernel`` (each with and without a base) per dtype and bit width, at
    the tiles ``_blocks`` picks for a row that fits one tile and for one that loops over tiles."""
    from pamm_fx.kernels.lowbit import BITS

    mod = importlib.import_module(QUANTIZE_MODULE)
    tiles = dict.fromkeys(mod._blocks(n) for n in LOWBIT_N_VALUES)
    for layout in layouts:
        for dtype_name, elem in ELEMENT.items():
            # Without a base the launcher passes X, the key and the key for C, f and alpha (never read).
            q_sigs = {has_base: _sig(
                dict(x_ptr=f"*{elem}", c_ptr=f"*{elem}", f_ptr="*i32" if has_base else "*i64",
                     alpha_ptr="*fp32" if has_base else "*i64",
                     key_ptr="*i64", q_ptr="*u8", lo_ptr="*fp32", scale_ptr="*fp32", b="i32", n="i32", width="i32",
                     stride_xb="i32", stride_xn="i32", stride_cb="i32", stride_cn="i32", stride_qb="i32",
                     BITS="constexpr", HAS_BASE="constexpr", ONE_TILE="constexpr", BLOCK_R="constexpr",
                     BLOCK_N="constexpr"),
                ("stride_xn", "stride_cn"), layout,
            ) for has_base in (True, False)}
            # Without a base the launcher passes the output, q and lo for C, f and alpha (never read).
            d_sigs = {has_base: _sig(
                dict(q_ptr="*u8", lo_ptr="*fp32", scale_ptr="*fp32", c_ptr=f"*{elem}",
                     f_ptr="*i32" if has_base else "*u8", alpha_ptr="*fp32", out_ptr=f"*{elem}", b="i32", n="i32",
                     stride_qb="i32", stride_cb="i32", stride_cn="i32", stride_ob="i32", BITS="constexpr",
                     HAS_BASE="constexpr", BLOCK_R="constexpr", BLOCK_N="constexpr"),
                ("stride_cn",), layout,
            ) for has_base in (True, False)}
            for bits in BITS:
                for block_r, block_n, one_tile in tiles:
                    tile = f"{bits}-bit R{block_r} N{block_n} w4"
                    for has_base, (signature, units, aligned) in q_sigs.items():
                        yield Config("_quantize_kernel", f"{layout} {dtype_name} {tile}{' one-tile' * one_tile}"
                                     f"{'' if has_base else ' no-base'}", signature,
                                     units | dict(BITS=bits, HAS_BASE=has_base, ONE_TILE=one_tile, BLOCK_R=block_r,
                                                  BLOCK_N=block_n), aligned, 4)
                    for has_base, (signature, units, aligned) in d_sigs.items():
                        yield Config("_decode_kernel", f"{layout} {dtype_name} {tile}{'' if has_base else ' no-base'}",
                                     signature, units | dict(BITS=bits, HAS_BASE=has_base, BLOCK_R=block_r,
                                                             BLOCK_N=block_n), aligned, 4)


def weight_grad_configs(layouts: tuple[str, ...] = LAYOUTS) -> Iterator[Config]:
    """``_weight_grad_kernel`` per operand dtype and ``tl.dot`` precision, at the tiles ``_blocks`` picks for a
    large dW (each bit width, with and without the PAMM base) and a small one; float32 out, as a split stores."""
    import torch

    from pamm_fx.kernels.lowbit import BITS

    mod = importlib.import_module(WEIGHT_GRAD_MODULE)
    for layout in layouts:
        for dtype_name, elem in ELEMENT.items():
            dtype = getattr(torch, dtype_name)
            # Without a base the launcher passes dY, q and lo for C, f and alpha (never read).
            sigs = {has_base: _sig(
                dict(dy_ptr=f"*{elem}", q_ptr="*u8", lo_ptr="*fp32", scale_ptr="*fp32", c_ptr=f"*{elem}",
                     f_ptr="*i32" if has_base else "*u8", alpha_ptr="*fp32", out_ptr="*fp32", b="i32", m="i32",
                     n="i32", rows_per_split="i32", stride_db="i32", stride_qb="i32", stride_cb="i32",
                     stride_os="i32", stride_om="i32", BITS="constexpr", HAS_BASE="constexpr", UPCAST="constexpr",
                     PRECISION="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr"),
                (), layout,
            ) for has_base in (True, False)}
            for precision in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):
                (big, small) = (mod._blocks(m, n, dtype, precision) for m, n in WEIGHT_GRAD_SHAPES)
                runs = [(big, bits, has_base) for bits in BITS for has_base in (True, False)] + [(small, 4, True)]
                for (block_m, block_n, block_k, num_warps), bits, has_base in runs:
                    signature, units, aligned = sigs[has_base]
                    yield Config(
                        kernel="_weight_grad_kernel",
                        label=f"{layout} {dtype_name} {precision} {bits}-bit base={'yes' if has_base else 'no'} "
                        f"M{block_m} N{block_n} K{block_k} w{num_warps}",
                        signature=signature,
                        constexprs=units | dict(BITS=bits, HAS_BASE=has_base, UPCAST=dtype == torch.float32,
                                                PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                                                BLOCK_K=block_k),
                        aligned=aligned,
                        num_warps=num_warps,
                    )


#: Kernel name -> (module, configuration generator). A new kernel joins here, with a generator of its
#: shipped configurations (the signature as :func:`_sig` specializes it, constexprs, num_warps), and
#: with that the CPU test and ``gpu_check.py`` compile it too.
KERNELS = {
    "_assign_kernel": (ASSIGN_MODULE, assign_configs),
    "_partial_kernel": (CONTRACT_MODULE, contract_configs),
    "_reduce_kernel": (CONTRACT_MODULE, contract_configs),
    "_quantize_kernel": (QUANTIZE_MODULE, quantize_configs),
    "_decode_kernel": (QUANTIZE_MODULE, quantize_configs),
    "_weight_grad_kernel": (WEIGHT_GRAD_MODULE, weight_grad_configs),
}

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(cfg: Config, capability: int) -> dict[str, Any]:
    """Compile ``cfg`` for ``sm_<capability>``; registers, spills and shared memory from ``ptxas -v``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(KERNELS[cfg.kernel][0]), cfg.kernel)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in cfg.aligned}
    src = ASTSource(fn, cfg.signature, cfg.constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": cfg.num_warps})
    if not compiled.asm.get("ptx") or not compiled.asm.get("cubin"):
        raise RuntimeError(f"no PTX/cubin for sm_{capability}")
    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx) + ".o"],
                              capture_output=True, text=True, check=True)
    regs, spill = _PTXAS_REGS.search(proc.stderr), _PTXAS_SPILL.search(proc.stderr)
    if regs is None or spill is None:
        raise RuntimeError(f"unreadable ptxas -v output: {proc.stderr[-400:]}")
    return {"registers": int(regs[1]), "stack": int(spill[1]), "spill_stores": int(spill[2]),
            "spill_loads": int(spill[3]), "shared": compiled.metadata.shared}


def configs(kernels: list[str] | None = None, layouts: tuple[str, ...] = LAYOUTS) -> list[Config]:
    """Every configuration of ``kernels`` (default: all of :data:`KERNELS`), each generator run once."""
    names = kernels or list(KERNELS)
    out: list[Config] = []
    for gen in dict.fromkeys(KERNELS[name][1] for name in names):
        out += [cfg for cfg in gen(layouts) if cfg.kernel in names]
    return out


def _row(job: tuple[Config, int]) -> dict[str, Any]:
    """The table row of one (configuration, target); a compile error is recorded in it, not raised."""
    import triton

    cfg, cap = job
    row = {"kernel": cfg.kernel, "config": cfg.label, "target": f"sm_{cap}", "triton": triton.__version__,
           "num_warps": cfg.num_warps, "constexprs": cfg.constexprs}
    start = time.perf_counter()
    try:
        row |= compile_one(cfg, cap)
    except Exception as exc:  # a rejected kernel is a result: report it, go on with the rest
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run(kernels: list[str] | None = None, layouts: tuple[str, ...] = LAYOUTS, jobs: int = 1,
        targets: tuple[int, ...] = TARGETS) -> list[dict[str, Any]]:
    """One row per (configuration, target), in order; ``jobs`` processes compile in parallel."""
    work = [(cfg, cap) for cfg in configs(kernels, layouts) for cap in targets]
    if jobs <= 1:
        return [_row(job) for job in work]
    # spawn, not fork: the parent has imported torch (thread pools), which a forked child may inherit locked
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_row, work))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Registers and spills per configuration, sm_80 and sm_90 side by side."""
    by_cfg: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_cfg.setdefault((row["kernel"], row["config"]), {})[row["target"]] = row

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return "**compile error**"
        spill = r["spill_stores"] + r["spill_loads"]
        return f"{r['registers']} regs, " + (f"**spills {r['spill_stores']}/{r['spill_loads']} B**" if spill
                                             else "no spill")

    targets = list(dict.fromkeys(row["target"] for row in rows))
    header = ["kernel", "configuration", *targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, label), per in by_cfg.items():
        lines.append("| " + " | ".join([f"`{kernel}`", label, *(cell(per.get(t)) for t in targets)])
                     + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON row per configuration and target")
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="only these kernels")
    parser.add_argument("--layout", action="append", choices=LAYOUTS, help="only these layouts")
    parser.add_argument("--target", type=int, action="append",
                        help=f"compute capability to compile for, e.g. 100 (default: {TARGETS})")
    parser.add_argument("--jobs", type=int, default=1, help="compiling processes (each compile is one core)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):  # @triton.jit reads it at import: restart without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    rows = run(args.kernel, tuple(args.layout or LAYOUTS), args.jobs, tuple(args.target or TARGETS))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        import triton

        print(markdown(rows))
        print(f"\ntriton {triton.__version__}; "
              f"{sum('error' in r for r in rows)} compile errors, "
              f"{sum(r.get('spill_stores', 0) + r.get('spill_loads', 0) > 0 for r in rows)} configurations spill, "
              f"{sum(r['seconds'] for r in rows):.0f} s of compiling (all processes)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
