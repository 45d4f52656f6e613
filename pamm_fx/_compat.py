"""Every private torch API pamm-fx uses, in one place, so a torch upgrade breaks one module.

Each function names the private API it wraps; ``tests/test_compat.py`` calls every one of
them on the torch installed, so an upgrade that moves one fails there first. Supported:
torch >= 2.11 (checked: 2.13 here, 2.11 on the GPU machine).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "compile_id",
    "compile_id_text",
    "detect_fake_mode",
    "forward_ad_active",
    "inductor_mode_options",
    "init_logs_with",
    "outside_tracing",
    "shapes_as_first_compile",
    "register_inductor_decomposition",
    "tag_must_save",
    "register_log_alias",
]


def detect_fake_mode(inputs: Sequence[Any]) -> Any:
    """The FakeTensorMode Dynamo traced ``inputs`` with, or None (``torch._guards.detect_fake_mode``)."""
    return torch._guards.detect_fake_mode(list(inputs))


def compile_id() -> tuple[int, int] | None:
    """(frame id, frame compile id) of the Dynamo compile in progress (``torch._guards.CompileContext``).

    Stable from run to run and across processes, and restarted by ``torch._dynamo.reset()``.
    """
    cid = torch._guards.CompileContext.current_compile_id()
    if cid is None:
        return None
    return cid.frame_id or 0, cid.frame_compile_id or 0


def compile_id_text() -> str | None:
    """Dynamo's compile id as tlparse shows it ("0/0", "1/0" after a graph break), or None outside a compile."""
    ctx = torch._guards.CompileContext.try_get()
    return str(ctx.compile_id) if ctx is not None and ctx.compile_id is not None else None


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """Inductor's config patches for ``torch.compile(mode=...)`` (``torch._inductor.list_mode_options``)."""
    return dict(torch._inductor.list_mode_options(mode))


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad._current_level``);
    ``torch.func.jvp`` opens one too, so both reach a custom op with it set."""
    return torch.autograd.forward_ad._current_level >= 0


def register_log_alias(alias: str, modules: list[str], artifact: str, description: str) -> None:
    """``TORCH_LOGS``-style alias and artifact for our loggers (``torch._logging._internal``)."""
    from torch._logging import _internal

    if not _internal.log_registry.is_log(alias):
        _internal.register_log(alias, modules)
    if not _internal.log_registry.is_artifact(artifact):
        _internal.register_artifact(artifact, description)


def init_logs_with(settings: str) -> bool:
    """Apply ``settings`` as if appended to ``TORCH_LOGS``; False if torch rejects them.

    ``torch._logging._internal._init_logs`` reads ``TORCH_LOGS`` only, so it is shown the merged
    string for this one call and the environment is restored afterwards.
    """
    from torch._logging import _internal

    torch_settings = os.environ.get(_internal.LOG_ENV_VAR)
    merged = f"{torch_settings},{settings}" if torch_settings else settings
    try:
        _internal._parse_log_settings(merged)
    except ValueError:
        return False
    os.environ[_internal.LOG_ENV_VAR] = merged
    try:
        _internal._init_logs()
    finally:
        if torch_settings is None:
            del os.environ[_internal.LOG_ENV_VAR]
        else:
            os.environ[_internal.LOG_ENV_VAR] = torch_settings
    return True


def outside_tracing() -> Any:
    """A context without the active dispatch modes (fake tensors, proxies), to run a real kernel while
    torch.compile traces (``torch.utils._python_dispatch._disable_current_modes``)."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def tag_must_save(*tensors: Any) -> None:
    """Tag the traced nodes producing ``tensors`` MUST_SAVE for the min-cut partitioner; outside a
    make_fx trace this does nothing (``torch.fx.experimental.proxy_tensor`` internals)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot
    from torch.utils.checkpoint import CheckpointPolicy

    mode = get_proxy_mode()
    if mode is None:
        return
    for t in tensors:
        slot = get_proxy_slot(t, mode.tracer, None)
        if slot is not None:
            slot.proxy.node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def register_inductor_decomposition(op: Any, fn: Any) -> None:
    """Make Inductor (only) trace ``fn`` in place of ``op`` (``torch._inductor.decomposition``)."""
    from torch._inductor.decomposition import register_decomposition

    register_decomposition(op)(fn)


def shapes_as_first_compile() -> Any:
    """Capture with the shapes a first compile would see: no sizes made dynamic because the same code was
    compiled before at other sizes (``torch._dynamo.config.automatic_dynamic_shapes``), without
    resetting Dynamo (which would throw away the user's compiled graphs)."""
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


def activation_memory_budget() -> float:
    """The budget the min-cut partitioner will use for this compile (1.0: recompute only what is free)."""
    return float(torch._functorch.config.activation_memory_budget)


def python_dispatcher() -> Any:
    """Python meta kernels and decompositions, which fake tensors with symbolic sizes need for some ops
    (``baddbmm`` broadcasting a mask); Dynamo computes its own example values under the same context."""
    from torch._dispatch.python import enable_python_dispatcher

    return enable_python_dispatcher()
