"""One prepared GPU check of the CUDA path (issues 12, 25): one command, under 10 minutes on one H100/H200.

Sections, each timed and recorded even when it fails (the next one still runs):

1. kernels: ``pytest tests/test_triton_kernels.py tests/test_lowbit_kernels.py tests/test_dequant_matmul.py``
   with the kernels compiled for real (no interpreter).
2. end-to-end: a small LLaMA (``pamm_fx.demo.llama``) compiled with ``backend="pamm"`` and run forward +
   backward in bf16, fp16 and fp32 with ``dynamic=True`` (two sequence lengths), and with
   ``mode="reduce-overhead"`` (CUDA graphs; whether Inductor really used them is reported).
3. past 2^31 elements: assign and contract on tensors with more than 2^31 elements, and on a transposed
   X whose column stride times n passes 2^31, checked against the torch reference on a slice.
4. bandwidth: the kernels of ``benchmarks/bench_kernels.py`` against the device-to-device copy
   bandwidth measured on this device in this run.
5. weight gradient from low-bit codes (``estimator="sr"`` / ``"pamm_sr"``), bf16, b = 16384, n = 4096,
   m = 4096 and 11008, 8 and 4 bits: the quantize kernel (without a base for sr, with one for pamm_sr),
   the Triton ``weight_grad`` against dY^T X^ summed in float32 from the explicit reconstruction, and its
   time and peak memory against the path it replaced (Triton reconstruction of the b x n X^, then one GEMM).
6. the frontier at a LLaMA-1B-shaped layer (dim 2048, 32 heads, 8 kv heads, hidden 8192, bf16, 8 x 2048
   tokens): step time, peak ``torch.cuda.max_memory_allocated`` above the level before the step and bytes
   saved for backward of plain ``torch.compile``, ``activation_memory_budget`` 0.8 and 0.5, full
   checkpointing, Inductor's fp8 activation pass (alone and + budget 0.5), pamm ``saved="all"`` (alone,
   + budget 0.8, + budget 0.5), ``saved="wgrad"`` and ``targets="all", estimator="sr"``
   (``--smoke-cpu`` runs this section on a tiny layer on the CPU, to check the code without a GPU).
7. kernel compile: ``benchmarks/kernel_registers.py`` (every Triton kernel it lists, new ones included)
   compiled for sm_80, sm_90 and this device's capability; registers and spills per configuration.

Without CUDA it prints "no CUDA device" and exits 0 (with a note in the results if --out is given).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_config, machine, markdown_table  # noqa: E402

from pamm_fx.demo.__main__ import FP8  # noqa: E402  (the demo's fp8-pass settings)

ROOT = Path(__file__).resolve().parent.parent
#: Wall-clock plan (seconds) per section; a section starting with less than its plan left is skipped.
PLAN = {"kernels": 150, "end_to_end": 120, "past_2_31": 40, "bandwidth": 30, "weight_grad": 40,
        "llama_1b_layer": 330, "kernel_compile": 60}
DEADLINE_S = 10 * 60


def _log(msg: str) -> None:
    print(msg, flush=True)


def _cuda_median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_kernels() -> dict[str, Any]:
    """The interpreter tests, compiled for real on this GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_kernels.py",
         "tests/test_lowbit_kernels.py", "tests/test_dequant_matmul.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=PLAN["kernels"] + 60,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    _log(f"  pytest: {tail}")
    if proc.returncode:
        _log(proc.stdout[-4000:])
    return {"ok": proc.returncode == 0, "summary": tail}


def _small_llama(dtype: torch.dtype) -> torch.nn.Module:
    from pamm_fx.demo.llama import Llama

    torch.manual_seed(0)
    return Llama(demo_config(256, 2, vocab_size=256, max_seq_len=512)).to(device="cuda", dtype=dtype)


