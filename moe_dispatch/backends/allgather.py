"""``allgather``: every rank gathers all tokens and routing, keeps its experts' rows,
and combine reduce-scatters the per-token partial sums back to their owners.

Simple and robust (no per-pair splits), but each rank receives every token: it moves
R times the bytes of ``alltoall`` at low top-k and suits small EP groups or
near-dense routing. Uneven token counts are padded to the largest rank's T.

Host syncs: one per dispatch (token counts and per-expert counts arrive in one gather,
with validation folded in: the message's own launch checks the ids and probs). Combine
never syncs. After the sync, on CUDA with triton, the metadata rows are the budget mode's
pack launch (``exact.gather_meta``) and the receiver's grouping its two plan launches
(``exact.receive_plan``).

Budget mode (``max_rows_per_rank=B``): no host sync after the first call. Every rank
gathers ``T_cap`` token rows from each rank (agreed at the first call, or
``backend_options["max_tokens_per_rank"]``); each rank's metadata block ends in a header
row (its validation code, whether it clipped tokens), and the B-row plan is built on the
device (``budget.pack_meta`` / ``budget.receive_plan``: on CUDA one fused launch packs the
block, two plan the gathered ones).

FP8 wire (``wire_dtype=torch.float8_e4m3fn``, both modes): the gather moves each token's
packed e4m3 row + scales (quantised once) and the permute dequantises
(``backends/wire.py``); combine and backward are unchanged (the backward's reduce-scatter
runs in the caller's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .. import comm
from ..kernels.fp8 import WIRE_DTYPES
from ..permute import BudgetPlan, GroupPlan, permute, unpermute
from ..routing import pad_topk
from ..protocol import DispatchInputError, DispatchResult, PendingCheck
from . import budget as budget_mode  # fused_budget read per call (tests swap it)
from .budget import (BudgetShape, budget_input, budget_options, pack_meta, pad_rows,
                     receive_plan)
from .exact import HEAD, expert_counts, gather_meta, read_tables, route_message
from .exact import receive_plan as exact_receive_plan
from .wire import fp8_receive, fp8_send


@dataclass(frozen=True)
class AllGatherHandle:
    """plan: grouping of this rank's rows of the gathered [R * T_max] tokens (a
    ``BudgetPlan`` on the fused path, else a ``GroupPlan``: ``exact.receive_plan``);
    num_tokens: T (this rank); max_tokens: T_max (gather padding)."""

    plan: Union[GroupPlan, BudgetPlan]
    num_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class AllGatherBudgetHandle:
    """plan: the ``BudgetPlan`` of this rank's rows of the gathered [R * T_cap] tokens;
    num_sent: rows this rank contributed (<= T_cap); num_tokens: the caller's T."""

    plan: BudgetPlan
    num_sent: int
    num_tokens: int


