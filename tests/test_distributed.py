"""DDP and FSDP2 on 2 CPU processes (gloo): gradients at ratio 1 equal a single-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402


def _single_process_grads() -> dict[str, torch.Tensor]:
    net = dist_worker.model()
    tokens, targets = dist_worker.batch()
    # DDP and FSDP average the ranks' gradients: the mean of the two one-row losses.
    loss = sum(torch.compile(net)(tokens[r : r + 1], targets[r : r + 1]) for r in range(2)) / 2
    loss.backward()
    return {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_process_gradients_match_single_process(kind, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    proc = subprocess.run(
        [sys.executable, str(HERE / "dist_worker.py"), kind, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = _single_process_grads()
    for rank in range(2):
        result = torch.load(tmp_path / f"grads_{rank}.pt")
        assert result["groups"] >= 1, f"{kind}: nothing was rewritten ({result['graphs']} graphs)"
        for name, grad in expected.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