def _e2e_case(dtype: torch.dtype, mode: str | None, seqs: tuple[int, ...]) -> dict[str, Any]:
    import pamm_fx

    model = _small_llama(dtype)
    backend = pamm_fx.backend(mode=mode, ratio=1 / 8, min_tokens=1, min_generators=16)
    compiled = torch.compile(model, backend=backend, dynamic=mode is None)
    torch._dynamo.utils.counters.clear()
    losses, finite = [], True
    t0 = time.perf_counter()
    for seq in seqs:
        for _ in range(3 if mode else 1):  # CUDA graphs record on a later call
            tokens = torch.randint(0, 256, (4, seq), device="cuda")
            loss = compiled(tokens, tokens.roll(-1, 1))
            loss.backward()
            finite &= all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            eager = model(tokens, tokens.roll(-1, 1)).item()
        losses.append((loss.item(), eager))
    counters = torch._dynamo.utils.counters
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode or "default (dynamic=True)",
        "seconds": round(time.perf_counter() - t0, 1),
        "grads_finite": finite,
        "loss_vs_eager": [f"{a:.4f}/{b:.4f}" for a, b in losses],
        "loss_close": all(abs(a - b) <= 0.05 * max(1.0, abs(b)) for a, b in losses),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def check_end_to_end() -> dict[str, Any]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch._dynamo.reset()
        rows.append(_e2e_case(dtype, None, (64, 96)))
        _log(f"  {rows[-1]}")
    torch._dynamo.reset()
    rows.append(_e2e_case(torch.bfloat16, "reduce-overhead", (64,)))
    _log(f"  {rows[-1]}")
    ok = all(r["grads_finite"] and r["loss_close"] for r in rows)
    return {"ok": ok, "rows": rows}


