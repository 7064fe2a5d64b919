"""``uccl``: UCCL-EP's DeepEP-V1-compatible ``Buffer`` (normal mode).

UCCL-EP replaces DeepEP's NVSHMEM/IBGDA transport by CPU proxies over RDMA verbs, keeping
DeepEP V1's Python API, so this backend is the ``deepep`` adapter pointed at UCCL's
``Buffer`` (``moe_dispatch.backends.deepep.v1``). When the whole EP group is on one host the
buffer is made with ``is_intranode=True`` and no RDMA bytes (NVLink only).

UCCL's PyPI wheel (``uccl`` 0.1.1) ships only the native runtime ``uccl.ep``; the
DeepEP-compatible Python ``Buffer`` lives in UCCL's source (``ep/bench/buffer.py`` +
``utils.py``, packaged upstream as ``ep/deep_ep_wrapper``). Point
``$MOE_DISPATCH_UCCL_MODULE`` at that package (its directory, or a module name on
``sys.path``) and it is the only place the Buffer is taken from.

The budget mode (``max_rows_per_rank``) is ``deepep``'s (UCCL's Buffer keeps DeepEP's
``num_worst_tokens``), and like it needs the whole EP group on one host.

If UCCL-EP is missing this backend is unavailable, with the reason: it never runs DeepEP
in its place. ``backend_options={"buffer_module": "deep_ep"}`` points the same adapter at
another module's V1 ``Buffer`` explicitly (used to prove the adapter on GPUs where UCCL
itself cannot load); buffers are then owned under that module's name.

backend_options: ``num_sms``, ``async_finish``, ``allocate_on_comm_stream``,
``max_tokens_per_rank`` (budget mode) as for ``deepep``, and ``buffer_module`` (str, default: ``$MOE_DISPATCH_UCCL_MODULE``, else
``uccl.ep.buffer`` / ``uccl.ep``).
"""
from __future__ import annotations

from .deepep.v1 import V1Backend, V1Handle
from .deepep.buffer import UCCL, V1Library, library_for_module

__all__ = ["UCCLBackend", "V1Handle"]


class UCCLBackend(V1Backend):
    name = "uccl"
    library = UCCL

    def _library(self, opts) -> V1Library:
        module = opts.get("buffer_module")
        if module is None:
            return UCCL
        if not isinstance(module, str):
            raise TypeError(f"uccl: buffer_module must be a module name (str), got {module!r}")
        return library_for_module(module)

    def _option_names(self):
        return {"num_sms", "async_finish", "allocate_on_comm_stream", "buffer_module",
                "max_tokens_per_rank"}
