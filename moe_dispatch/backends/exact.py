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

After the sync every size is a host int, and the rest is device work: the metadata rows
that travel beside the tokens (``[id + 1 (K, as float32, exact below 2**24; 0 = masked),
probs (K)]``, the budget mode's row encoding) and the two plans. On CUDA with triton
(``fused``, the budget mode's decision) they run as the budget mode's fused kernels:
``pack_rows`` is one launch for the send plan and the packed metadata rows of ``alltoall``
(``kernels.pack_rows``), ``receive_plan`` two for the receiver's grouping
(``kernels.budget_arrays`` with the budget set to the exact padded row count, so nothing
drops and the order is the exact plan's), giving ``BudgetPlan``s with every map on the
device. Otherwise (CPU, ``MOE_DISPATCH_TRITON=0``) the torch code below builds
``GroupPlan``s: the reference, with the same rows, plans' maps and results bit for bit.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import kernels
from ..permute import BudgetPlan, group_plan, pad_counts, permute
from ..routing import bad_probs, rank_mask

HEAD = 4  # a, code, H, K


def route_message(idx_TK: torch.Tensor, code: torch.Tensor, num_experts: int,
                  num_local: int, hidden: int, per_rank: bool,
                  probs_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routing message of this rank (module doc), on the device of ``idx_TK``.

    idx_TK:      [T, K] int64 global expert ids; -1 masked; invalid ids count nowhere (the
                 validation ``code`` reports them).
    code:        0-dim int64 validation code on the same device (0 = fine).
    probs_TK:    [T, K] float32 probs to value-check here with the ids (the dispatcher
                 left the check to this message: ``PendingCheck.in_message``): the code
                 sent is max(code, 1) when an id is outside [-1, E) or a prob is NaN,
                 infinite or negative. None: ``code`` as given.
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
                             hidden=hidden, per_rank=per_rank,
                             probs_TK=None if probs_TK is None else probs_TK.contiguous())
        return msg if per_rank else msg.view(-1)
    if probs_TK is not None:
        bad = ((idx_TK < -1) | (idx_TK >= E)).any() | bad_probs(probs_TK)
        code = torch.maximum(code.to(dev), bad.to(torch.int64))
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
    return read_tables(*tables)[0]


def read_tables(*tables: torch.Tensor) -> Tuple[List[list], List[torch.Tensor]]:
    """``read_messages``, and the same tables as CPU tensors (views of the one host copy),
    for the host work that is cheaper in torch than in Python loops (``expert_counts``)."""
    unique = list({id(t): t for t in tables}.values())
    if len(unique) == 1:
        flat_t = unique[0].reshape(-1).to("cpu")  # the sync (no copy for a CPU table)
    elif len({u.device for u in unique}) == 1:  # joined where they are: one copy, one sync
        flat_t = torch.cat([u.reshape(-1) for u in unique]).to("cpu")
    else:  # e.g. gloo's tables on the CPU beside a CUDA message
        flat_t = torch.cat([u.reshape(-1).to("cpu") for u in unique])
    flat = flat_t.tolist()
    rows, host, start = {}, {}, 0
    for u in unique:
        vals, w = flat[start:start + u.numel()], u.shape[-1]
        # (A tensor slice + view costs the host ~9 µs here; one table needs no slice.)
        host[id(u)] = flat_t.view(u.shape) if len(unique) == 1 else \
            flat_t[start:start + u.numel()].view(u.shape)
        start += u.numel()
        rows[id(u)] = [vals[i:i + w] for i in range(0, len(vals), w)] if u.dim() > 1 else vals
    return [rows[id(t)] for t in tables], [host[id(t)] for t in tables]


def expert_counts(table_RC: torch.Tensor, first: int, num_local: int,
                  pad_multiple: Optional[int]) -> Tuple[List[int], torch.Tensor]:
    """Rows per local expert over every source's message row.

    table_RC:     [R, C] int64 CPU tensor, the received message rows (``read_tables``).
    first:        column of this rank's first local expert's count.
    num_local:    L.
    pad_multiple: each expert's rows padded to a multiple of this (None / 1: none).
    Returns (counts as host ints [L], the padded counts as a CPU int64 tensor [L]: the
    dispatch's ``tokens_per_expert``). In torch on the CPU: at L = 256 the Python loops over
    the columns and ``torch.tensor`` of the list cost the host 80-100 µs, this 10-14 µs
    (``benchmarks/scripts/host_bookkeeping.py`` on the development CPU).
    """
    counts_L = table_RC[:, first:first + num_local].sum(0)
    pad = pad_multiple or 1
    padded_L = counts_L if pad <= 1 else (counts_L + (pad - 1)).div_(pad, rounding_mode="floor") \
        .mul_(pad)
    return counts_L.tolist(), padded_L


def pack_rows(idx_TK: torch.Tensor, probs_TK: torch.Tensor, num_experts: int, num_local: int,
              send_splits: Sequence[int], fused: Optional[bool] = None):
    """``alltoall``'s send side after the sync: the grouping of the T tokens by destination
    rank (rank-major, token ascending: the send buffer of ``all_to_all_single``) and the
    metadata rows in that order. No host sync.

    idx_TK:      [T, K] int64 global expert ids, -1 masked (validated: no other id outside
                 [0, E)).
    probs_TK:    [T, K] float32 probs (differentiable: the rows carry their gradient).
    num_experts, num_local: E and L (expert e lives on rank e // L; R = E / L).
    send_splits: tokens sent to each rank (host ints, len R), from the routing message.
    fused:       the fused kernel (True) or the torch reference (False); None:
                 ``kernels.use_triton(idx_TK)``.
    Returns (send_plan, meta_SW [S, 2K] float32 rows ``[id + 1, probs]``, S =
    sum(send_splits)): ``send_plan`` maps token t to its row of each rank it goes to, a
    ``BudgetPlan`` of S rows (fused) or a ``GroupPlan`` (the same maps).
    """
    E, L, T = num_experts, num_local, idx_TK.shape[0]
    R = E // L
    if fused if fused is not None else kernels.use_triton(idx_TK):
        meta_SW, (pos_TR, _, counts_R, dropped) = kernels.pack_rows(
            idx_TK, probs_TK, E, L, sum(send_splits))
        # Every send row is real: no row mask, so the send permute zero-fills nothing.
        return BudgetPlan(pos_TR, None, meta_SW.shape[0], T, R, counts_R, dropped), meta_SW
    dev = idx_TK.device
    lid_TR = torch.where(rank_mask(idx_TK, E, L), torch.arange(R, device=dev), -1)
    send_plan = group_plan(lid_TR, R, send_splits)
    # The rows are permuted with the plan of the tokens (a row gather, no index map).
    meta_SW, _ = permute(torch.cat([(idx_TK + 1).to(torch.float32), probs_TK], dim=1), None,
                         send_plan)
    return send_plan, meta_SW


def gather_meta(idx_TK: torch.Tensor, probs_TK: torch.Tensor, code: torch.Tensor, rows: int,
                fused: Optional[bool] = None) -> torch.Tensor:
    """``allgather``'s metadata rows after the sync. No host sync.

    idx_TK:   [T, K] int64 global expert ids, -1 masked (validated: no other id outside
              [0, E)).
    probs_TK: [T, K] float32 probs (differentiable: the rows carry their gradient).
    code:     0-dim int device tensor (written into the fused kernel's header row, unused).
    rows:     T_max >= T, the most tokens any rank has (each rank gathers as many rows).
    fused:    the budget mode's pack kernel (one launch, its header row left off) or the
              torch reference (three ops); None: ``kernels.use_triton(idx_TK)``.
    Returns meta_RW [rows, 2K] float32: row t ``[id + 1 (0 = masked), probs]`` of token t,
    zero rows past T (they route nowhere); contiguous.
    """
    if fused if fused is not None else kernels.use_triton(idx_TK):
        # One block, token t on row t (E = L = 1 stand in, unread), then its header row.
        meta, _ = kernels.pack_meta(idx_TK, probs_TK, code, False, 1, 1, 1, rows, False)
        return meta[0, :rows]
    meta_TW = torch.cat([(idx_TK + 1).to(torch.float32), probs_TK], dim=1)
    T = meta_TW.shape[0]
    return meta_TW if T == rows else torch.nn.functional.pad(meta_TW, (0, 0, 0, rows - T))


def receive_plan(meta_NW: torch.Tensor, topk: int, first_expert: int, num_local: int,
                 tokens_per_expert: Sequence[int], pad_multiple: Optional[int],
                 fused: Optional[bool] = None):
    """The receiver's grouping of N received metadata rows by local expert, and their probs.
    No host sync.

    meta_NW:           [N, 2K] float32 received rows ``[id + 1 (0 = masked), probs]``,
                       contiguous (differentiable w.r.t. the probs).
    topk:              K.
    first_expert:      this rank's first global expert id (rank * L).
    num_local:         L; slot k of row n is this rank's when its id is in
                       [first_expert, first_expert + L).
    tokens_per_expert: rows per local expert without padding (host ints, len L), from the
                       routing messages.
    pad_multiple:      each expert's rows padded with zero rows to a multiple of this.
    fused:             the fused kernels (True) or the torch reference (False); None:
                       ``kernels.use_triton(meta_NW)``.
    Returns (plan, probs_NK [N, K] float32 view of ``meta_NW``): ``plan`` groups the rows
    expert ascending, then received row, then slot, each expert's block padded; a
    ``BudgetPlan`` whose budget is the exact padded row count (fused) or a ``GroupPlan``.
    """
    N, K, L = meta_NW.shape[0], topk, num_local
    probs_NK = meta_NW[:, K:]
    if fused if fused is not None else kernels.use_triton(meta_NW):
        counts = tokens_per_expert if type(tokens_per_expert) is list else \
            [int(c) for c in tokens_per_expert]  # host ints already: no loop
        padded = pad_counts(counts, pad_multiple)
        # With the budget at the exact padded total nothing drops, and the budget plan's
        # order (expert, source, row, slot) is the exact plan's: one source here.
        # No padding: every row is real, no mask to compute.
        pos_NK, filled_M, tpe_L, dropped, _ = kernels.budget_arrays(
            meta_NW.detach().unsqueeze(0), K, N, L, sum(padded),
            max(int(pad_multiple or 1), 1), shift=first_expert + 1, filled=padded != counts)
        return BudgetPlan(pos_NK, filled_M, sum(padded), N, K, tpe_L, dropped), probs_NK
    lid_NK = meta_NW[:, :K].detach().to(torch.long) - (first_expert + 1)
    lid_NK.masked_fill_((lid_NK < 0) | (lid_NK >= L), -1)
    return group_plan(lid_NK, L, tokens_per_expert, pad_multiple), probs_NK
