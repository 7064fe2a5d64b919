"""``hybridep``: DeepEP's HybridEP ``HybridEPBuffer`` (branch ``hybrid-ep``), permute fused in.

  backend.py: the backend (``HybridEPBackend``) and its handle; its docstring lists the
              ``backend_options``;
  buffer.py:  the library's buffers, owned per process group, and the version-tolerant
              calls into ``dispatch_with_permute`` / ``combine_with_unpermute`` (shared
              with the seed API ``moe_dispatch.fused_a2a``).
"""
from .backend import HybridEPBackend, HybridEPHandle

__all__ = ["HybridEPBackend", "HybridEPHandle"]
