"""Top-k router: scores, expert choice, load-balancing losses.

Shapes: T tokens, H hidden, E experts, K top-k.

The router only decides; it never drops tokens. Capacity limits are applied by the
dispatcher (``MoETokenDispatcher(capacity_factor=...)``), which owns the per-rank view
that capacity is defined on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterOutput:
    """One routing decision.

    idx_TK:              [T, K] int64 global expert ids, each row's experts distinct.
    probs_TK:            [T, K] float32 combine weights (differentiable w.r.t. the router).
    scores_TE:           [T, E] float32 scores before top-k (softmax or sigmoid of the logits).
    aux_loss:            0-dim float32 load-balancing loss, already times its coefficient
                         (0 when the coefficient is 0).
    z_loss:              0-dim float32 router z-loss, already times its coefficient.
    tokens_per_expert_E: [E] int64 slots routed to each expert from these T tokens (no grad).
    """

    idx_TK: torch.Tensor
    probs_TK: torch.Tensor
    scores_TE: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor

    def routing_map(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The same decision in dense form: (routing_map_TE bool, probs_TE float32, 0 where
        not routed). Autograd flows through ``probs_TE`` back to the router."""
        T, E = self.scores_TE.shape
        map_TE = torch.zeros(T, E, dtype=torch.bool, device=self.idx_TK.device)
        map_TE.scatter_(1, self.idx_TK, True)
        probs_TE = self.probs_TK.new_zeros(T, E).scatter(1, self.idx_TK, self.probs_TK)
        return map_TE, probs_TE


class TopKRouter(nn.Module):
    """Linear gate + top-k expert choice.

    hidden:          H, input width.
    num_experts:     E.
    top_k:           K experts per token (1 <= K <= E).
    score_func:      "softmax" (over all E logits) or "sigmoid" (per expert, DeepSeek-V3).
    norm_topk_prob:  renormalize the K chosen scores to sum to 1. None picks the common
                     default: False for softmax, True for sigmoid.
    score_bias:      keep a per-expert bias (buffer ``expert_bias`` [E], float32) that is
                     added to the scores for expert *selection only* (the combine weights
                     never see it); it is moved towards balance by ``update_expert_bias``
                     (auxiliary-loss-free balancing, DeepSeek-V3).
    aux_loss_coeff:  weight of the load-balancing loss E * sum_e f_e * P_e, with f_e the
                     fraction of the T*K slots sent to expert e and P_e the mean (normalized)
                     score of e; it is 1 for perfectly uniform routing.
    z_loss_coeff:    weight of the z-loss mean_t logsumexp(logits_t)^2 (keeps logits small).
    init_std:        std of the gate weight init (``reset_parameters``).

    Routing runs in float32 whatever the input dtype: top-k on low-precision scores flips
    near-ties between runs, which changes the dispatch layout.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, *,
                 score_func: str = "softmax", norm_topk_prob: Optional[bool] = None,
                 score_bias: bool = False, aux_loss_coeff: float = 0.0,
                 z_loss_coeff: float = 0.0, init_std: float = 0.02):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden = hidden
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = (score_func == "sigmoid") if norm_topk_prob is None \
            else bool(norm_topk_prob)
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.z_loss_coeff = float(z_loss_coeff)
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32))
        if score_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std, generator=generator)
            if self.expert_bias is not None:
                self.expert_bias.zero_()

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        """x_TH: [T, H] (or [..., H], flattened to T rows). Returns a ``RouterOutput``."""
        x_TH = x_TH.reshape(-1, self.hidden)
        T, E, K = x_TH.shape[0], self.num_experts, self.top_k
        with torch.autocast(x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.weight.float())
        if self.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE.detach()
        if self.expert_bias is not None:
            select_TE = select_TE + self.expert_bias
        _, idx_TK = torch.topk(select_TE, K, dim=-1)
        probs_TK = scores_TE.gather(1, idx_TK)
        if self.norm_topk_prob:
            probs_TK = probs_TK / probs_TK.sum(-1, keepdim=True).clamp_min(1e-20)

        counts_E = torch.zeros(E, dtype=torch.int64, device=x_TH.device)
        counts_E.scatter_add_(0, idx_TK.reshape(-1), torch.ones_like(idx_TK.reshape(-1)))

        zero = logits_TE.new_zeros(())
        aux = zero
        if self.aux_loss_coeff > 0 and T > 0:
            # Sigmoid scores do not sum to 1: normalize so P_e is a distribution (DeepSeek-V3).
            p_TE = scores_TE if self.score_func == "softmax" else \
                scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            f_E = counts_E.float() / (T * K)
            aux = self.aux_loss_coeff * E * torch.sum(f_E * p_TE.mean(0))
        z = zero
        if self.z_loss_coeff > 0 and T > 0:
            z = self.z_loss_coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
        return RouterOutput(idx_TK, probs_TK, scores_TE, aux, z, counts_E)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """Move ``expert_bias`` towards balance: +rate for under-loaded experts, -rate for
        over-loaded ones (sign of mean load minus load).

        tokens_per_expert_E: [E] counts over the *whole* data-parallel batch (all-reduce
        them first) so that every rank applies the same update and replicas stay equal.
        """
        if self.expert_bias is None:
            raise RuntimeError("update_expert_bias needs TopKRouter(score_bias=True)")
        load_E = tokens_per_expert_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))
