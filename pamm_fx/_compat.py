"""Every private torch API pamm-fx uses, in one place, so a torch upgrade breaks one module.

Each function names the private API it wraps; ``tests/test_compat.py`` calls every one of
them on the torch installed, so an upgrade that moves one fails there first. Supported:
torch >= 2.11 (checked: 2.13 here, 2.11 on the GPU machine).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch._dynamo
import torch._inductor.custom_graph_pass
import torch._logging

__all__ = [
    "NN_LINEAR",
    "NN_SDPA",
    "DynamoException",
    "OpOverload",
    "activation_memory_budget",
    "aot_eager_compile",
    "artifact_logger",
    "cache_entries",
    "cache_entry_count",
    "compile_id",
    "compile_id_text",
    "detect_fake_mode",
    "dynamo_compile_state",
    "dynamo_counters",
    "dynamo_seen_codes",
    "explain_backend",
    "fake_mode_of",
    "forget_code",
    "forward_ad_active",
    "inductor_compile",
    "inductor_decompositions",
    "source_keyed",
    "inductor_mode_options",
    "min_cut_partition",
    "partition_only",
    "CustomPartitionerFn",
    "user_partitioner",
    "init_logs_with",
    "manual_seed_count",
    "observe_pass",
    "outside_tracing",
    "python_dispatcher",
    "register_log_alias",
    "restore_dynamo_compile_state",
    "shapes_as_first_compile",
    "tag_must_save",
    "trace_artifact",
]

#: How Dynamo records ``F.linear`` / an inlined ``nn.Linear`` in a graph (``torch._C._nn.linear``).
NN_LINEAR = torch._C._nn.linear
#: How Dynamo records ``F.scaled_dot_product_attention`` (``torch._C._nn.scaled_dot_product_attention``).
NN_SDPA = torch._C._nn.scaled_dot_product_attention
#: The type of an ATen op overload in a traced graph, whose ``_schema`` says what it writes (``torch._ops.OpOverload``).
OpOverload = torch._ops.OpOverload
#: The base class Inductor's ``custom_partitioner_fn`` config requires: a callable with ``uuid()`` for the cache
#: key (``torch._inductor.custom_graph_pass.CustomPartitionerFn``).
CustomPartitionerFn = torch._inductor.custom_graph_pass.CustomPartitionerFn
#: Dynamo's own control-flow exceptions (``torch._dynamo.exc.TorchDynamoException``): never a failure of ours.
DynamoException = torch._dynamo.exc.TorchDynamoException


def dynamo_counters() -> Any:
    """Dynamo's counter table (``torch._dynamo.utils.counters``): torch's counter dumps show our entry and
    ``torch._dynamo.reset()`` clears it."""
    return torch._dynamo.utils.counters


def inductor_compile(gm: Any, example_inputs: list[Any], patches: dict[str, Any],
                     decompositions: dict[Any, Any]) -> Any:
    """Inductor on an FX graph with config ``patches``, tracing with the table ``decompositions``
    (``torch._inductor.compile_fx.compile_fx``)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches or None, decompositions=decompositions)


def inductor_decompositions(patches: dict[str, Any]) -> dict[Any, Any]:
    """Inductor's own decomposition table under config ``patches`` (it depends on the config)
    (``torch._inductor.decomposition.select_decomp_table``)."""
    from torch._inductor import config
    from torch._inductor.decomposition import select_decomp_table

    with config.patch(patches):
        return dict(select_decomp_table())


