"""``nvshmem``: our fused dispatch/combine over torch symmetric memory (NVLink peer pointers).

The whole backend lives in this folder:
  engine.py:      the backend (``NVSHMEMBackend``), its handle, the dispatch/combine engine
                  and its autograd functions; the module docstring describes both modes and
                  every ``backend_options`` key;
  symm_memory.py: the symmetric buffer: transports (torch symmetric memory, or a local
                  stand-in for simulated ranks in tests) and the arena of staging buffers;
  graph.py:       the default mode's two CUDA graphs around its one host sync.
Imports run one way: engine -> graph -> symm_memory.
"""
from .engine import (STATUS_BAD_INPUT, STATUS_BARRIER_TIMEOUT, STATUS_ROWS_DROPPED,
                     STATUS_TOKENS_DROPPED, NVSHMEMBackend, NVSHMEMHandle)

__all__ = ["NVSHMEMBackend", "NVSHMEMHandle", "STATUS_ROWS_DROPPED", "STATUS_TOKENS_DROPPED",
           "STATUS_BAD_INPUT", "STATUS_BARRIER_TIMEOUT"]
