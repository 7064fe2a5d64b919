"""Helpers shared by the library backends (``deepep``, ``uccl``, ``hybridep``).

Nothing here imports an optional library. ``agree`` is the one small exchange these
backends run before touching the library: it settles the dispatch's ``PendingCheck``
(every rank raises together on bad input) and, in the same all-gather, learns the few
host integers the library needs to be equal across ranks (hidden size, top-k width,
token count). One collective and one host sync, the same cost as ``PendingCheck.settle``.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Sequence

import torch

from ..routing import pad_topk  # noqa: F401  (re-exported for the EP backends)

from .. import comm
from ..protocol import DispatchInputError, PendingCheck


def agree(check: PendingCheck, group, device: torch.device, ints: Sequence[int]
          ) -> List[List[int]]:
    """All-gather ``[check code, *ints]`` over ``group``; raise on every rank if any rank's
    check failed; return the gathered ``ints`` as host lists, one row per rank."""
    code = check.code(device).reshape(1).to(torch.int64)
    msg = torch.cat([code, comm.ints_on(list(ints), code.device)])
    if comm.group_size(group) == 1:
        rows = [msg.tolist()]
    else:
        rows = comm.gather_ints(msg, group).tolist()  # the host sync
    check.raise_if_failed([r[0] for r in rows], comm.group_rank(group))
    return [r[1:] for r in rows]


def require_equal(rows: List[List[int]], col: int, what: str) -> int:
    vals = [r[col] for r in rows]
    if any(v != vals[0] for v in vals):
        raise DispatchInputError(f"dispatch: {what} differs across EP ranks: {vals}")
    return vals[0]


def import_optional(module: str, hint: str):
    """Import ``module`` or raise ``ImportError`` whose message says what to install."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken CUDA extension (OSError, ...)
        raise ImportError(f"{module} is not importable ({type(exc).__name__}: {exc}); {hint}") \
            from exc


def cuda_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "needs CUDA GPUs (torch.cuda.is_available() is False)"
    return None


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m

