"""Every Triton kernel compiled for real GPU targets (sm_80, sm_90) on this CPU-only machine.

The rest of the suite runs the kernels under ``TRITON_INTERPRET=1``, which accepts kernels that the
real compiler rejects and says nothing about registers. ``benchmarks/kernel_registers.py`` compiles each
kernel over its shipped configurations to PTX and cubin and reads ``ptxas -v``; it runs in a subprocess
without ``TRITON_INTERPRET`` (``@triton.jit`` reads it at import, and conftest sets it), once per session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "kernel_registers.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without its NVIDIA backend (ptxas)"
)


def _script() -> Any:
    """The script as a module (its kernel list and targets); importing it imports no kernel."""
    spec = importlib.util.spec_from_file_location("kernel_registers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", "--jobs", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert out, f"kernel_registers.py printed no rows (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


def test_every_kernel_compiles_for_sm80_and_sm90(rows: list[dict[str, Any]]) -> None:
    script = _script()
    errors = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "rejected by the real compiler:\n" + "\n".join(errors)
    compiled = {(r["kernel"], r["target"]) for r in rows}
    assert compiled == {(k, f"sm_{cap}") for k in script.KERNELS for cap in script.TARGETS}


def test_assign_tiles_cover_small_and_large_k(rows: list[dict[str, Any]]) -> None:
    """The compiled tiles are the ones ``_blocks`` ships for every dtype, small k and large k."""
    import torch

    from pamm_fx.kernels.assign_triton import _blocks

    labels = {r["config"] for r in rows if r["kernel"] == "_assign_kernel"}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for k in (2, 100, 5000):
            bb, bk, bn, w = _blocks(k, dtype)
            tile = f"B{bb} K{bk} N{bn} w{w}"
            for eps in ("yes", "no"):
                assert f"contiguous {str(dtype)[6:]} ieee eps={eps} {tile}" in labels


def test_no_spills_in_contiguous_launches(rows: list[dict[str, Any]]) -> None:
    """Contiguous tensors (what the ops pass) compile without spilling registers to local memory."""
    spills = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['registers']} regs, "
              f"spill {r['spill_stores']}/{r['spill_loads']} B"
              for r in rows if r["config"].startswith("contiguous") and r["spill_stores"] + r["spill_loads"]]
    assert not spills, "\n".join(spills)
