"""torchtitan 0.3.0's llama3 debug model on CPU: ``--compile.backend pamm`` vs ``inductor`` per AC mode.

A runner, not library code. It keeps the shim torchtitan 0.3.0 needs here; on a CUDA machine
only (c) and (d) are installed (FlexAttention then runs as torchtitan ships it):

(a) the device is "cpu" (torchtitan falls back to "cuda" when no accelerator is found) with a
    stub device module for the memory-monitor calls ``torch.cpu`` lacks;
(b) FlexAttention has no CPU backward in torch 2.13, and torchtitan refuses SDPA for language
    models: the flex call becomes SDPA on the dense mask computed from the same
    ``BlockMask.mask_mod`` (the debug model's mask is causal);
(c) ``torch.distributed.set_timeout`` (a nightly API) is aliased to ``distributed_c10d._set_pg_timeout``;
(d) torchtitan refuses compile backends other than inductor/aot_eager for models with
    FlexAttention modules (``distributed/compile.py``: the flex region "would decompose to eager"),
    so ``--compile.backend pamm`` is refused for its LLMs even on a GPU; pamm hands every graph to
    Inductor, which lowers flex itself, so the backend name is passed through.

Each run is its own process (single rank, gloo), ``python -m torchtitan.train``'s ``main()`` with
these flags::

    --module llama3 --config llama3_debugmodel --compile.enable --compile.backend {pamm,inductor}
    --training.steps N --training.seq_len S --training.local_batch_size B
    --hf_assets_path ./tests/assets/tokenizer activation-checkpoint:{none,selective,full,memory-budget}

Measured in the child: step time (``Trainer.train_step``, wall), the loss torchtitan logs each
step, and the bytes autograd saves for backward in the model's forward of one step (a
``saved_tensors_hooks`` count, deduplicated by storage object, the loss left out; parameters,
and the unsharded copies FSDP gathers, excluded by storage).
pamm options come from the environment (``PAMM_TARGETS``, ``PAMM_MIN_GENERATORS``, ...).

Needs ``pip install torchtitan==0.3.0`` (keeps the CPU torch) and torchtitan's test tokenizer,
which the wheel lacks: ``--tokenizer DIR`` with ``tokenizer.json`` and ``tokenizer_config.json``
from ``tests/assets/tokenizer`` of https://github.com/pytorch/torchtitan. The dataset
``c4_test`` is replaced by the standard library's docstrings (same JSONL format, offline)::

    python benchmarks/torchtitan_cpu.py --tokenizer /path/to/torchtitan/tests/assets/tokenizer --threads 1 \\
        [--steps 12] [--ac none,selective,full,memory-budget] [--runs inductor,pamm,pamm-all]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "torchtitan"
AC_MODES = ["none", "selective", "full", "memory-budget"]
#: run name -> (compile backend, extra environment): options reach pamm only through PAMM_* variables.
RUNS: dict[str, tuple[str, dict[str, str]]] = {
    "inductor": ("inductor", {}),
    "pamm": ("pamm", {}),
    "pamm-all": ("pamm", {"PAMM_TARGETS": "all"}),
    "pamm-all-mg16": ("pamm", {"PAMM_TARGETS": "all", "PAMM_MIN_GENERATORS": "16"}),
}


# --- the shim (child process only) ------------------------------------------------------------------------

class _CpuDevice:
    """What torchtitan calls on its ``device_module``; torch.cpu lacks the memory statistics."""

    @staticmethod
    def set_device(device: Any) -> None:
        pass

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(device: Any = None) -> SimpleNamespace:
        return SimpleNamespace(total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), name="cpu")

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass


def _dense_flex(q: Any, k: Any, v: Any, *, score_mod: Any, block_mask: Any, scale: Any, enable_gqa: bool,
                return_aux: Any, kernel_options: dict) -> tuple[Any, Any]:
    """FlexAttention's call, as SDPA on the dense mask of ``block_mask.mask_mod`` (no CPU flex backward)."""
    import torch
    import torch.nn.functional as F

    if score_mod is not None or getattr(return_aux, "lse", False):
        raise NotImplementedError("torchtitan_cpu shim: score_mod / lse are not emulated")
    bsz, heads, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    dev = q.device
    b = torch.arange(bsz, device=dev)[:, None, None, None]
    h = torch.arange(heads, device=dev)[None, :, None, None]
    qi = torch.arange(lq, device=dev)[None, None, :, None]
    ki = torch.arange(lk, device=dev)[None, None, None, :]
    mask = block_mask.mask_mod(b, h, qi, ki)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out, None  # the caller reads aux only for lse


