"""MoE layer: router -> dispatcher -> grouped experts -> combine (+ optional shared expert).

Shapes: T tokens, H hidden, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .experts import GroupedExperts
from .router import RouterOutput, TopKRouter


@dataclass(frozen=True)
class MoEOutput:
    """What ``MoELayer.forward`` returns.

    output:              same shape and dtype as the input.
    aux_loss:            0-dim float32 load-balancing loss (coefficient applied).
    z_loss:              0-dim float32 router z-loss (coefficient applied).
    tokens_per_expert_E: [E] int64 slots this rank's tokens sent to each global expert.
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (the shared expert): (silu(x W1) * x W3) W2."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoELayer(nn.Module):
    """A mixture-of-experts MLP over an expert-parallel group.

    hidden:               H.
    ffn_hidden:           F, width of each routed expert.
    num_experts:          E (global).
    top_k:                K.
    dispatcher:           a ``MoETokenDispatcher`` for E experts; it fixes the EP group,
                          backend, capacity factor and padding, and which experts are local.
                          It is stateless between calls, so layers may share one.
    shared_expert_hidden: width of a dense shared SwiGLU expert applied to every token
                          (0 = none).
    router_kwargs:        passed to ``TopKRouter`` (score_func, norm_topk_prob, score_bias,
                          aux_loss_coeff, z_loss_coeff, init_std).
    expert_impl:          "auto" | "grouped_mm" | "loop" (``GroupedExperts``).
    seed, layer_id:       expert init seeds (``GroupedExperts``).
    activation_checkpointing: recompute dispatch, experts and combine in backward instead
                          of keeping their activations. The router runs once, outside the
                          checkpoint, and its top-k choice is an *input* of the recomputed
                          region, so the dispatch layout in recompute is the forward's by
                          construction (a re-run top-k could pick other experts on a
                          near-tie and silently corrupt gradients).
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *,
                 dispatcher: nn.Module, shared_expert_hidden: int = 0,
                 router_kwargs: Optional[dict] = None, expert_impl: str = "auto",
                 seed: int = 0, layer_id: int = 0, init_std: float = 0.02,
                 out_init_std: Optional[float] = None,
                 activation_checkpointing: bool = False):
        super().__init__()
        disp_E = getattr(dispatcher, "num_experts", num_experts)
        if disp_E != num_experts:
            raise ValueError(f"dispatcher is built for {disp_E} experts, layer for {num_experts}")
        self.hidden = hidden
        self.router = TopKRouter(hidden, num_experts, top_k, **(router_kwargs or {}))
        self.dispatcher = dispatcher
        self.experts = GroupedExperts(
            num_experts, hidden, ffn_hidden,
            num_local_experts=dispatcher.num_local_experts,
            local_expert_offset=dispatcher.local_expert_offset,
            impl=expert_impl, seed=seed, layer_id=layer_id,
            init_std=init_std, out_init_std=out_init_std)
        self.shared_expert = SwiGLU(hidden, shared_expert_hidden) if shared_expert_hidden else None
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x: [..., H] (e.g. [B, S, H] or [T, H]). Returns ``MoEOutput``."""
        shape = x.shape
        x_TH = x.reshape(-1, self.hidden)
        route: RouterOutput = self.router(x_TH)
        if self.activation_checkpointing and torch.is_grad_enabled():
            y_TH = checkpoint(self._routed, x_TH, route.idx_TK, route.probs_TK,
                              use_reentrant=False)
        else:
            y_TH = self._routed(x_TH, route.idx_TK, route.probs_TK)
        return MoEOutput(y_TH.reshape(shape), route.aux_loss, route.z_loss,
                         route.tokens_per_expert_E)

    def _routed(self, x_TH: torch.Tensor, idx_TK: torch.Tensor,
                probs_TK: torch.Tensor) -> torch.Tensor:
        x_send = x_TH
        dev = x_TH.device.type
        if torch.is_autocast_enabled(dev):
            # Move tokens in the autocast dtype: half the bytes, and the experts compute in it.
            x_send = x_TH.to(torch.get_autocast_dtype(dev))
        y_TH = self.dispatcher(x_send, self.experts, topk_idx=idx_TK, topk_probs=probs_TK)
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared_expert(x_TH)
        return y_TH
