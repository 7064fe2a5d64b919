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
        rank_TK = torch.where(ok_TK, torch.div(idx_TK, L, rounding_mode="floor"), rows)
        mask_TR = torch.zeros(T, rows + 1, dtype=torch.bool, device=dev)
        mask_TR.scatter_(1, rank_TK, True)
        first = mask_TR[:, :rows].sum(0, dtype=torch.long)
    else:
        first = torch.full((rows,), T, dtype=torch.long, device=dev)
    head = torch.stack([first, code.to(dev).expand(rows),
                        torch.full((rows,), hidden, dtype=torch.long, device=dev),
                        torch.full((rows,), K, dtype=torch.long, device=dev)], 1)
    msg = torch.cat([head, counts[:E].view(rows, L)], 1)
    return msg if per_rank else msg.view(-1)


def read_messages(*tables: torch.Tensor) -> List[list]:
    """The tables as host lists, in one device-to-host copy (the dispatch's host sync).
    Tables that are the same tensor (a group of one exchanges nothing) are read once."""
    unique = []
    for t in tables:
        if not any(t is u for u in unique):
            unique.append(t)
    if len({u.device for u in unique}) == 1:
        flat = torch.cat([u.reshape(-1) for u in unique]).tolist() if len(unique) > 1 \
            else unique[0].reshape(-1).tolist()
    else:  # e.g. gloo's tables on the CPU beside a CUDA message
        flat = [v for u in unique for v in u.reshape(-1).tolist()]
    out, offs = [], {}
    start = 0
    for u in unique:
        offs[id(u)] = start
        start += u.numel()
    for t in tables:
        s = offs[id(t)]
        vals = flat[s:s + t.numel()]
        width = t.shape[-1]
        out.append([vals[i:i + width] for i in range(0, len(vals), width)] if t.dim() > 1
                   else vals)
    return out
