"""Kernel selection: one entry per PAMM primitive, dispatched by device.

The ops in :mod:`pamm_fx.ops` call only these functions, so a faster kernel for
a device plugs in here without touching the ops, the graph or user code.
"""

from pamm_fx.kernels.reference import assign, contract

__all__ = ["assign", "contract"]