def source_keyed(patches: dict[str, Any], key: str) -> dict[str, Any]:
    """``patches`` plus a post-grad pass that does nothing but put ``key`` (a hash of our sources) into
    Inductor's FX graph cache key (``CustomGraphPass.uuid``), chaining the pass the user set.

    The key hashes the graph, torch and Inductor's config, not what our ops do: after an upgrade of this
    package a graph calling ``pamm::`` ops with the same arguments would load code compiled for the old
    schemas or decompositions (seen: a cached call passing a renamed keyword failed at run time).
    The patch rides in ``compile_fx``'s config patches, which the lazily compiled backward applies too.
    """
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    inner = patches.get("post_grad_custom_post_pass", config.post_grad_custom_post_pass)

    class _SourceKey(CustomGraphPass):
        def __call__(self, graph: Any) -> None:
            if inner is not None:
                inner(graph)

        def uuid(self) -> Any:
            theirs = None if inner is None else getattr(inner, "uuid", lambda: None)()
            if inner is not None and theirs is None:
                return None  # their pass has no key: Inductor bypasses the cache, as it would without us
            return key, theirs

    return {**patches, "post_grad_custom_post_pass": _SourceKey()}


def aot_eager_compile(gm: Any, example_inputs: list[Any], patches: dict[str, Any]) -> Any:
    """AOTAutograd without Inductor (``torch._dynamo.backends.debugging.aot_eager``), under the Inductor
    config ``patches`` (the decompositions AOTAutograd traces read that config too); a
    ``custom_partitioner_fn`` there becomes AOTAutograd's partition function, as Inductor would use it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop
    from torch._inductor import config

    patches = dict(patches)
    partitioner = patches.pop("custom_partitioner_fn", None)
    with config.patch(patches):
        if partitioner is None:
            return aot_eager(gm, example_inputs)
        return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partitioner,
                            keep_inference_input_mutations=True)(gm, example_inputs)


def partition_only(gm: Any, example_inputs: list[Any], partitioner: Any, decompositions: dict[Any, Any]) -> None:
    """Trace ``gm``'s joint graph with ``decompositions`` and partition it as Inductor would (its joint-graph
    passes, then ``partitioner`` as ``custom_partitioner_fn``), compiling nothing
    (``torch._dynamo.backends.common.aot_autograd``, ``torch._inductor.compile_fx.partition_fn``)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor import config
    from torch._inductor.compile_fx import partition_fn

    with config.patch(custom_partitioner_fn=partitioner):
        aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition_fn,
                     decompositions=decompositions)(gm, example_inputs)


def min_cut_partition(gm: Any, joint_inputs: Any, **kwargs: Any) -> Any:
    """The min-cut partitioner Inductor runs by default (``torch._functorch.partitioners``)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)


def user_partitioner(patches: dict[str, Any]) -> Any:
    """The ``custom_partitioner_fn`` Inductor would use under ``patches`` (None: min-cut)."""
    from torch._inductor import config

    return patches.get("custom_partitioner_fn", config.custom_partitioner_fn)


def explain_backend(backend: Any) -> Any:
    """A Dynamo backend that runs ``backend`` and collects graph-break reasons in ``.break_reasons``
    (``torch._dynamo.backends.debugging.ExplainWithBackend``)."""
    from torch._dynamo.backends.debugging import ExplainWithBackend

    return ExplainWithBackend(backend)


def fake_mode_of(value: Any) -> Any:
    """The FakeTensorMode of a fake tensor (``torch._subclasses.FakeTensor``), else None."""
    return value.fake_mode if isinstance(value, torch._subclasses.FakeTensor) else None


def observe_pass(gm: Any, name: str) -> Any:
    """A context that records ``gm`` before and after a pass for ``TORCH_LOGS``/tlparse and Inductor's
    provenance tracking (``torch.fx.passes.graph_transform_observer``, not covered by torch's BC policy)."""
    from torch.fx.passes.graph_transform_observer import GraphTransformObserver

    return GraphTransformObserver(gm, name)


def artifact_logger(module: str, artifact: str) -> Any:
    """The logger of a registered ``TORCH_LOGS`` artifact (``torch._logging.getArtifactLogger``)."""
    return torch._logging.getArtifactLogger(module, artifact)


def trace_artifact(name: str, payload: Any) -> None:
    """A string artifact for ``TORCH_TRACE`` / tlparse, next to the compile's own (``torch._logging.trace_structured``);
    ``payload`` is called only when tracing is on."""
    torch._logging.trace_structured(
        "artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload
    )


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


def dynamo_seen_codes() -> list[types.CodeType]:
    """The live code objects Dynamo's frame hook has processed since its last reset: the only ones that can
    carry its cache entries or frame state (``torch._dynamo.convert_frame.input_codes``, weak references)."""
    from torch._dynamo import convert_frame

    return [code for ref in list(convert_frame.input_codes.seen) if (code := ref()) is not None]


def cache_entries(code: types.CodeType) -> list[Any]:
    """Dynamo's cache entries on ``code``, every isolate region
    (``torch._C._dynamo.eval_frame._debug_get_cache_entry_list``)."""
    return list(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code))


