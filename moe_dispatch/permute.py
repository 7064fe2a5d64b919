"""Local permutation: rows carrying K local-expert slots -> rows grouped by expert, and back.

Every backend ends its dispatch here (after its communication) and starts its combine
here. ``group_plan`` computes the layout once; ``permute`` and ``unpermute`` apply it.
The plain torch code below runs everywhere and is the reference; on CUDA a fused Triton
kernel (``moe_dispatch.kernels``) takes over when available, with identical results.

Shapes: N input rows, K slots per row, L local experts, M output rows (padding included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from . import kernels  # imports no triton itself (its kernels load on first use)


@dataclass(frozen=True)
class GroupPlan:
    """How input rows map to expert-grouped output rows.

    A plan is built either by the torch path (``_slot_M``/``_dest_M`` given) or by the
    GPU counting sort (``pos_NK`` given); the other maps are derived on first use.

    _slot_M:           [M_real] int64 or None (derive from ``pos_NK``): see ``slot_M``.
    _dest_M:           [M_real] int64 or None: see ``dest_M``.
    num_in_rows:       N.
    topk:              K.
    num_out_rows:      M, padding included.
    tokens_per_expert: per local expert row counts, padding included (host ints).
    pos_NK:            [N, K] int64 output row of slot (n, k), -1 = no row; or None.
    filled_M:          [M] uint8, 1 on real rows, 0 on padding rows; None when there is
                       no padding or the plan has no ``pos_NK``.
    counts:            per local expert row counts without padding (host ints); needed
                       with ``pos_NK`` only.
    """

    _slot_M: Optional[torch.Tensor]
    _dest_M: Optional[torch.Tensor]
    num_in_rows: int
    topk: int
    num_out_rows: int
    tokens_per_expert: tuple
    pos_NK: Optional[torch.Tensor] = None
    filled_M: Optional[torch.Tensor] = None
    counts: Optional[tuple] = None

    @property
    def slot_M(self) -> torch.Tensor:
        """[M_real] int64, flat index ``row * K + k`` of each real output row, in output
        order (expert ascending, then input row ascending)."""
        if self._slot_M is None:
            self._derive_slots()
        return self._slot_M

    @property
    def dest_M(self) -> Optional[torch.Tensor]:
        """[M_real] int64 position of each real row in the padded output, or None when
        there is no padding (dest is then arange)."""
        if self._slot_M is None:
            self._derive_slots()
        return self._dest_M

    @property
    def row_M(self) -> torch.Tensor:
        return torch.div(self.slot_M, self.topk, rounding_mode="floor")

    def _derive_slots(self) -> None:
        # Inverse of pos_NK (CPU path and debugging only; the GPU path never needs it).
        # Slots with no row scatter into a trailing dump entry.
        counts = list(self.counts)
        M, m_real = self.num_out_rows, sum(counts)
        flat = self.pos_NK.reshape(-1)
        dev = flat.device
        inv = torch.zeros(M + 1, dtype=torch.long, device=dev)
        inv.scatter_(0, torch.where(flat >= 0, flat, M),
                     torch.arange(flat.numel(), device=dev))
        dest_M = _dest_map(counts, list(self.tokens_per_expert), dev)
        slot_M = inv[:m_real] if dest_M is None else inv.index_select(0, dest_M)
        object.__setattr__(self, "_slot_M", slot_M)
        object.__setattr__(self, "_dest_M", dest_M)


@dataclass(frozen=True)
class BudgetPlan:
    """A grouping by local expert into a fixed number of rows, built on the device.

    The budget mode's plan (``BackendConfig.max_rows_per_rank``): the same order as a
    ``GroupPlan`` (expert ascending, then input row, then slot), each expert's block padded
    to ``pad_multiple``, but sized ``num_out_rows = B`` whatever the routing, and with every
    count on the device, so building and applying it never syncs the host.

    pos_NK:              [N, K] int64 output row of slot (n, k); -1 = not for this rank,
                         -2 = dropped (its row would land at or past B).
    filled_M:            [B] uint8, 1 on rows some slot writes; the rest (padding, unused
                         budget) are written as zeros with prob 0. None when every row is
                         real (the exact mode's plans without padding: nothing to zero).
    num_out_rows:        B (host int).
    num_in_rows, topk:   N, K.
    tokens_per_expert_L: [L] int64 device, rows kept per local expert (padding included);
                         their sum is <= B and their cumsum the grouped GEMM's offsets.
    dropped:             0-dim bool device tensor, True when some rows did not fit.
    """

    pos_NK: torch.Tensor
    filled_M: torch.Tensor
    num_out_rows: int
    num_in_rows: int
    topk: int
    tokens_per_expert_L: torch.Tensor
    dropped: torch.Tensor


def budget_plan(lid_NK: torch.Tensor, num_local_experts: int, budget: int,
                pad_multiple: Optional[int] = None) -> BudgetPlan:
    """Plan the grouping of rows by local expert into exactly ``budget`` rows, sync-free.

    lid_NK:            [N, K] int64 local expert id of each slot, -1 = slot not for this rank.
    num_local_experts: L.
    budget:            B, rows of the output; rows that would land at or past B are dropped
                       (their pos is -2, ``dropped`` is set), never written out of bounds.
    pad_multiple:      round each expert's rows up to a multiple of this with zero rows.
    Plain torch ops on the device of ``lid_NK`` (a stable sort and a few scans); on CUDA
    with triton two counting-sort launches instead (``triton_budget_plan``), same plan.
    """
    if kernels.use_triton(lid_NK):
        return triton_budget_plan(lid_NK, num_local_experts, budget, pad_multiple)
    pos, tpe, dropped = budget_positions(lid_NK, num_local_experts, budget, pad_multiple)
    N, K = lid_NK.shape
    return BudgetPlan(pos, filled_rows(pos, budget), budget, N, K, tpe, dropped)


def triton_budget_plan(lid_NK: torch.Tensor, num_local_experts: int, budget: int,
                       pad_multiple: Optional[int] = None, block: Optional[int] = None,
                       chunks: Optional[int] = None) -> BudgetPlan:
    """``budget_plan`` through the Triton counting sort (``kernels.budget_arrays``): the same
    plan in two launches. Arguments as ``budget_plan``; ``block`` / ``chunks`` override the
    kernels' tiling (tests)."""
    N, K = lid_NK.shape
    pos, filled, tpe, dropped, _ = kernels.budget_arrays(
        lid_NK.unsqueeze(0), K, N, num_local_experts, budget, max(int(pad_multiple or 1), 1),
        block=block, chunks=chunks)
    return BudgetPlan(pos, filled, budget, N, K, tpe, dropped)


def budget_positions(lid_NK: torch.Tensor, num_local_experts: int, budget: int,
                     pad_multiple: Optional[int] = None):
    """The maps of ``budget_plan`` without the row mask (so ``budget`` may be a bound as
    large as 2**62): (pos_NK, tokens_per_expert_L, dropped), all on the device."""
    L = num_local_experts
    dev = lid_NK.device
    N, K = lid_NK.shape
    flat = lid_NK.reshape(-1)
    key = torch.where(flat >= 0, flat, L)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(L + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    c = counts[:L]
    padded = c if not pad_multiple or pad_multiple <= 1 else \
        torch.div(c + pad_multiple - 1, pad_multiple, rounding_mode="floor") * pad_multiple
    pstart = torch.cumsum(padded, 0) - padded
    ustart = torch.cumsum(c, 0) - c
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    skey = key.index_select(0, order)
    # Rank of each sorted slot inside its expert, then its padded output row.
    rank_in = torch.arange(flat.numel(), device=dev) - \
        torch.cat([ustart, zero]).index_select(0, skey)
    pos_s = torch.cat([pstart, zero]).index_select(0, skey) + rank_in
    pos_s = torch.where(skey < L, torch.where(pos_s < budget, pos_s, -2), -1)
    pos = torch.empty_like(pos_s).scatter_(0, order, pos_s).view(N, K)
    tpe = torch.minimum(padded, (budget - pstart).clamp(min=0))
    return pos, tpe, padded.sum() > budget


def filled_rows(pos_NK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows] uint8: 1 on output rows some slot of ``pos_NK`` writes, 0 elsewhere."""
    flat = pos_NK.reshape(-1)
    filled = torch.zeros(num_rows + 1, dtype=torch.uint8, device=flat.device)
    filled.scatter_(0, torch.where(flat >= 0, flat, num_rows), 1)
    return filled[:num_rows]


def local_expert_counts(lid_NK: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[L] int64 rows per local expert, on the device of ``lid_NK`` (no host sync)."""
    flat = lid_NK.reshape(-1)
    key = torch.where(flat >= 0, flat, num_local_experts)
    counts = torch.zeros(num_local_experts + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return counts[:num_local_experts]


def pad_counts(counts: Sequence[int], pad_multiple: Optional[int]) -> List[int]:
    if not pad_multiple or pad_multiple <= 1:
        return list(counts)
    return [-(-c // pad_multiple) * pad_multiple for c in counts]


def group_plan(lid_NK: torch.Tensor, num_local_experts: int,
               tokens_per_expert: Optional[Sequence[int]] = None,
               pad_multiple: Optional[int] = None) -> GroupPlan:
    """Plan the grouping of rows by local expert.

    lid_NK:            [N, K] int64 local expert id of each slot, -1 = slot not for this rank.
    num_local_experts: L.
    tokens_per_expert: unpadded host counts per local expert if the caller already knows
                       them (alltoall learns them from its count exchange); otherwise
                       they are read from the device here, one host sync.
    pad_multiple:      round each expert's rows up to a multiple of this with zero rows.

    On CUDA with triton, a counting-sort kernel builds ``pos_NK`` directly
    (``triton_group_plan``); the result is the same plan.
    """
    if kernels.use_triton(lid_NK):
        return triton_group_plan(lid_NK, num_local_experts, tokens_per_expert, pad_multiple)
    N, K = lid_NK.shape
    if tokens_per_expert is None:
        tokens_per_expert = local_expert_counts(lid_NK, num_local_experts).tolist()
    counts = [int(c) for c in tokens_per_expert]
    m_real = sum(counts)
    flat = lid_NK.reshape(-1)
    key = torch.where(flat >= 0, flat, num_local_experts)
    # Stable sort by expert keeps input-row order within an expert.
    slot_M = torch.argsort(key, stable=True)[:m_real]
    padded = pad_counts(counts, pad_multiple)
    dest_M = _dest_map(counts, padded, lid_NK.device)
    return GroupPlan(slot_M, dest_M, N, K, sum(padded), tuple(padded))


def triton_group_plan(lid_NK: torch.Tensor, num_local_experts: int,
                      tokens_per_expert: Optional[Sequence[int]] = None,
                      pad_multiple: Optional[int] = None, block: Optional[int] = None,
                      chunks: Optional[int] = None) -> GroupPlan:
    """``group_plan`` through the Triton counting sort (``kernels.plan_arrays``): the same
    plan, carrying ``pos_NK`` (and ``filled_M`` when padded), so permute and unpermute need
    no further index work. Arguments as ``group_plan``; ``block`` / ``chunks`` override the
    kernel's tiling (tests). One output allocation (plus ``filled_M`` when padded) and one
    or two kernels; with ``tokens_per_expert`` None the counts are read back (a host sync).
    """
    N, K = lid_NK.shape
    dev = lid_NK.device
    counts = None if tokens_per_expert is None else [int(c) for c in tokens_per_expert]
    if N * K == 0:
        counts = counts if counts is not None else [0] * num_local_experts
        padded = pad_counts(counts, pad_multiple)
        filled = None
        if padded != counts:  # no slots but counts given: every row is padding
            filled = torch.zeros(sum(padded), dtype=torch.uint8, device=dev)
        return GroupPlan(None, None, N, K, sum(padded), tuple(padded),
                         torch.empty(N, K, dtype=torch.long, device=dev), filled, tuple(counts))
    padded = None if counts is None else pad_counts(counts, pad_multiple)
    pos_NK, filled, counts = kernels.plan_arrays(
        lid_NK, num_local_experts, counts, padded, max(int(pad_multiple or 1), 1),
        block=block, chunks=chunks)
    padded = pad_counts(counts, pad_multiple)
    filled = filled[:sum(padded)] if padded != counts else None
    return GroupPlan(None, None, N, K, sum(padded), tuple(padded), pos_NK, filled,
                     tuple(counts))


def _dest_map(counts: Sequence[int], padded: Sequence[int],
              dev: torch.device) -> Optional[torch.Tensor]:
    """[M_real] int64 padded output row of each real row (in output order), None when
    ``padded == counts``. counts/padded: per-expert host ints without/with padding."""
    counts, padded = list(counts), list(padded)
    if padded == counts:
        return None
    from .comm import ints_on
    m_real, L = sum(counts), len(counts)
    shifts = [p - c for p, c in zip(_cumsum(padded), _cumsum(counts))]
    counts_shift = ints_on(counts + shifts, dev)  # one copy, no stream sync
    expert_M = torch.repeat_interleave(torch.arange(L, device=dev), counts_shift[:L],
                                       output_size=m_real)
    return torch.arange(m_real, device=dev) + counts_shift[L:][expert_M]


def _cumsum(xs: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for x in xs:
        out.append(acc)
        acc += x
    return out


def permute(x_NH: torch.Tensor, probs_NK: Optional[torch.Tensor], plan: GroupPlan):
    """Gather rows into expert-grouped order. Returns (tokens_MH, probs_M float32 or None).

    Padding rows are zeros with prob 0. Differentiable w.r.t. ``x_NH`` and ``probs_NK``.
    ``probs_NK`` None: rows only (e.g. the sender side of an all-to-all).
    """
    if kernels.use_triton(x_NH):
        return kernels.permute(x_NH, probs_NK, plan)
    if isinstance(plan, BudgetPlan):
        return _permute_pos(x_NH, probs_NK, plan.pos_NK, plan.num_out_rows)
    row_M = plan.row_M
    tokens = x_NH.index_select(0, row_M)
    probs = None
    if probs_NK is not None:
        probs = probs_NK.reshape(-1).float().index_select(0, plan.slot_M)
    if plan.dest_M is not None:
        tokens = x_NH.new_zeros(plan.num_out_rows, x_NH.shape[1]).index_copy(
            0, plan.dest_M, tokens)
        if probs is not None:
            probs = probs.new_zeros(plan.num_out_rows).index_copy(0, plan.dest_M, probs)
    return tokens, probs


def unpermute(y_MH: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """Sum each input row's expert outputs: [M, H] -> [N, H] (padding rows ignored).

    Low-precision inputs are accumulated in float32 and rounded once.
    """
    if y_MH.shape[0] != plan.num_out_rows:
        raise ValueError(f"combine: expert output has {y_MH.shape[0]} rows, dispatch produced "
                         f"{plan.num_out_rows}")
    if kernels.use_triton(y_MH):
        return kernels.unpermute(y_MH, plan)
    if isinstance(plan, BudgetPlan):
        return _unpermute_pos(y_MH, plan.pos_NK)
    y = y_MH if plan.dest_M is None else y_MH.index_select(0, plan.dest_M)
    acc_dtype = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    out = torch.zeros(plan.num_in_rows, y.shape[1], dtype=acc_dtype, device=y.device)
    out = out.index_add(0, plan.row_M, y.to(acc_dtype))
    return out.to(y_MH.dtype)


def _permute_pos(x_NH: torch.Tensor, probs_NK: Optional[torch.Tensor], pos_NK: torch.Tensor,
                 num_out_rows: int):
    """``permute`` through an inverse map (budget plans off the Triton path), sync-free:
    every slot is added into its output row, slots with no row (pos < 0) into a trailing
    dump row that is cut. Each real row is written by exactly one slot, so the sums are
    plain copies; rows nobody writes stay zero (prob 0)."""
    N, K = pos_NK.shape
    M = num_out_rows
    tgt = torch.where(pos_NK >= 0, pos_NK, M).reshape(-1)
    rows = x_NH.unsqueeze(1).expand(N, K, x_NH.shape[1]).reshape(N * K, x_NH.shape[1])
    tokens = x_NH.new_zeros(M + 1, x_NH.shape[1]).index_add(0, tgt, rows)[:M]
    probs = None
    if probs_NK is not None:
        p = probs_NK.reshape(-1).float()
        probs = p.new_zeros(M + 1).index_add(0, tgt, p)[:M]
    return tokens, probs


def _unpermute_pos(y_MH: torch.Tensor, pos_NK: torch.Tensor) -> torch.Tensor:
    """``unpermute`` through an inverse map: out[n] = sum_k y[pos[n, k]] over pos >= 0, in
    float32 for low-precision inputs, rounded once."""
    N, K = pos_NK.shape
    acc = torch.float32 if y_MH.dtype in (torch.float16, torch.bfloat16) else y_MH.dtype
    y_ext = torch.cat([y_MH.to(acc), y_MH.new_zeros(1, y_MH.shape[1], dtype=acc)])
    tgt = torch.where(pos_NK >= 0, pos_NK, y_MH.shape[0]).reshape(-1)
    out = y_ext.index_select(0, tgt).view(N, K, y_MH.shape[1]).sum(1)
    return out.to(y_MH.dtype)
