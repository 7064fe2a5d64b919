"""``alltoall``: torch.distributed all-to-all (NCCL on GPU, gloo on CPU).

Dispatch sends each token once per destination rank, with the K local-expert ids and
probs it has there, and the receiver expands rows to experts (as DeepEP does); combine
sums a token's expert outputs on the expert rank before sending one row back per rank.
At top-8 over 4 ranks that moves ~2.2x fewer bytes than one row per (token, expert).

Host syncs: exactly one per dispatch, after the count exchange (split sizes must be
host ints for ``all_to_all_single``). Input validation rides in the same exchange, so
it costs no extra sync. Combine never syncs.

Budget mode (``max_rows_per_rank=B``): no host sync after the first call. Every pair of
ranks exchanges a fixed block of ``T_cap`` token rows (a token goes to a rank at most
once, so a block always holds every token a rank sends there), so the splits are equal
and known to all; unused rows carry no routing. The receiver's B-row plan then keeps
exactly the rows the exact mode would put first. Each block's last metadata row is a
header (the sender's validation code, whether it clipped tokens), so bad input reaches
every rank with the data. The receiver plans its B rows on the device
(``budget.pack_meta`` / ``budget.receive_plan``: on CUDA one fused launch packs the blocks,
two plan them). Bytes on the wire: R * C rows per rank, against the exact
mode's actual rows: the price of knowing every size in advance.

FP8 wire (``wire_dtype=torch.float8_e4m3fn``, both modes): each token is quantised once, its
packed e4m3 row + scales is what the sender groups and the all-to-all moves, and the
receiver dequantises in its permute (``backends/wire.py``). Combine and backward are
unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .. import comm
from ..kernels.fp8 import WIRE_DTYPES
from ..permute import BudgetPlan, GroupPlan, group_plan, permute, unpermute
from ..routing import pad_topk, rank_mask
from ..protocol import DispatchInputError, DispatchResult, PendingCheck
from .budget import (BudgetShape, budget_input, budget_options, pack_meta, pad_rows,
                     receive_plan)
from .exact import HEAD, read_messages, route_message
from .wire import fp8_receive, fp8_send


@dataclass(frozen=True)
class AllToAllHandle:
    """What combine needs from one dispatch.

    send_plan:   grouping of the T local tokens by destination rank: the send buffer's
                 rows (rank-major, token ascending); combine sums them back per token.
    send_splits: rows sent to each rank (host ints), len R.
    recv_splits: rows received from each rank (host ints), len R.
    plan:        grouping of the received rows by local expert.
    """

    send_plan: GroupPlan
    send_splits: Tuple[int, ...]
    recv_splits: Tuple[int, ...]
    plan: GroupPlan


@dataclass(frozen=True)
class AllToAllBudgetHandle:
    """What combine needs from one budget-mode dispatch (every size fixed, no host ints
    learnt from the call).

    send_plan:    [T_sent, R] grouping of the sent tokens into R blocks of C rows.
    plan:         the receiver's ``BudgetPlan`` of its R * C received rows into B rows.
    num_tokens:   the caller's T (rows past the sent ones come back as zeros).
    """

    send_plan: BudgetPlan
    plan: BudgetPlan
    num_tokens: int


class AllToAllBackend(comm.CollectiveBackendBase):
    name = "alltoall"
    supported_wire_dtypes = WIRE_DTYPES

    def __init__(self, config):
        super().__init__(config)
        self.budget, self.token_cap = budget_options(config, self.name)
        self.shape: "BudgetShape | None" = None

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        if self.budget is not None:
            return self._dispatch_budget(x_TH, idx_TK, probs_TK, check)
        R, L, E = self.R, self.L, self.cfg.num_experts
        T, K = idx_TK.shape
        dev = x_TH.device
        H = x_TH.shape[1]
        # One message per destination: [rows, code, H, K, per-local-expert rows...].
        msg_RC = route_message(idx_TK, check.code(dev), E, L, H, per_rank=True)
        recv_RC = comm.exchange_ints(msg_RC, self.group)
        # The single host sync of this dispatch.
        sent, got = read_messages(msg_RC, recv_RC)
        check.raise_if_failed([row[1] for row in got], self.rank)
        hiddens = [row[2] for row in got]
        if any(h != H for h in hiddens):
            raise DispatchInputError(f"dispatch: hidden size differs across EP ranks: {hiddens}")
        # Metadata rows must have one width everywhere; a narrower K is widened with -1 slots.
        K = max(row[3] for row in got)
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K)
        send_splits = [row[0] for row in sent]
        recv_splits = [row[0] for row in got]
        tokens_per_expert = [sum(c) for c in zip(*(row[HEAD:] for row in got))]
        mask_TR = rank_mask(idx_TK, E, L)

        # The send buffer is a grouping of tokens by destination rank (rank-major, token
        # ascending): the same plan/permute machinery as the expert grouping, so the send
        # gather and combine's final per-token sum share its kernels and backward.
        lid_TR = torch.where(mask_TR, torch.arange(R, device=dev), -1)
        send_plan = group_plan(lid_TR, R, send_splits)
        # Each sent row carries the token's K global ids (as float32, exact below 2**24) and
        # probs; the receiver keeps the slots of its own experts. One collective for both.
        # Permuted with the same plan as the rows (a row gather, no per-row index map).
        meta_SK2, _ = permute(torch.cat([idx_TK.to(torch.float32), probs_TK], dim=1), None,
                              send_plan)
        recv_x = self._send_rows(x_TH, send_plan, send_splits, recv_splits)
        recv_meta = comm.all_to_all(meta_SK2, recv_splits, send_splits, self.group)
        lid_NK = recv_meta[:, :K].detach().to(torch.long) - self.rank * L
        lid_NK.masked_fill_((lid_NK < 0) | (lid_NK >= L), -1)
        plan = group_plan(lid_NK, L, tokens_per_expert, self.cfg.pad_multiple)
        tokens, probs, fp8_rows = self._receive_rows(x_TH, recv_x, recv_meta[:, K:], plan,
                                                     send_plan, send_splits, recv_splits)
        handle = AllToAllHandle(send_plan, tuple(send_splits), tuple(recv_splits), plan)
        return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                              probs, handle, fp8=fp8_rows)

    def _dispatch_budget(self, x_TH, idx_TK, probs_TK, check: PendingCheck) -> DispatchResult:
        R, L, B = self.R, self.L, self.budget
        inp = budget_input(self, x_TH, idx_TK, probs_TK, check)
        K, C = self.shape.topk, self.shape.token_cap
        # The send plan (token t's row in each destination's block of C rows) and the
        # metadata blocks, each ending in its header row (budget.pack_meta).
        send_plan, send_meta = pack_meta(inp, C, self.cfg.num_experts, L)
        recv_x = self._send_rows(inp.x_TH, send_plan, [C] * R, [C] * R)
        recv_meta = comm.all_to_all(send_meta.view(R * (C + 1), 2 * K), [C + 1] * R,
                                    [C + 1] * R, self.group).view(R, C + 1, 2 * K)
        plan, probs_NK, status = receive_plan(recv_meta, K, self.rank * L, L, B,
                                              self.cfg.pad_multiple)
        tokens, probs, fp8_rows = self._receive_rows(inp.x_TH, recv_x, probs_NK, plan,
                                                     send_plan, [C] * R, [C] * R)
        handle = AllToAllBudgetHandle(send_plan, plan, inp.num_tokens)
        return DispatchResult(tokens, plan.tokens_per_expert_L, probs, handle, status,
                              fp8_rows, inp.check)

    def _send_rows(self, x_TH, send_plan, send_splits, recv_splits) -> torch.Tensor:
        """The tokens grouped by destination rank (``send_plan``) and all-to-all'd: the
        received rows in x's dtype (differentiable), or FP8 wire rows (uint8)."""
        if self.cfg.wire_dtype is None:
            send_x, _ = permute(x_TH, None, send_plan)
            return comm.all_to_all(send_x, recv_splits, send_splits, self.group)
        send_w, _ = permute(fp8_send(x_TH), None, send_plan)
        return comm.all_to_all_raw(send_w, recv_splits, send_splits, self.group)

    def _receive_rows(self, x_TH, recv_x, probs_NK, plan, send_plan, send_splits, recv_splits):
        """The received rows grouped by local expert (``plan``): (tokens, probs, ``Fp8Rows``
        or None). An FP8 wire's gradient goes back in x's dtype (straight through)."""
        if self.cfg.wire_dtype is None:
            return (*permute(recv_x, probs_NK, plan), None)
        group = self.group
        return fp8_receive(x_TH, recv_x, probs_NK, plan, lambda g_NH: unpermute(
            comm.all_to_all_raw(g_NH, send_splits, recv_splits, group), send_plan))

    def combine(self, y_NH: torch.Tensor, handle) -> torch.Tensor:
        if isinstance(handle, AllToAllBudgetHandle):
            return self._combine_budget(y_NH, handle)
        per_row = unpermute(y_NH, handle.plan)
        back = comm.all_to_all(per_row, list(handle.send_splits), list(handle.recv_splits),
                               self.group)
        # Each token's rows from its destination ranks, summed in float32.
        return unpermute(back, handle.send_plan)

    def _combine_budget(self, y_BH: torch.Tensor, handle: AllToAllBudgetHandle) -> torch.Tensor:
        R, C = self.R, handle.send_plan.num_out_rows // self.R
        per_row = unpermute(y_BH, handle.plan)
        back = comm.all_to_all(per_row, [C] * R, [C] * R, self.group)
        return pad_rows(unpermute(back, handle.send_plan), handle.num_tokens)