def install_shim(cpu: bool = True) -> None:
    """(a)-(d) of the module docstring; call before torchtitan builds anything. On a CUDA machine
    (``cpu=False``) only (c) and (d) apply: FlexAttention then runs as torchtitan ships it."""
    import torch
    import torch._utils
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if cpu:
        torch._utils._get_available_device_type = lambda: "cpu"  # before torchtitan.tools.utils is imported
        import torchtitan.tools.utils as tt_utils

        tt_utils.device_type, tt_utils.device_module = "cpu", _CpuDevice
        from torchtitan.models.common.attention import FlexAttention

        FlexAttention.compiled_flex_attn = staticmethod(_dense_flex)
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: distributed_c10d._set_pg_timeout(timeout, group)
    import torchtitan.distributed.compile as tt_compile

    original = tt_compile._maybe_regional_inductor_backend
    tt_compile._maybe_regional_inductor_backend = (
        lambda model, backend: original(model, backend) if backend == "aot_eager" else backend
    )


# --- measurement (child) ----------------------------------------------------------------------------------

def _instrument(record: dict[str, Any], measure_step: int) -> None:
    import torch
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.trainer import Trainer

    train_step, fwd_bwd, log = Trainer.train_step, Trainer.forward_backward_step, MetricsProcessor.log

    def timed_train_step(self: Any, it: Any) -> Any:
        t0 = time.perf_counter()
        out = train_step(self, it)
        record["step_s"].append(time.perf_counter() - t0)
        return out

    def measured_fwd_bwd(self: Any, **kwargs: Any) -> Any:
        if self.step != measure_step:
            return fwd_bwd(self, **kwargs)
        model = self.model_parts[0]
        seen: dict[int, tuple[list[int], str, int, bool]] = {}

        def param_storages() -> set[int]:
            # Read at pack time: inside a block's forward FSDP has swapped in the unsharded (all-gathered,
            # bf16) parameters, the tensors the compiled graph saves for its backward.
            return {getattr(p, "_local_tensor", p).untyped_storage()._cdata for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # Keyed by the StorageImpl, not the data pointer: FSDP frees its unsharded parameters' memory
            # after the forward (their storage stays alive, resized to 0), so a later activation can reuse
            # the address, and a pointer key would drop it.
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen[key] = (list(t.shape), str(t.dtype), t.untyped_storage().nbytes(), key in param_storages())
            return t

        # Only the model's forward (blocks, embedding, norm, output projection), not the loss: torchtitan's
        # chunked loss saves and frees its chunks within the step.
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        model = self.model_parts[0]
        pre = model.register_forward_pre_hook(lambda m, a: hooks.__enter__())
        post = model.register_forward_hook(lambda m, a, o: hooks.__exit__(None, None, None))
        try:
            out = fwd_bwd(self, **kwargs)
        finally:
            pre.remove()
            post.remove()
        entries = list(seen.values())
        record["saved_tensors"] = entries
        record["saved_bytes"] = sum(n for _, _, n, is_param in entries if not is_param)
        record["saved_param_bytes"] = sum(n for _, _, n, is_param in entries if is_param)
        return out

    def logged(self: Any, step: int, global_avg_loss: float, *args: Any, **kwargs: Any) -> Any:
        record["loss"].append([step, float(global_avg_loss)])
        return log(self, step, global_avg_loss, *args, **kwargs)

    Trainer.train_step, Trainer.forward_backward_step, MetricsProcessor.log = timed_train_step, measured_fwd_bwd, logged


def _rewrites() -> Any:
    """Count pamm's groups and refusals over every graph the backend plans (if pamm is used)."""
    try:
        from pamm_fx.testing import capture_rewrites
    except ImportError:
        return None
    return capture_rewrites()


def child(result_path: Path, argv: list[str], measure_step: int, threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    install_shim(cpu=not cuda)
    record: dict[str, Any] = {"step_s": [], "loss": [], "argv": argv, "device": "cuda" if cuda else "cpu"}
    _instrument(record, measure_step)
    from torchtitan import train

    sys.argv = ["torchtitan.train", *argv]
    capture = _rewrites()
    t0 = time.perf_counter()
    with capture as records:
        try:
            train.main()
        except BaseException as exc:  # noqa: BLE001  (record why, then fail)
            record["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    record["wall_s"] = time.perf_counter() - t0
    if cuda:
        record["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    groups = [[p.weight_name for p in g.projections] for r in records for g in r.plan.groups]
    rejections: dict[str, int] = {}
    for r in records:
        for rej in r.plan.rejections:
            rejections[rej.category] = rejections.get(rej.category, 0) + 1
    record["rewrites"] = {"graphs": len(records), "groups": groups, "rejections": rejections,
                          "reasons": {rej.category: rej.reason for r in records for rej in r.plan.rejections}}
    result_path.write_text(json.dumps(record, indent=1))
    if "error" in record:
        sys.exit(1)


# --- the parent: assets, one process per run, tables --------------------------------------------------------

def prepare_workdir(work: Path, tokenizer: Path) -> None:
    """torchtitan reads ./tests/assets/tokenizer and ./tests/assets/c4_test relative to its working directory."""
    sys.path.insert(0, str(HERE.parent))
    from pamm_fx.demo.data import stdlib_docstrings

    tok = work / "tests" / "assets" / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, tok / name)
    c4 = work / "tests" / "assets" / "c4_test"
    c4.mkdir(parents=True, exist_ok=True)
    docs = [d for d in stdlib_docstrings().decode("utf-8", "replace").split("\n\n") if len(d) > 200]
    with open(c4 / "data.json", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def flags(ac: str, backend: str, args: argparse.Namespace, work: Path) -> list[str]:
    out = [
        "--module", "llama3", "--config", "llama3_debugmodel",
        "--compile.enable", "--compile.backend", backend,
        "--training.steps", str(args.steps), "--training.seq_len", str(args.seq),
        "--training.local_batch_size", str(args.batch),
        "--hf_assets_path", "./tests/assets/tokenizer", "--dump_folder", str(work / "outputs"),
        "--metrics.log_freq", "1", "--validator.no-enable", "--checkpoint.no-enable", "--debug.seed", str(args.seed),
        f"activation-checkpoint:{ac}",
    ]
    if ac == "memory-budget":
        out += ["--activation-checkpoint.memory-budget", str(args.budget)]
    return out


def run_one(ac: str, run: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    backend, extra_env = RUNS[run.split("#")[0]]
    argv = flags(ac, backend, args, work)
    result = work / f"{ac}_{run}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(HERE.parent), **extra_env)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(result), "--measure-step",
           str(args.measure_step), "--threads", str(args.threads), "--", *argv]
    env_text = " ".join(f"{k}={v}" for k, v in extra_env.items())
    print(f"  $ {env_text + ' ' if env_text else ''}python -m torchtitan.train {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
    log = work / f"{ac}_{run}.log"
    log.write_text(proc.stdout + proc.stderr)
    data = json.loads(result.read_text()) if result.exists() else {"error": f"no result (rc {proc.returncode})"}
    data.update({"ac": ac, "run": run, "backend": backend, "env": extra_env, "rc": proc.returncode,
                 "process_wall_s": time.perf_counter() - t0, "log_tail": (proc.stdout + proc.stderr)[-3000:]})
    return data


def summarize(d: dict[str, Any], warmup: int) -> dict[str, Any]:
    timed = d.get("step_s_pooled") or d.get("step_s", [])[warmup:]
    return {"median_s": statistics.median(timed) if timed else None,
            "final_loss": d["loss"][-1][1] if d.get("loss") else None}


def report(out: Path, warmup: int) -> str:
    sys.path.insert(0, str(HERE))
    from _common import markdown_table

    files = sorted(out.glob("*.json"))
    data = [json.loads(p.read_text()) for p in files]
    data = [d for d in data if "ac" in d]
    if not data:
        print("no results yet")
        return ""
    by = {(d["ac"], d["run"]): d for d in data}
    for (ac, run), d in list(by.items()):  # a repeated baseline: pool its timed steps with the first run's
        first = by.get((ac, run.split("#")[0]))
        if "#" in run and first is not None and not d.get("error") and not first.get("error"):
            first["step_s_pooled"] = first["step_s"][warmup:] + d["step_s"][warmup:]
    rows = []
    for ac in AC_MODES:
        base = by.get((ac, "inductor"))
        for run in RUNS:
            d = by.get((ac, run))
            if d is None:
                continue
            if d.get("error"):
                rows.append([ac, run, "FAILED: " + d["error"].splitlines()[0][:120], "", "", "", "", "", ""])
                continue
            s, sb = summarize(d, warmup), summarize(base, warmup) if base and not base.get("error") else None
            rw = d.get("rewrites", {})
            groups = rw.get("groups", [])
            rw_text = "-" if d["backend"] != "pamm" else (
                f"{len(groups)} groups ({', '.join(sorted({g[0].split('.')[-2] for g in groups}))})" if groups
                else "0 groups") + "".join(f"; {n} {c}" for c, n in sorted(rw.get("rejections", {}).items())
                                           if c in ("checkpointed", "all_rows_kept", "min_tokens"))
            rows.append([
                ac, run, f"{d['saved_bytes'] / 2**20:.2f}",
                f"{d['saved_bytes'] / base['saved_bytes'] - 1:+.1%}" if base and run != "inductor" and
                base.get("saved_bytes") else "-",
                f"{s['median_s'] * 1e3:.0f}",
                f"{s['median_s'] / sb['median_s']:.3f}x" if sb and run != "inductor" else "-",
                f"{s['final_loss']:.4f}", f"{len(d['loss'])}", rw_text,
            ])
    m = data[0].get("machine", {})
    head = (f"torchtitan 0.3.0 llama3 debugmodel (6 layers, dim 256, fused wqkv), {data[0]['argv']}; "
            f"median step time over steps {warmup + 1}-end; {m.get('nproc')}-core CPU, {m.get('torch_threads')} "
            f"thread(s), torch {m.get('torch')}, {m.get('date')}")
    table = markdown_table(["AC mode", "run", "saved MiB", "vs inductor", "step ms", "time vs inductor",
                            "loss at last step", "steps", "pamm rewrote"], rows)
    text = head + "\n\n" + table
    print(text)
    (out / "table.md").write_text(text + "\n")
    return text


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--")
        own, argv = sys.argv[1:i], sys.argv[i + 1:]
        p = argparse.ArgumentParser()
        p.add_argument("--child", type=Path)
        p.add_argument("--measure-step", type=int)
        p.add_argument("--threads", type=int)
        a = p.parse_args(own)
        child(a.child, argv, a.measure_step, a.threads)
        return
    sys.path.insert(0, str(HERE))
    from _common import machine, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, help="directory with torchtitan's test tokenizer (tokenizer.json, "
                   "tokenizer_config.json)")
    p.add_argument("--work", type=Path, default=Path("/tmp/pamm_torchtitan"), help="torchtitan's working directory")
    p.add_argument("--ac", default=",".join(AC_MODES))
    p.add_argument("--runs", default="inductor,pamm,pamm-all", help=f"of {','.join(RUNS)}")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="torchtitan's --debug.seed (same initial weights in every run)")
    p.add_argument("--repeat-baseline", action="store_true",
                   help="run inductor again after the pamm runs of each AC mode; its steps are pooled (drift check)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median (compile included)")
    p.add_argument("--measure-step", type=int, default=3, help="the step whose saved tensors are counted")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--force", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        if args.tokenizer is None:
            p.error("--tokenizer DIR is needed (tests/assets/tokenizer of a pytorch/torchtitan checkout)")
        args.work.mkdir(parents=True, exist_ok=True)
        prepare_workdir(args.work, args.tokenizer)
        runs = args.runs.split(",") + (["inductor#2"] if args.repeat_baseline else [])
        for ac in args.ac.split(","):
            for run in runs:
                path = args.out / f"{ac}_{run}.json"
                if path.exists() and not args.force:
                    print(f"{ac} / {run}: done already ({path.name})")
                    continue
                print(f"{ac} / {run}", flush=True)
                d = run_one(ac, run, args, args.work)
                d["machine"] = dict(machine(), torch_threads=args.threads or "default")
                write_json(path, d)
                s = summarize(d, args.warmup)
                print(f"  -> {'FAILED ' + d['error'][:300] if d.get('error') else ''}"
                      f"saved {d.get('saved_bytes', 0) / 2**20:.2f} MiB, median "
                      f"{(s['median_s'] or 0) * 1e3:.0f} ms, last loss {s['final_loss']}, "
                      f"groups {len(d.get('rewrites', {}).get('groups', []))}", flush=True)
    report(args.out, args.warmup)


if __name__ == "__main__":
    main()
