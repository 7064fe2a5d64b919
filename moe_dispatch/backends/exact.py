"""What the collective backends (``alltoall``, ``allgather``) share in the exact mode.

The exact mode syncs the host once per dispatch, after the ranks exchange a small int64
routing message (sizes, per-expert counts, validation code, H, K). ``route_message`` builds
that message in one launch on CUDA (``kernels/_route.py``; the torch code below is the
reference and the CPU path) and ``read_messages`` brings the exchanged tables to the host
in one device-to-host copy.

Message row (``4 + L`` ints, one per destination rank):
    [a, code, H, K, count of local expert 0 of that rank, ..., count of local expert L-1]
``a``: tokens with at least one expert on that rank (``per_rank``), or T (one row over
all E experts: the all-gather's form, L = E).
"""
from __future__ import annotations

from typing import List

import torch

from .. import kernels
from ..routing import rank_mask

HEAD = 4  # a, code, H, K


def route_message(idx_TK: torch.Tensor, code: torch.Tensor, num_experts: int,
                  num_local: int, hidden: int, per_rank: bool) -> torch.Tensor:
    """The routing message of this rank (module doc), on the device of ``idx_TK``.

    idx_TK:      [T, K] int64 global expert ids; -1 masked; invalid ids count nowhere (the
                 validation ``code`` reports them).
    code:        0-dim int64 validation code on the same device (0 = fine).
    num_experts: E.  num_local: L (experts per rank; E for the all-gather form).
    hidden:      H, written into every row.
    per_rank:    rows per destination rank with its token count (all-to-all), else one
                 row with T (all-gather).
    Returns int64 [E / L, 4 + L] (per_rank) or [4 + E].
    """
    E, L = num_experts, num_local
    rows = E // L if per_rank else 1
    dev = idx_TK.device
    if kernels.use_triton(idx_TK):
        msg = torch.empty(rows, HEAD + L, dtype=torch.int64, device=dev)
        kernels.route_counts(idx_TK.contiguous(), code, msg, num_experts=E, num_local=L,
                             hidden=hidden, per_rank=per_rank)
        return msg if per_rank else msg.view(-1)
    T, K = idx_TK.shape
    ok_TK = (idx_TK >= 0) & (idx_TK < E)
    key = torch.where(ok_TK, idx_TK, E).reshape(-1)
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    if per_rank:
        first = rank_mask(idx_TK, E, L).sum(0, dtype=torch.long)
    else:
        first = torch.full((rows,), T, dtype=torch.long, device=dev)
    head = torch.stack([first, code.to(dev).expand(rows),
                        torch.full((rows,), hidden, dtype=torch.long, device=dev),
                        torch.full((rows,), K, dtype=torch.long, device=dev)], 1)
    msg = torch.cat([head, counts[:E].view(rows, L)], 1)
    return msg if per_rank else msg.view(-1)


def read_messages(*tables: torch.Tensor) -> List[list]:
    """The tables as host lists (rows of lists for 2-D tables), in one device-to-host copy:
    the dispatch's host sync. A table passed twice (a group of one exchanges nothing, so the
    received table is the sent one) is read once."""
    unique = list({id(t): t for t in tables}.values())
    if len({u.device for u in unique}) == 1:
        flat = (torch.cat([u.reshape(-1) for u in unique]) if len(unique) > 1
                else unique[0].reshape(-1)).tolist()
    else:  # e.g. gloo's tables on the CPU beside a CUDA message
        flat = [v for u in unique for v in u.reshape(-1).tolist()]
    rows, start = {}, 0
    for u in unique:
        vals, w = flat[start:start + u.numel()], u.shape[-1]
        start += u.numel()
        rows[id(u)] = [vals[i:i + w] for i in range(0, len(vals), w)] if u.dim() > 1 else vals
    return [rows[id(t)] for t in tables]
