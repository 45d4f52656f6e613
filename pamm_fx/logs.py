"""Our logs inside torch's logging system (the ``torch._logging`` internals it needs are in ``_compat``).

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

Graphs also go to torch's structured trace as ``pamm_before_graph`` /
``pamm_after_graph`` artifacts, so ``TORCH_TRACE=dir`` + ``tlparse`` shows them next to
Inductor's graphs of the same compile id.
"""

from __future__ import annotations

import logging
import os

from torch import fx

from pamm_fx import _compat
from pamm_fx.names import BACKEND

__all__ = ["ALIAS", "ARTIFACT", "ENV_VAR", "configure_from_env", "log_graphs"]

ALIAS = BACKEND
ARTIFACT = "pamm_graphs"
ENV_VAR = "PAMM_LOGS"

log = logging.getLogger(__name__)


def _register() -> logging.Logger:
    _compat.register_log_alias(ALIAS, ["pamm_fx"], ARTIFACT, "pamm-fx graphs before and after the rewrite")
    return _compat.artifact_logger("pamm_fx", ARTIFACT)


graph_log = _register()


def configure_from_env() -> None:
    """Apply ``PAMM_LOGS`` as if its names had been appended to ``TORCH_LOGS``."""
    settings = os.environ.get(ENV_VAR, "").strip()
    if settings and not _compat.init_logs_with(settings):
        log.warning("%s=%r is not valid; use e.g. %s='+%s' or '%s'", ENV_VAR, settings, ENV_VAR, ALIAS, ARTIFACT)


def log_graphs(before: fx.GraphModule, after: fx.GraphModule | None) -> None:
    """The graph as Dynamo gave it and as we rewrote it: DEBUG artifact log and tlparse artifacts."""
    if graph_log.isEnabledFor(logging.DEBUG):
        graph_log.debug("pamm graph before rewrite:\n%s", before.print_readable(print_output=False))
        if after is not None:
            graph_log.debug("pamm graph after rewrite:\n%s", after.print_readable(print_output=False))
    _compat.trace_artifact("pamm_before_graph", lambda: before.print_readable(print_output=False))
    if after is not None:
        _compat.trace_artifact("pamm_after_graph", lambda: after.print_readable(print_output=False))


configure_from_env()
