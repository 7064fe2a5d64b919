"""Modules users touch: the token dispatcher, router, experts, MoE layer and training."""
from .dispatcher import DispatchHandle, DispatchOutput, MoETokenDispatcher

__all__ = ["MoETokenDispatcher", "DispatchOutput", "DispatchHandle"]