def cache_entry_count(code: types.CodeType) -> int:
    """How many compiled entries Dynamo keeps on ``code``: cache entries of every region, which all count
    towards ``accumulated_recompile_limit``, plus precompile entries (``torch._C._dynamo.eval_frame``)."""
    frames = torch._C._dynamo.eval_frame
    return frames._get_total_cache_entry_count(code) + len(frames._debug_get_precompile_entries(code))


def forget_code(code: types.CodeType) -> None:
    """Drop everything Dynamo keeps on ``code`` (entries, frame state, skip marks), as if it never ran it
    (``torch._C._dynamo.eval_frame.reset_code``, what ``torch._dynamo.reset`` does per code object)."""
    torch._C._dynamo.eval_frame.reset_code(code)


def dynamo_compile_state() -> tuple[Any, ...]:
    """What a compile moves in Dynamo's module state besides code objects: the frame id counters that
    number later compiles (``torch._dynamo.convert_frame.FRAME_COUNTER``/``FRAME_COMPILE_COUNTER``, which
    our salts read through the compile id) and the backends it keeps alive until ``torch._dynamo.reset``
    (``torch._dynamo.eval_frame.cached_backends``)."""
    from torch._dynamo import convert_frame, eval_frame

    return (convert_frame.FRAME_COUNTER, dict(convert_frame.FRAME_COMPILE_COUNTER),
            dict(eval_frame.cached_backends))


def restore_dynamo_compile_state(state: tuple[Any, ...]) -> None:
    """Put back what :func:`dynamo_compile_state` returned."""
    from torch._dynamo import convert_frame, eval_frame

    counter, compile_counts, backends = state
    convert_frame.FRAME_COUNTER = counter
    convert_frame.FRAME_COMPILE_COUNTER.clear()
    convert_frame.FRAME_COMPILE_COUNTER.update(compile_counts)
    eval_frame.cached_backends.clear()
    eval_frame.cached_backends.update(backends)


#: ``torch.manual_seed`` calls counted since :func:`manual_seed_count` first ran.
_manual_seeds = 0


def manual_seed_count() -> int:
    """How many times ``torch.manual_seed`` has run (whatever its values) since this was first called.

    torch has no hook for it, and re-seeding a generator with the value it had may leave it in the very
    state it was in, so the count comes from wrapping ``torch.random._manual_seed_impl`` once: the public
    ``torch.manual_seed`` (and ``torch.random.manual_seed``, Lightning's ``seed_everything``, Hugging Face's
    ``set_seed``) looks that name up on every call, so callers that imported it earlier are counted too and
    its identity, which Dynamo's trace rules key on, is unchanged. A generator's own ``manual_seed`` method
    is not counted.
    """
    import torch.random

    impl = torch.random._manual_seed_impl
    if not getattr(impl, "_pamm_counted", False):

        @functools.wraps(impl)
        def counted(seed: Any) -> Any:
            global _manual_seeds
            out = impl(seed)
            _manual_seeds += 1
            return out

        counted._pamm_counted = True  # type: ignore[attr-defined]
        torch.random._manual_seed_impl = counted
    return _manual_seeds
