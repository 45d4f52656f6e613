"""Markers: ``slow`` tests run only with --runslow; ``gpu`` tests only with CUDA. Skips say why."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under triton's interpreter. Set it before anything
# imports triton (transformers and accelerate do): triton reads it once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: needs --runslow (several minutes on 2 CPU cores)"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))


@pytest.fixture(autouse=True)
def _no_option_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's exported ``PAMM_RATIO`` etc. must not change what the suite checks."""
    from pamm_fx.config import OPTIONS

    for name in OPTIONS:
        monkeypatch.delenv(f"PAMM_{name.upper()}", raising=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Each test compiles from scratch, so counters and captured graphs belong to it alone."""
    torch._dynamo.reset()
