"""``deepep``: DeepEP V1 ``Buffer`` in normal (high-throughput) mode.

Needs the ``deep_ep`` package (DeepEP V1, e.g. tag v1.2.1 built from source) and CUDA GPUs
joined by NVLink; EP sizes 2, 4, 8 within a node (multiples of 8 across nodes with an
NVSHMEM build). The mechanics are shared with ``uccl`` in ``moe_dispatch.v1_backend``;
buffers are owned per process group in ``moe_dispatch.v1_buffer`` and released with
``moe_dispatch.fused_a2a.free_buffer()`` (or ``backend.free_buffer()``) on every rank
before ``destroy_process_group``.

backend_options: ``num_sms`` (even int), ``async_finish`` (bool),
``allocate_on_comm_stream`` (bool, needs async_finish). See ``V1Backend``.
"""
from __future__ import annotations

from ..v1_backend import V1Backend, V1Handle
from ..v1_buffer import DEEP_EP

__all__ = ["DeepEPBackend", "V1Handle"]


class DeepEPBackend(V1Backend):
    name = "deepep"
    library = DEEP_EP
