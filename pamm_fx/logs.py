"""Our logs inside torch's logging system; the one module that touches ``torch._logging`` internals.

What torch allows (checked on torch 2.13):

* ``TORCH_LOGS="+pamm_fx"`` works out of the box: any importable module name is a
  valid setting, so our loggers (``pamm_fx.*``) print INFO (matches and skips) and,
  with ``+``, DEBUG (graphs), with torch's formatting.
* ``TORCH_LOGS="+pamm"`` cannot work: torch parses ``TORCH_LOGS`` while
  ``import torch`` runs, before any other package can call ``register_log``, and an
  unknown name makes ``import torch`` raise. Setting it in ``os.environ`` later would
  also break Inductor's compile subprocesses, which re-import torch.
* So we register the alias ``pamm`` and the artifact ``pamm_graphs`` (for
  ``torch._logging.set_logs(modules={"pamm": logging.DEBUG})``), and read our own
  ``PAMM_LOGS`` in the same syntax: ``PAMM_LOGS="+pamm"`` (INFO and graphs),
  ``PAMM_LOGS="pamm"`` (INFO), ``PAMM_LOGS="pamm_graphs"`` (graphs only).

Graphs also go to ``torch._logging.trace_structured`` as ``pamm_before_graph`` /
``pamm_after_graph`` artifacts, so ``TORCH_TRACE=dir`` + ``tlparse`` shows them next to
Inductor's graphs of the same compile id.
"""

from __future__ import annotations

import logging
import os

import torch
import torch._logging
from torch import fx

__all__ = ["ALIAS", "ARTIFACT", "ENV_VAR", "configure_from_env", "log_graphs"]

ALIAS = "pamm"
ARTIFACT = "pamm_graphs"
ENV_VAR = "PAMM_LOGS"

log = logging.getLogger(__name__)


def _register() -> logging.Logger:
    from torch._logging import _internal

    if not _internal.log_registry.is_log(ALIAS):
        _internal.register_log(ALIAS, ["pamm_fx"])
    if not _internal.log_registry.is_artifact(ARTIFACT):
        _internal.register_artifact(ARTIFACT, "pamm-fx graphs before and after the QKV rewrite")
    return torch._logging.getArtifactLogger("pamm_fx", ARTIFACT)


graph_log = _register()


def configure_from_env() -> None:
    """Apply ``PAMM_LOGS`` as if its names had been appended to ``TORCH_LOGS``."""
    from torch._logging import _internal

    settings = os.environ.get(ENV_VAR, "").strip()
    if not settings:
        return
    torch_settings = os.environ.get(_internal.LOG_ENV_VAR)
    merged = f"{torch_settings},{settings}" if torch_settings else settings
    try:
        _internal._parse_log_settings(merged)
    except ValueError:
        log.warning("%s=%r is not valid; use e.g. %s='+%s' or '%s'", ENV_VAR, settings, ENV_VAR, ALIAS, ARTIFACT)
        return
    # _init_logs reads its settings from TORCH_LOGS only; show it the merged string for this one call.
    os.environ[_internal.LOG_ENV_VAR] = merged
    try:
        _internal._init_logs()
    finally:
        if torch_settings is None:
            del os.environ[_internal.LOG_ENV_VAR]
        else:
            os.environ[_internal.LOG_ENV_VAR] = torch_settings


def log_graphs(before: fx.GraphModule, after: fx.GraphModule | None) -> None:
    """The graph as Dynamo gave it and as we rewrote it: DEBUG artifact log and tlparse artifacts."""
    if graph_log.isEnabledFor(logging.DEBUG):
        graph_log.debug("pamm graph before rewrite:\n%s", before.print_readable(print_output=False))
        if after is not None:
            graph_log.debug("pamm graph after rewrite:\n%s", after.print_readable(print_output=False))
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "pamm_before_graph", "encoding": "string"},
        payload_fn=lambda: before.print_readable(print_output=False),
    )
    if after is not None:
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "pamm_after_graph", "encoding": "string"},
            payload_fn=lambda: after.print_readable(print_output=False),
        )


configure_from_env()
