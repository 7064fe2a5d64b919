"""The registry: the only place that lists backends.

Backends are imported lazily by name, so an optional dependency (deep_ep, uccl, ...) is
touched only when its backend is asked for. Asking for a backend that cannot run here
raises ``BackendUnavailableError`` with a one-line reason; there is never a silent
fallback to another backend.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

_BACKENDS: Dict[str, str] = {
    "alltoall": "moe_dispatch.backends.alltoall:AllToAllBackend",
    "allgather": "moe_dispatch.backends.allgather:AllGatherBackend",
    "deepep": "moe_dispatch.backends.deepep:DeepEPBackend",
    "hybridep": "moe_dispatch.backends.hybridep:HybridEPBackend",
    "uccl": "moe_dispatch.backends.uccl:UCCLBackend",
    "nvshmem": "moe_dispatch.backends.nvshmem:NVSHMEMBackend",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""


def register_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"package.module:ClassName"`` (for out-of-tree backends)."""
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:Class', got {target!r}")
    if name == "auto":
        raise ValueError("'auto' is reserved for automatic backend choice")
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return list(_BACKENDS)


def _load(name: str):
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {sorted(_BACKENDS) + ['auto']}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_backend_class(name: str):
    """The backend class for ``name``; raises if it is unknown or unavailable here."""
    cls = _load(name)
    reason = cls.availability()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return cls


def available_backends() -> Dict[str, str]:
    """name -> "available" or the reason it is not (checked on this machine, now)."""
    out: Dict[str, str] = {}
    for name in _BACKENDS:
        try:
            reason: Optional[str] = _load(name).availability()
        except Exception as exc:  # a broken optional install must not break the listing
            reason = f"failed to load: {type(exc).__name__}: {exc}"
        out[name] = "available" if reason is None else reason
    return out
