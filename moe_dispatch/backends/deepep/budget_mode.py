"""The budget mode (``max_rows_per_rank = B``) of the DeepEP-V1-style backends, sync-free.

DeepEP V1's intranode dispatch takes ``num_worst_tokens=N``: it then allocates N received
rows instead of waiting on the host for the received count ("no CPU sync, CUDA-graph
compatible", intranode only). What it returns then (v1.2.1, ``csrc/deep_ep.cpp``,
``csrc/kernels/intranode.cu``): ``recv_x`` / ``recv_topk_weights`` / the handle's
``recv_src_idx`` have N rows of which only the first (received count) are written, the
rest is uninitialised memory; ``recv_topk_idx`` is -1 in those rows (the kernel cleans
them); the per-expert count list is empty. Combine and the cached dispatch take and give N
rows and touch only the received ones.

The backends choose N = R * (T_cap + 1): a source rank sends a destination at most its
T_cap tokens (``BudgetShape``: agreed at the first call) plus one flag row (below), so no
receive ever overflows N. The received local ids then go through
``permute.budget_plan`` (device only) into exactly B expert-grouped rows.

The validation flag. In the exact mode it rides in DeepEP's per-expert counts, a host list
this mode no longer gets. Here it rides as data, in rows the kernels move anyway: every
rank appends R *flag rows* to what it sends, row r addressed to local expert 0 of rank r
through one extra top-k column (K + 1: real tokens have -1 there, flag rows have -1 in
the K real columns), with the rank's code in that column's weight: bits 0-1 the
validation code (``PendingCheck.code``), bit 2 "this rank clipped tokens over T_cap". So
every rank receives exactly one flag row from every rank (DeepEP delivers each token to
each rank its slots name), recognises it by the extra column, and ORs the codes into its
status. Flag rows carry zero hidden rows, reach no expert (their real slots are -1) and
come back from combine as zeros, which are cut. Cost: R extra rows per rank and one
12-byte slot per row on the wire; DeepEP copies a row's slots with one warp, so K + 1 must
stay <= 32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...permute import BudgetPlan

# Weight bits of a flag row's extra slot.
FLAG_CODE_MASK = 3    # the sender's validation code (0 ok, 1 value error, 2 host error)
FLAG_CLIPPED = 4      # the sender had more than T_cap tokens and sent the first T_cap
MAX_WIRE_TOPK = 32    # DeepEP V1 copies a token's top-k slots with the lanes of one warp


@dataclass(frozen=True)
class V1BudgetHandle:
    """What combine needs from one budget-mode dispatch (every size fixed in advance).

    comm_handle:  the library's handle (layout of the N = R * (T_cap + 1) received rows);
                  None with one rank.
    plan:         ``BudgetPlan`` of the received rows [N, K] into the B output rows.
    num_sent:     T_sent, real tokens this rank sent (combine's rows before the flag rows).
    num_tokens:   the caller's T (rows past T_sent come back as zeros).
    out_dtype:    dtype combine returns (the caller's hidden dtype).
    status:       [1] int32 device ``protocol.STATUS_*`` bits.
    """

    comm_handle: Any
    plan: BudgetPlan
    num_sent: int
    num_tokens: int
    out_dtype: torch.dtype
    status: torch.Tensor


def num_worst_tokens(num_ranks: int, token_cap: int) -> int:
    """N: the most rows one rank can receive (T_cap tokens plus one flag row per source)."""
    return num_ranks * (token_cap + 1)


def wire_input(x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
               code: torch.Tensor, clipped: bool, num_local_experts: int, num_ranks: int):
    """The rows this rank hands DeepEP: its T tokens, then R flag rows (see module doc).

    x_TH:     [T, H] wire-dtype rows (T <= T_cap).   idx_TK, probs_TK: [T, K] routing.
    code:     0-dim int device tensor, this rank's validation code.
    clipped:  whether this rank dropped tokens over T_cap (host bool).
    num_local_experts, num_ranks: L and R.
    Returns (x [T+R, H], idx [T+R, K+1] int64, weights [T+R, K+1] float32), contiguous;
    differentiable w.r.t. ``x_TH`` and ``probs_TK``.
    """
    T, K = idx_TK.shape
    R, L = num_ranks, num_local_experts
    dev = idx_TK.device
    flag_w = code.to(torch.float32).reshape(1) + (FLAG_CLIPPED if clipped else 0)
    # Flag row r: -1 in the K real slots, local expert 0 of rank r in the extra slot.
    flag_idx_RK1 = torch.cat([idx_TK.new_full((R, K), -1),
                              (torch.arange(R, device=dev) * L).view(R, 1)], 1)
    flag_w_RK1 = torch.cat([probs_TK.new_zeros(R, K), flag_w.expand(R).view(R, 1)], 1)
    idx = torch.cat([torch.cat([idx_TK, idx_TK.new_full((T, 1), -1)], 1), flag_idx_RK1])
    w = torch.cat([torch.cat([probs_TK, probs_TK.new_zeros(T, 1)], 1), flag_w_RK1])
    x = torch.cat([x_TH, x_TH.new_zeros(R, x_TH.shape[1])])
    return x.contiguous(), idx.contiguous(), w.contiguous()


def read_flags(recv_idx_NK1: torch.Tensor, recv_w_NK1: torch.Tensor):
    """(bad, clipped): 0-dim bool device tensors, whether any rank's flag row says its input
    was bad / it clipped tokens. recv_*: the received [N, K+1] top-k ids and weights; only
    flag rows have an id in the last slot (real and unused rows hold -1 there)."""
    is_flag_N = recv_idx_NK1[:, -1] >= 0
    # Unused rows hold uninitialised weights: select, never multiply by a mask.
    val_N = torch.where(is_flag_N, recv_w_NK1[:, -1].detach(), 0.0).to(torch.int64)
    return ((val_N & FLAG_CODE_MASK) != 0).any(), ((val_N & FLAG_CLIPPED) != 0).any()
