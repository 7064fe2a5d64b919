"""``alltoall``: torch.distributed all-to-all (NCCL on GPU, gloo on CPU).

Dispatch sends each token once per destination rank, with the K local-expert ids and
probs it has there, and the receiver expands rows to experts (as DeepEP does); combine
sums a token's expert outputs on the expert rank before sending one row back per rank.
At top-8 over 4 ranks that moves ~2.2x fewer bytes than one row per (token, expert).

Host syncs: exactly one per dispatch, after the count exchange (split sizes must be
host ints for ``all_to_all_single``). Input validation rides in the same exchange, so
it costs no extra sync; the message's own launch checks the ids and probs (no check launch
before it). Combine never syncs. After the sync, on CUDA with triton, the
budget mode's fused kernels do the rest in ~5 launches besides the two all-to-alls
(``exact.pack_rows``: the send plan and the packed metadata rows in one; the send permute;
``exact.receive_plan``: the receiver's grouping in two; the receive permute), where the
torch reference (the CPU path) takes ~20 small ops; the results are the same bit for bit.

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
from typing import Tuple, Union

import torch

from .. import comm
from ..kernels.fp8 import WIRE_DTYPES
from ..permute import BudgetPlan, GroupPlan, permute, unpermute
from ..routing import pad_topk
from ..protocol import DispatchInputError, DispatchResult, PendingCheck
from . import budget as budget_mode  # fused_budget read per call (tests swap it)
from .budget import (BudgetShape, budget_input, budget_options, pack_meta, pad_rows,
                     receive_plan)
from .exact import HEAD, expert_counts, pack_rows, read_tables, route_message
from .exact import receive_plan as exact_receive_plan
from .wire import fp8_receive, fp8_send


@dataclass(frozen=True)
class AllToAllHandle:
    """What combine needs from one dispatch.

    send_plan:   grouping of the T local tokens by destination rank: the send buffer's
                 rows (rank-major, token ascending); combine sums them back per token.
    send_splits: rows sent to each rank (host ints), len R.
    recv_splits: rows received from each rank (host ints), len R.
    plan:        grouping of the received rows by local expert.
    send_identity: True when the send buffer was the tokens themselves (a group of one
                 that sends every token: row t is token t, one row each), so neither the
                 send permute nor combine's final sum ran (each is an identity there).
    Both plans are ``BudgetPlan``s on the fused path (budget = the exact row count) and
    ``GroupPlan``s on the torch path (``exact.py``); they map the same rows.
    """

    send_plan: Union[GroupPlan, BudgetPlan]
    send_splits: Tuple[int, ...]
    recv_splits: Tuple[int, ...]
    plan: Union[GroupPlan, BudgetPlan]
    send_identity: bool = False


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
        # The exact mode's routing message checks the input values (``PendingCheck``).
        self.checks_in_message = self.budget is None

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        if self.budget is not None:
            return self._dispatch_budget(x_TH, idx_TK, probs_TK, check)
        L, E = self.L, self.cfg.num_experts
        idx_TK, probs_TK, send_splits, recv_splits, tokens_per_expert, tpe_L = \
            self._exchange_routing(x_TH, idx_TK, probs_TK, check)
        K = idx_TK.shape[1]
        # Every size is a host int now; the rest is device work (exact.py: on CUDA the
        # budget mode's fused kernels, ~5 launches; else the torch reference).
        fused = budget_mode.fused_budget(idx_TK)
        # The send buffer groups the tokens by destination rank (rank-major, token
        # ascending); each row's metadata [id + 1, probs] travels in a second collective.
        send_plan, meta_SW = pack_rows(idx_TK, probs_TK, E, L, send_splits, fused)
        # A group of one sending every token: the send buffer would be x itself, row for row.
        identity = self.R == 1 and send_splits[0] == x_TH.shape[0] and \
            self.cfg.wire_dtype is None
        recv_x = x_TH if identity else self._send_rows(x_TH, send_plan, send_splits,
                                                        recv_splits)
        recv_meta = comm.all_to_all(meta_SW, recv_splits, send_splits, self.group)
        plan, probs_NK = exact_receive_plan(recv_meta, K, self.rank * L, L, tokens_per_expert,
                                            self.cfg.pad_multiple, fused)
        tokens, probs, fp8_rows = self._receive_rows(x_TH, recv_x, probs_NK, plan,
                                                     send_plan, send_splits, recv_splits)
        handle = AllToAllHandle(send_plan, tuple(send_splits), tuple(recv_splits), plan,
                                identity)
        # Host ints (a CPU tensor), so the caller's grouped GEMM sizes itself without a sync.
        return DispatchResult(tokens, tpe_L, probs, handle, fp8=fp8_rows)

    def _exchange_routing(self, x_TH, idx_TK, probs_TK, check: PendingCheck):
        """The exact mode's count exchange and its single host sync; raises on every rank
        if any rank's input was bad or the hidden sizes differ. Returns (idx_TK, probs_TK
        widened to the widest rank's K, send_splits, recv_splits, tokens_per_expert: host
        int lists, and tokens_per_expert padded as a CPU int64 tensor)."""
        E, L, H = self.cfg.num_experts, self.L, x_TH.shape[1]
        # One message per destination: [rows, code, H, K, per-local-expert rows...].
        msg_RC = route_message(idx_TK, check.code(x_TH.device), E, L, H, per_rank=True,
                               probs_TK=probs_TK if check.in_message else None)
        recv_RC = comm.exchange_ints(msg_RC, self.group)
        # The single host sync of this dispatch.
        (sent, got), (_, got_t) = read_tables(msg_RC, recv_RC)
        check.raise_if_failed([row[1] for row in got], self.rank)
        hiddens = [row[2] for row in got]
        if any(h != H for h in hiddens):
            raise DispatchInputError(f"dispatch: hidden size differs across EP ranks: {hiddens}")
        # Metadata rows must have one width everywhere; a narrower K is widened with -1 slots.
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, max(row[3] for row in got))
        tokens_per_expert, tpe_L = expert_counts(got_t, HEAD, L, self.cfg.pad_multiple)
        return (idx_TK, probs_TK, [row[0] for row in sent], [row[0] for row in got],
                tokens_per_expert, tpe_L)

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
        if handle.send_identity:  # one row per token, in token order: the sum is the row
            return back
        # Each token's rows from its destination ranks, summed in float32.
        return unpermute(back, handle.send_plan)

    def _combine_budget(self, y_BH: torch.Tensor, handle: AllToAllBudgetHandle) -> torch.Tensor:
        R, C = self.R, handle.send_plan.num_out_rows // self.R
        per_row = unpermute(y_BH, handle.plan)
        back = comm.all_to_all(per_row, [C] * R, [C] * R, self.group)
        return pad_rows(unpermute(back, handle.send_plan), handle.num_tokens)
