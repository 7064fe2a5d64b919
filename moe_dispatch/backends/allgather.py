"""``allgather``: every rank gathers all tokens and routing, keeps its experts' rows,
and combine reduce-scatters the per-token partial sums back to their owners.

Simple and robust (no per-pair splits), but each rank receives every token: it moves
R times the bytes of ``alltoall`` at low top-k and suits small EP groups or
near-dense routing. Uneven token counts are padded to the largest rank's T.

Host syncs: one per dispatch (token counts and per-expert counts arrive in one gather,
with validation folded in). Combine never syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import comm
from ..permute import GroupPlan, group_plan, permute, unpermute
from ..routing import pad_topk
from ..protocol import DispatchInputError, DispatchResult, PendingCheck


@dataclass(frozen=True)
class AllGatherHandle:
    """plan: grouping of this rank's rows of the gathered [R * T_max] tokens;
    num_tokens: T (this rank); max_tokens: T_max (gather padding)."""

    plan: GroupPlan
    num_tokens: int
    max_tokens: int


class AllGatherBackend(comm.CollectiveBackendBase):
    name = "allgather"

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        L, E, me = self.L, self.cfg.num_experts, self.rank
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        dev = x_TH.device
        valid_TK = (idx_TK >= 0) & (idx_TK < E)
        ekey = torch.where(valid_TK, idx_TK, E).reshape(-1)
        counts_E = torch.zeros(E + 1, dtype=torch.long, device=dev)
        counts_E.scatter_add_(0, ekey, torch.ones_like(ekey))
        msg = torch.cat([comm.ints_on([T, K, H], dev),
                         check.code(dev).view(1), counts_E[:E]])
        # The single host sync of this dispatch.
        table = comm.gather_ints(msg, self.group).tolist()
        check.raise_if_failed([row[3] for row in table], me)
        hiddens = [row[2] for row in table]
        if any(h != H for h in hiddens):
            raise DispatchInputError(f"dispatch: hidden size differs across EP ranks: {hiddens}")
        # Gathered rows must have one width; a narrower K is widened with -1 slots.
        K = max(row[1] for row in table)
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K)
        t_max = max(row[0] for row in table)
        tokens_per_expert = [sum(row[4 + me * L + l] for row in table) for l in range(L)]

        pad = t_max - T
        x_pad = torch.nn.functional.pad(x_TH, (0, 0, 0, pad)) if pad else x_TH
        meta = torch.cat([idx_TK.to(torch.float32), probs_TK], dim=1)
        if pad:
            filler = torch.cat([torch.full((pad, K), -1.0, device=dev),
                                torch.zeros(pad, K, device=dev)], dim=1)
            meta = torch.cat([meta, filler], dim=0)
        all_x = comm.all_gather(x_pad, self.group)
        all_meta = comm.all_gather(meta, self.group)
        gidx = all_meta[:, :K].detach().to(torch.long)
        mine = (gidx >= me * L) & (gidx < (me + 1) * L)
        lid_NK = torch.where(mine, gidx - me * L, -1)
        plan = group_plan(lid_NK, L, tokens_per_expert, self.cfg.pad_multiple)
        tokens, probs = permute(all_x, all_meta[:, K:], plan)
        return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                              probs, AllGatherHandle(plan, T, t_max))

    def combine(self, y_NH: torch.Tensor, handle: AllGatherHandle) -> torch.Tensor:
        partial = unpermute(y_NH, handle.plan)
        mine = comm.reduce_scatter(partial, self.group)
        return mine[:handle.num_tokens]
