"""moe-dispatch engine: routing formats, permutation, and one module per backend."""
from .permute import GroupPlan, group_plan, permute, unpermute
from .protocol import Backend, BackendConfig, DispatchInputError, DispatchResult, PendingCheck
from .registry import (BackendUnavailableError, available_backends, backend_names,
                       get_backend_class, register_backend)
from .routing import apply_capacity, dense_to_topk, expert_capacity, topk_to_dense

__all__ = [
    "Backend", "BackendConfig", "DispatchResult", "PendingCheck", "DispatchInputError",
    "BackendUnavailableError", "available_backends", "backend_names", "get_backend_class",
    "register_backend", "GroupPlan", "group_plan", "permute", "unpermute",
    "topk_to_dense", "dense_to_topk", "apply_capacity", "expert_capacity",
]