def check_past_2_31() -> dict[str, Any]:
    """More than 2^31 elements (int32 offsets would wrap); the kernels against the reference on a slice."""
    from pamm_fx.kernels import assign_triton as triton_assign
    from pamm_fx.kernels import contract_triton as triton_contract
    from pamm_fx.kernels.assign import reference as reference_assign
    from pamm_fx.kernels.contract import reference as reference_contract

    results = []
    n, k = 2048, 64
    b = (1 << 31) // n + 4096  # b * n > 2^31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    c = x[torch.randperm(b, device="cuda", generator=gen)[:k].sort().values]
    f, alpha = triton_assign.assign(x, c)
    tail = slice(b - 4096, b)
    f_ref, alpha_ref = reference_assign(x[tail], c)
    agree = (f[tail] == f_ref).float().mean().item()
    results.append({"case": f"assign X {b}x{n} bf16 ({b * n / 2**31:.2f} x 2^31 elements)", "f_agree_last_4096": agree,
                    "ok": agree > 0.99})
    del x, c
    xt = torch.randn(n, b, device="cuda", dtype=torch.bfloat16, generator=gen).T  # column stride b
    ct = xt[:k].contiguous()
    f_t, _ = triton_assign.assign(xt, ct)
    f_t_ref, _ = reference_assign(xt[tail], ct)
    agree_t = (f_t[tail] == f_t_ref).float().mean().item()
    results.append({"case": f"assign transposed X (stride {xt.stride()})", "f_agree_last_4096": agree_t,
                    "ok": agree_t > 0.99})
    del xt, ct
    g = torch.randn(b, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    bt = triton_contract.contract([g], f, alpha, k)
    mask = torch.zeros(b, dtype=torch.bool, device="cuda")
    mask[tail] = True
    alpha_tail = torch.where(mask, alpha, torch.zeros_like(alpha))
    bt_tail = triton_contract.contract([g], f, alpha_tail, k)
    expected = reference_contract([g[tail]], f[tail], alpha[tail], k)
    err = ((bt_tail - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    results.append({"case": f"contract dY {b}x{n} bf16 (rows of the last 4096 only)", "rel_err": err,
                    "finite": bool(torch.isfinite(bt).all().item()), "ok": err < 1e-4})
    del g, f, alpha, bt
    torch.cuda.empty_cache()
    for r in results:
        _log(f"  {r}")
    return {"ok": all(r["ok"] for r in results), "rows": results}


def check_bandwidth() -> dict[str, Any]:
    import bench_kernels

    rows = bench_kernels.bench_gpu(20)
    return {"ok": True, "rows": rows}


def _weight_grad_case(m: int, bits: int, base: bool, b: int = 16384, n: int = 4096) -> dict[str, Any]:
    """One shape: quantize, the kernel's error against dY^T X^ in float32, and kernel vs reconstruct + GEMM."""
    from pamm_fx.kernels import dequant_matmul_triton, lowbit, quantize_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    x = torch.randn(b, n, device="cuda", dtype=dtype, generator=gen)
    dy = torch.randn(b, m, device="cuda", dtype=dtype, generator=gen)
    k = b // 8
    c, f, alpha = ((x[::8].contiguous(), torch.randint(0, k, (b,), device="cuda", dtype=torch.int32, generator=gen),
                    torch.rand(b, device="cuda", generator=gen) + 0.5) if base else (None, None, None))
    key = lowbit.noise_key(torch.tensor(1, device="cuda"), 0)
    quantize_ms = _cuda_median_ms(lambda: quantize_triton.quantize(x, c, f, alpha, key, bits), runs=10)
    q, lo, scale = quantize_triton.quantize(x, c, f, alpha, key, bits)

    def explicit() -> torch.Tensor:
        return dy.t().mm(quantize_triton.decode(q, lo, scale, n, bits, dtype, c, f, alpha))

    def kernel() -> torch.Tensor:
        return dequant_matmul_triton.weight_grad(dy, q, lo, scale, c, f, alpha, bits, n)

    x_hat = quantize_triton.decode(q, lo, scale, n, bits, dtype, c, f, alpha)
    exact = dy.float().t().mm(x_hat.float())  # the products the kernel forms, summed in float32
    del x_hat
    got = kernel()
    rel_err = ((got.float() - exact).abs().max() / exact.abs().max()).item()
    rel_err_explicit = ((explicit().float() - exact).abs().max() / exact.abs().max()).item()
    del exact, got
    row: dict[str, Any] = {"estimator": "pamm_sr" if base else "sr", "b x n x m": f"{b}x{n}x{m}", "bits": bits,
                           "quantize_ms": quantize_ms, "rel_err": rel_err, "rel_err_explicit": rel_err_explicit}
    for name, fn in (("reconstruct+mm", explicit), ("weight_grad", kernel)):
        row[f"{name}_ms"] = _cuda_median_ms(fn, runs=10)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        row[f"{name}_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    row["speedup"] = row["reconstruct+mm_ms"] / row["weight_grad_ms"]
    # bf16 operands, float32 sums: the kernel is as close to the float32 sum as bf16's rounding of the product.
    row["ok"] = rel_err < 1e-2
    return row


def check_weight_grad() -> dict[str, Any]:
    rows = []
    for base in (False, True):
        for m in (4096, 11008):
            for bits in (8, 4):
                if base and m != 4096:
                    continue  # pamm_sr adds the gathered base: one shape is enough
                rows.append(_weight_grad_case(m, bits, base))
                torch.cuda.empty_cache()
                r = rows[-1]
                _log(f"  {r['estimator']} {r['b x n x m']} {bits} bits: quantize {r['quantize_ms']:.2f} ms; "
                     f"weight_grad {r['weight_grad_ms']:.2f} ms (+{r['weight_grad_extra_mib']:.0f} MiB) vs "
                     f"reconstruct+mm {r['reconstruct+mm_ms']:.2f} ms (+{r['reconstruct+mm_extra_mib']:.0f} MiB), "
                     f"{r['speedup']:.2f}x; rel err {r['rel_err']:.1e} (explicit {r['rel_err_explicit']:.1e})")
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


#: The frontier at a LLaMA-1B layer (issue 25): torch's options first (plain first of all), then pamm's.
LAYER_VARIANTS = ["plain torch.compile", "budget 0.8", "budget 0.5", "full AC", "fp8 pass", "fp8 pass + budget 0.5",
                  "pamm saved=all", "pamm saved=all + budget 0.8", "pamm saved=all + budget 0.5",
                  "pamm saved=wgrad", "pamm all sr"]


def _layer_step(variant: str, device: str = "cuda", small: bool = False) -> dict[str, Any]:
    """One variant of the LLaMA-1B-shaped layer (``small``: a tiny one, to check this code on a CPU): step time,
    peak memory in the step above the level before it (CUDA), bytes saved for backward."""
    from torch.utils.checkpoint import checkpoint

    import pamm_fx
    from pamm_fx.demo.llama import Llama, LlamaConfig
    from pamm_fx.demo.measure import saved_for_backward

    torch._dynamo.reset()
    torch.manual_seed(0)
    dim, heads, kv, hidden, seq, batch = (64, 4, 2, 128, 64, 2) if small else (2048, 32, 8, 8192, 2048, 8)
    cfg = LlamaConfig(vocab_size=256, dim=dim, n_layers=1, n_heads=heads, n_kv_heads=kv, hidden_dim=hidden,
                      max_seq_len=seq)
    model = Llama(cfg).to(device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (batch, seq), device=device)
    targets = tokens.roll(-1, 1)
    budget = float(variant.rsplit("budget ", 1)[1]) if "budget" in variant else 1.0
    if variant == "full AC":
        block = model.layers[0]
        model.layers[0] = type("Checkpointed", (torch.nn.Module,), {
            "forward": lambda self, *a: checkpoint(self.block, *a, use_reentrant=False)})()
        model.layers[0].block = block
    if variant.startswith("pamm"):
        options = ({"targets": "all", "estimator": "sr"} if variant == "pamm all sr" else
                   {"targets": "none", "saved": "wgrad" if "wgrad" in variant else "all"})
        compiled = torch.compile(model, backend=pamm_fx.backend(**options))
    else:
        compiled = torch.compile(model)

    def step() -> None:
        compiled(tokens, targets).backward()
        model.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fp8 = torch._inductor.config.patch(post_grad_fusion_options=FP8 if variant.startswith("fp8") else {})
    with torch._functorch.config.patch(activation_memory_budget=budget), fp8:
        t0 = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - t0
    saved = saved_for_backward(lambda: compiled(tokens, targets), model)
    saved.output.backward()
    model.zero_grad(set_to_none=True)
    del saved.output
    if device == "cuda":
        ms = _cuda_median_ms(step, runs=10)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        ms, peak = statistics.median(times) * 1e3, 0
    return {"variant": variant, "step_ms": ms, "peak_gib": peak / 2**30, "saved_gib": saved.nbytes / 2**30,
            "compile_s": compile_s}


def check_llama_1b_layer(device: str = "cuda", small: bool = False) -> dict[str, Any]:
    """The frontier at a LLaMA-1B-shaped layer in bf16 (dim 2048, 32 heads, 8 kv heads, hidden 8192,
    8 x 2048 tokens): torch's options (budgets, full checkpointing, Inductor's fp8 pass) and pamm's."""
    rows = []
    for variant in LAYER_VARIANTS:
        try:
            rows.append(_layer_step(variant, device, small))
        except Exception as e:  # record it, go on with the next variant
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            _log(f"  {variant}: FAILED {rows[-1]['error']}")
            continue
        if device == "cuda":
            torch.cuda.empty_cache()  # the variant's model and compiled graphs are gone
        base, r = rows[0], rows[-1]
        r["step_vs_plain"] = r["step_ms"] / base["step_ms"]
        r["peak_vs_plain"] = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] else 0.0
        r["saved_vs_plain"] = r["saved_gib"] / base["saved_gib"]
        _log(f"  {variant}: {r['step_ms']:.1f} ms ({r['step_vs_plain']:.3f}x), peak {r['peak_gib']:.2f} GiB "
             f"({r['peak_vs_plain']:.3f}x), saved {r['saved_gib']:.2f} GiB ({r['saved_vs_plain']:.3f}x), "
             f"compile {r['compile_s']:.0f} s")
    return {"ok": not any("error" in r for r in rows), "rows": rows}


def check_kernel_compile() -> dict[str, Any]:
    """``benchmarks/kernel_registers.py`` (every kernel it lists, every shipped configuration) compiled for
    sm_80, sm_90 and this device's capability: no compile error, no spill in a contiguous launch."""
    major, minor = torch.cuda.get_device_capability()
    targets = sorted({80, 90, 10 * major + minor})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernel_registers.py", "--json", "--jobs", str(min(8, os.cpu_count() or 1)),
         *(f"--target={t}" for t in targets)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=PLAN["kernel_compile"] + 120,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    table = [{"kernel": r["kernel"], "config": r["config"], "target": r["target"],
              "registers": r.get("registers", "-"),
              "spill B": "-" if "error" in r else r["spill_stores"] + r["spill_loads"],
              "error": r.get("error", "")[:200]} for r in rows]
    bad = [r for r in table if r["error"] or (r["config"].startswith("contiguous") and r["spill B"])]
    _log(f"  {len(rows)} compilations for {targets}: {len(bad)} with a compile error or a contiguous spill")
    if not rows:
        _log(proc.stderr[-4000:])
    return {"ok": bool(rows) and not bad, "rows": table, "summary": proc.stderr[-2000:] if not rows else ""}


SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "kernels": check_kernels,
    "end_to_end": check_end_to_end,
    "past_2_31": check_past_2_31,
    "bandwidth": check_bandwidth,
    "weight_grad": check_weight_grad,
    "llama_1b_layer": check_llama_1b_layer,
    "kernel_compile": check_kernel_compile,
}


def _markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# GPU check: {results.get('device', 'no CUDA device')}", "",
             f"torch {m['torch']}, Python {m['python']}, {m['date']}; `{m['command']}`", ""]
    for name, sec in results["sections"].items():
        status = "skipped" if sec.get("skipped") else ("ok" if sec.get("ok") else "FAILED")
        lines += [f"## {name}: {status} ({sec.get('seconds', 0):.0f} s)", ""]
        if sec.get("error"):
            lines += ["```", sec["error"][-2000:], "```", ""]
        rows = sec.get("rows")
        if rows:
            header = list(rows[0])
            lines += [markdown_table(header, [[_fmt(r.get(h)) for h in header] for r in rows]), ""]
        elif sec.get("summary"):
            lines += [sec["summary"], ""]
    if results.get("note"):
        lines += [results["note"], ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _write(out: Path | None, results: dict[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(_markdown(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--smoke-cpu", action="store_true", help="run section 6 on a tiny layer on the CPU (checks "
                        "the code; the numbers mean nothing)")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "sections": {}}
    if args.smoke_cpu:
        sec = check_llama_1b_layer("cpu", small=True)
        _log(json.dumps(sec, indent=1))
        return 0 if sec["ok"] else 1
    if not torch.cuda.is_available():
        _log("no CUDA device: nothing to check (exit 0)")
        results["note"] = "no CUDA device: the GPU check did not run."
        _write(args.out, results)
        return 0
    results["device"] = torch.cuda.get_device_name()
    _log(f"# GPU check on {results['device']}, torch {torch.__version__}")
    start = time.perf_counter()
    for name, fn in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        left = DEADLINE_S - (time.perf_counter() - start)
        if left < PLAN[name] / 2:
            _log(f"[{name}] skipped: {left:.0f} s left of the {DEADLINE_S:.0f} s budget")
            results["sections"][name] = {"skipped": True, "ok": False}
            continue
        _log(f"[{name}] ({time.perf_counter() - start:.0f} s elapsed)")
        t0 = time.perf_counter()
        try:
            sec = fn()
        except Exception:
            sec = {"ok": False, "error": traceback.format_exc()}
            _log(sec["error"])
        sec["seconds"] = time.perf_counter() - t0
        results["sections"][name] = sec
        _write(args.out, results)  # a cut-off run keeps what it measured
    _log(_markdown(results))
    failed = [n for n, s in results["sections"].items() if not s.get("ok")]
    _log(f"done in {time.perf_counter() - start:.0f} s; " + (f"FAILED: {failed}" if failed else "all sections ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
