"""A small decoder-only MoE language model (byte vocabulary) for end-to-end training.

Shapes: B sequences, S positions, H hidden, V vocabulary, E experts, NL layers.

Every block is pre-norm causal self-attention (RoPE) followed by an MoE MLP. The global
model does not depend on the expert-parallel layout: dense weights are drawn from one
generator in a fixed order and each expert from a seed of its global id, so an EP=4 run
holds exactly the slices of the EP=1 model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import MoELayer


@dataclass
class ModelConfig:
    """Model shape and MoE options (the ``model:`` section of a recipe).

    vocab_size:           V (256: bytes).
    hidden:               H.
    layers:               number of transformer blocks (each with an MoE MLP).
    heads:                attention heads (hidden % heads == 0, head dim even for RoPE).
    seq_len:              S, the context length trained on.
    num_experts:          E routed experts per layer.
    top_k:                K experts per token.
    ffn_hidden:           F, width of each routed expert.
    shared_expert_hidden: width of a dense shared expert per layer (0 = none).
    score_func:           router scores, "softmax" | "sigmoid".
    norm_topk_prob:       renormalize the K chosen probs (None: router default).
    score_bias:           DeepSeek-style selection bias, updated towards balance each step.
    bias_update_rate:     step size of that bias update.
    aux_loss_coeff:       load-balancing loss weight.
    z_loss_coeff:         router z-loss weight.
    expert_impl:          "auto" | "grouped_mm" | "loop".
    activation_checkpointing: recompute the MoE layers' dispatch/experts/combine in backward.
    init_std:             std of weight init (output projections get std / sqrt(2 * layers)).
    rope_theta:           RoPE base.
    """

    vocab_size: int = 256
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 64
    num_experts: int = 8
    top_k: int = 2
    ffn_hidden: int = 128
    shared_expert_hidden: int = 0
    score_func: str = "softmax"
    norm_topk_prob: Optional[bool] = None
    score_bias: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    expert_impl: str = "auto"
    activation_checkpointing: bool = False
    init_std: float = 0.02
    rope_theta: float = 10000.0

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads "
                             f"({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError("model.hidden / model.heads must be even (RoPE rotates pairs)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.top_k must be in [1, num_experts={self.num_experts}]")


@dataclass(frozen=True)
class ModelOutput:
    """logits_BSV [B, S, V] float32; aux_loss / z_loss 0-dim float32 summed over layers;
    tokens_per_expert_NE [layers, E] int64 slots this rank routed to each expert;
    statuses: the budget-mode dispatch status of each layer ([1] int32 device), or ()."""

    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_NE: torch.Tensor
    statuses: tuple = ()


def _rope_tables(seq_len: int, head_dim: int, theta: float):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang_SD = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang_SD.cos().float(), ang_SD.sin().float()


def _apply_rope(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    S = x_BNSD.shape[2]
    x1, x2 = x_BNSD[..., 0::2], x_BNSD[..., 1::2]
    c, s = cos_SD[:S].to(x_BNSD.dtype), sin_SD[:S].to(x_BNSD.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        cos, sin = _rope_tables(cfg.seq_len, self.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        q, k, v = self.qkv(x_BSH).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _apply_rope(q, self.rope_cos, self.rope_sin), _apply_rope(k, self.rope_cos, self.rope_sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatcher: nn.Module, seed: int, layer_id: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.moe_norm = nn.RMSNorm(cfg.hidden)
        self.moe = MoELayer(
            cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, dispatcher=dispatcher,
            shared_expert_hidden=cfg.shared_expert_hidden,
            router_kwargs=dict(score_func=cfg.score_func, norm_topk_prob=cfg.norm_topk_prob,
                               score_bias=cfg.score_bias, aux_loss_coeff=cfg.aux_loss_coeff,
                               z_loss_coeff=cfg.z_loss_coeff, init_std=cfg.init_std),
            expert_impl=cfg.expert_impl, seed=seed, layer_id=layer_id,
            init_std=cfg.init_std, out_init_std=cfg.init_std / math.sqrt(2 * cfg.layers),
            activation_checkpointing=cfg.activation_checkpointing)

    def forward(self, x_BSH: torch.Tensor):
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH))
        m = self.moe(self.moe_norm(x_BSH))
        return x_BSH + m.output, m


class MoETransformer(nn.Module):
    """Decoder-only MoE LM.

    cfg:        ``ModelConfig``.
    dispatcher: ``MoETokenDispatcher`` shared by all layers (it is stateless per call);
                it decides which experts this rank holds.
    seed:       init seed; the same seed gives the same global model for any EP layout.
    """

    def __init__(self, cfg: ModelConfig, dispatcher: nn.Module, seed: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, dispatcher, seed, i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.init_dense_weights(seed)

    @torch.no_grad()
    def init_dense_weights(self, seed: int) -> None:
        """Draw every non-expert weight from one CPU generator in parameter order (experts
        seed themselves), so neither the device nor the EP layout changes the values."""
        g = torch.Generator().manual_seed(int(seed))
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.layers)
        for name, p in self.named_parameters():
            if self.is_expert_param(name):
                continue
            if p.dim() == 1:  # norm gains
                p.fill_(1.0)
                continue
            std = out_std if name.endswith(("attn.out.weight", "shared_expert.w2.weight")) \
                else self.cfg.init_std
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)

    @staticmethod
    def is_expert_param(name: str) -> bool:
        """True for routed-expert weights (sharded over EP, replicated over data parallel)."""
        return ".experts." in name

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if self.is_expert_param(n))

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if not self.is_expert_param(n))

    def routers(self):
        return [b.moe.router for b in self.blocks]

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        """tokens_BS: [B, S] int64 byte ids (S <= cfg.seq_len)."""
        x_BSH = self.embed(tokens_BS)
        aux = x_BSH.new_zeros((), dtype=torch.float32)
        z = x_BSH.new_zeros((), dtype=torch.float32)
        counts, statuses = [], []
        for blk in self.blocks:
            x_BSH, m = blk(x_BSH)
            aux, z = aux + m.aux_loss, z + m.z_loss
            counts.append(m.tokens_per_expert_E)
            if m.status is not None:
                statuses.append(m.status)
        logits_BSV = self.head(self.norm(x_BSH)).float()
        return ModelOutput(logits_BSV, aux, z, torch.stack(counts), tuple(statuses))

    def moe_layers(self):
        return [b.moe for b in self.blocks]

    def capture_moe_graphs(self, tokens_BS: torch.Tensor, graphs=None) -> None:
        """Capture every MoE layer's forward + backward as CUDA graphs (``capture_layers``:
        afterwards their parameters' ``.grad`` are fixed buffers the graphs add into; zero
        them in place), for inputs shaped like this batch's; call it under the autocast the
        model trains in (with ``cache_enabled=False``). A forward without grad first finds
        each layer's input shape and dtype (and lets the budget mode agree its sizes).

        tokens_BS: [B, S] int64, a batch shaped like the training batches.
        graphs:    ``layer_graph.GraphKit`` (None: CUDA graphs; tests pass a CPU stand-in).
        """
        from .layer import capture_layers
        seen = []
        hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
                 for m in self.moe_layers()]
        try:
            with torch.no_grad():
                self(tokens_BS)
        finally:
            for h in hooks:
                h.remove()
        samples = [torch.randn(x.shape, dtype=x.dtype, device=x.device).requires_grad_(True)
                   for x in seen]
        kw = {} if graphs is None else {"graphs": graphs}
        capture_layers(self.moe_layers(), samples, **kw)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy (nats)."""
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
