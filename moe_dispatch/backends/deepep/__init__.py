"""``deepep``: DeepEP V1 ``Buffer`` in normal (high-throughput) mode.

Needs the ``deep_ep`` package (DeepEP V1, e.g. tag v1.2.1 built from source) and CUDA GPUs
joined by NVLink; EP sizes 2, 4, 8 within a node (multiples of 8 across nodes with an
NVSHMEM build). The mechanics are shared with ``uccl`` in ``moe_dispatch.backends.deepep.v1``;
buffers are owned per process group in ``moe_dispatch.backends.deepep.buffer`` and released with
``moe_dispatch.fused_a2a.free_buffer()`` (or ``backend.free_buffer()``) on every rank
before ``destroy_process_group``.

Budget mode (``MoETokenDispatcher(..., max_rows_per_rank=B)``): DeepEP's sync-free
``num_worst_tokens`` dispatch, intranode only (EP 2, 4 or 8 on one host); see
``budget_mode.py``.

Files: ``v1.py`` (the backend, shared with ``uccl``), ``budget_mode.py`` (what the budget
mode adds: the worst-case receive size and the flag rows), ``buffer.py`` (buffers and the
library calls).

backend_options: ``num_sms`` (even int), ``async_finish`` (bool),
``allocate_on_comm_stream`` (bool, needs async_finish), ``max_tokens_per_rank`` (budget
mode). See ``V1Backend``.
"""
from __future__ import annotations

from .v1 import V1Backend, V1Handle
from .buffer import DEEP_EP

__all__ = ["DeepEPBackend", "V1Handle"]


class DeepEPBackend(V1Backend):
    name = "deepep"
    library = DEEP_EP