class AllGatherBackend(comm.CollectiveBackendBase):
    name = "allgather"
    supported_wire_dtypes = WIRE_DTYPES

    def __init__(self, config):
        super().__init__(config)
        self.budget, self.token_cap = budget_options(config, self.name)
        self.shape: "BudgetShape | None" = None
        # The exact mode's routing message checks the input values (``PendingCheck``).
        self.checks_in_message = self.budget is None

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        if self.budget is not None:
            return self._dispatch_budget(x_TH, idx_TK, probs_TK, check)
        L, E, me = self.L, self.cfg.num_experts, self.rank
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        dev = x_TH.device
        msg = route_message(idx_TK, check.code(dev), E, E, H, per_rank=False,
                            probs_TK=probs_TK if check.in_message else None)
        # The single host sync of this dispatch: every rank's [T, code, H, K, counts_E].
        (table,), (table_t,) = read_tables(comm.gather_ints(msg, self.group))
        check.raise_if_failed([row[1] for row in table], me)
        hiddens = [row[2] for row in table]
        if any(h != H for h in hiddens):
            raise DispatchInputError(f"dispatch: hidden size differs across EP ranks: {hiddens}")
        # Gathered rows must have one width; a narrower K is widened with -1 slots.
        K = max(row[3] for row in table)
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K)
        t_max = max(row[0] for row in table)
        tokens_per_expert, tpe_L = expert_counts(table_t, HEAD + me * L, L,
                                                 self.cfg.pad_multiple)

        # Rows [id + 1, probs] (exact.py); the zero rows that pad T to T_max route nowhere.
        meta = gather_meta(idx_TK, probs_TK, check.code(dev), t_max,
                           budget_mode.fused_budget(idx_TK))
        all_x = self._gather_rows(x_TH, t_max)
        all_meta = comm.all_gather(meta, self.group)
        # On CUDA the fused budget-plan kernels (two launches), else the torch reference.
        plan, probs_NK = exact_receive_plan(all_meta, K, me * L, L, tokens_per_expert,
                                            self.cfg.pad_multiple,
                                            budget_mode.fused_budget(all_meta))
        tokens, probs, fp8_rows = self._receive_rows(x_TH, all_x, probs_NK, plan)
        return DispatchResult(tokens, tpe_L, probs, AllGatherHandle(plan, T, t_max),
                              fp8=fp8_rows)

    def _dispatch_budget(self, x_TH, idx_TK, probs_TK, check: PendingCheck) -> DispatchResult:
        R, L, B, me = self.R, self.L, self.budget, self.rank
        inp = budget_input(self, x_TH, idx_TK, probs_TK, check)
        K, Tc = self.shape.topk, self.shape.token_cap
        # One block of T_cap metadata rows (token t on row t) ending in the header row.
        _, meta = pack_meta(inp, Tc)
        all_x = self._gather_rows(inp.x_TH, Tc)
        all_meta = comm.all_gather(meta.view(Tc + 1, 2 * K), self.group).view(R, Tc + 1, 2 * K)
        plan, probs_NK, status = receive_plan(all_meta, K, me * L, L, B, self.cfg.pad_multiple)
        tokens, probs, fp8_rows = self._receive_rows(inp.x_TH, all_x, probs_NK, plan)
        handle = AllGatherBudgetHandle(plan, inp.x_TH.shape[0], inp.num_tokens)
        return DispatchResult(tokens, plan.tokens_per_expert_L, probs, handle, status,
                              fp8_rows, inp.check)

    def _gather_rows(self, x_TH, rows: int) -> torch.Tensor:
        """Every rank's tokens, padded to ``rows`` each: in x's dtype (differentiable), or
        FP8 wire rows (uint8)."""
        if self.cfg.wire_dtype is None:
            return comm.all_gather(pad_rows(x_TH, rows), self.group)
        return comm.all_gather_raw(pad_rows(fp8_send(x_TH), rows), self.group)

    def _receive_rows(self, x_TH, all_x, probs_NK, plan):
        """This rank's gathered rows grouped by local expert (``plan``): (tokens, probs,
        ``Fp8Rows`` or None). An FP8 wire's gradient goes back in x's dtype (straight
        through): reduce-scattered to the tokens' owners."""
        if self.cfg.wire_dtype is None:
            return (*permute(all_x, probs_NK, plan), None)
        group, T = self.group, x_TH.shape[0]
        return fp8_receive(x_TH, all_x, probs_NK, plan,
                           lambda g_NH: comm.reduce_scatter_raw(g_NH, group)[:T])

    def combine(self, y_NH: torch.Tensor, handle) -> torch.Tensor:
        if isinstance(handle, AllGatherBudgetHandle):
            partial = unpermute(y_NH, handle.plan)
            mine = comm.reduce_scatter(partial, self.group)
            return pad_rows(mine[:handle.num_sent], handle.num_tokens)
        partial = unpermute(y_NH, handle.plan)
        mine = comm.reduce_scatter(partial, self.group)
        return mine[:handle.num_tokens]
