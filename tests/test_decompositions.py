"""Our Inductor decompositions reach every compile of a process, whatever compiled before it.

Inductor caches its decomposition table at the first compile of a process and its FX graph /
AOTAutograd caches do not key on the table, so decompositions registered into it were lost for a
pamm model compiled after a plain one, and that artifact was then loaded by later processes (issue
24, item 2). Each scenario runs in a fresh interpreter, since the first compile of the process is
the point; both processes share one fresh Inductor cache directory, so the second one loads what
the first stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pamm_fx.ops.decompositions import DECOMPOSITIONS

WORKER = Path(__file__).with_name("decomp_worker.py")


def _run(scenario: str, cache_dir: Path) -> dict[str, dict[str, int]]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(WORKER), scenario], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_every_decomposable_op_is_known() -> None:
    names = {str(op) for op in DECOMPOSITIONS}
    assert names == {"pamm.compress.default", "pamm.quantize.default", "pamm.dequant_weight_grad.default"}


@pytest.mark.parametrize("scenario", ["plain_first"])
def test_a_plain_compile_first_loses_no_decomposition_in_this_process_or_the_next(scenario, tmp_path) -> None:
    """Plain Inductor, then pamm, then the same structure again, then per-block compiles: no compiled
    code calls an op opaque that has a decomposition; a second process loading those artifacts from
    the same cache directory does not either."""
    first = _run(scenario, tmp_path)
    second = _run("pamm_only", tmp_path)
    for label, result in (("first process", first), ("second process (cache hits)", second)):
        for compile_, counts in result.items():
            assert sum(counts.values()) == 0, f"{label}, {compile_}: opaque calls {counts}"
