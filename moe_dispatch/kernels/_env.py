"""Reading the project's environment switches on the dispatch path, cheaply and live.

``os.environ.get`` costs the host ~2 µs per call (it encodes the key on every read), as much
as allocating a tensor; the dispatch path reads its switches (``MOE_DISPATCH_TRITON``, the
launch cache, tile overrides) a few dozen times per call. ``get`` reads the same live
mapping without re-encoding the key (~0.1 µs), so a value set at run time (tests, the
benchmarks' A/B switches) is still seen by the next call. No import of the package.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

# CPython on POSIX keeps the environment as a dict of encoded keys and values behind
# os.environ (``_data``), updated by every os.environ write; elsewhere use the mapping.
_DATA = getattr(os.environ, "_data", None)
_FAST = os.name == "posix" and isinstance(_DATA, dict)
_KEYS: Dict[str, bytes] = {}


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, live, without the per-call key encoding.

    name:    the variable's name (ASCII).
    default: returned when the variable is unset.
    """
    if not _FAST:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = _DATA.get(key)
    return default if value is None else os.fsdecode(value)
