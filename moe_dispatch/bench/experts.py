"""Expert modules for the MoE-layer forward+backward benchmark.

Every dispatcher in one run (ours and Megatron-Core's) feeds the *same* experts module on
the same routing, so the layer numbers differ only by the dispatch/combine path. The
project's grouped experts (``token_dispatcher.experts``) are used when they can be built;
otherwise a plain per-expert two-layer MLP.

Shapes: N dispatched rows, H hidden, F expert hidden size, L local experts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


class SimpleExperts(nn.Module):
    """L independent MLPs ``gelu(x @ w1[e]) @ w2[e]``, output scaled by each row's prob.

    Called as ``experts(tokens_NH, tokens_per_expert_L, probs_N) -> [N, H]`` with rows
    grouped by local expert (the dispatcher contract).
    """

    def __init__(self, num_local_experts: int, hidden: int, ffn: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.w1_LHF = nn.Parameter(torch.empty(num_local_experts, hidden, ffn, **kw)
                                   .normal_(0.0, hidden ** -0.5))
        self.w2_LFH = nn.Parameter(torch.empty(num_local_experts, ffn, hidden, **kw)
                                   .normal_(0.0, ffn ** -0.5))

    def forward(self, tokens_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor,
                probs_N: torch.Tensor) -> torch.Tensor:
        counts = [int(c) for c in tokens_per_expert_L.tolist()]
        outs = []
        for e, x_nH in enumerate(torch.split(tokens_NH, counts)):
            if x_nH.shape[0]:
                outs.append(torch.nn.functional.gelu(x_nH @ self.w1_LHF[e]) @ self.w2_LFH[e])
            else:
                outs.append(x_nH)
        y_NH = torch.cat(outs) if outs else tokens_NH
        return y_NH * probs_N.to(y_NH.dtype).unsqueeze(1)


def _project_experts(num_experts: int, num_local_experts: int, offset: int, hidden: int,
                     ffn: int, dtype: torch.dtype, device: torch.device) -> Optional[nn.Module]:
    """The project's grouped SwiGLU experts (``token_dispatcher.experts.GroupedExperts``),
    initialised on the device (the bench needs no reproducible init, and the CPU init of
    hundreds of millions of weights would cost seconds per rank)."""
    try:
        from token_dispatcher.experts import GroupedExperts
    except Exception:
        return None

    class _DeviceInit(GroupedExperts):
        @torch.no_grad()
        def reset_parameters(self) -> None:
            for w in (self.w1, self.w3, self.w2):
                w.normal_(0.0, self.init_std)

    try:
        m = _DeviceInit(num_experts, hidden, ffn, num_local_experts=num_local_experts,
                        local_expert_offset=offset, dtype=dtype, device=device)
        # Accept it only if it honours the dispatcher's expert contract on a tiny input.
        counts = torch.zeros(num_local_experts, dtype=torch.long)
        counts[0] = 2
        y = m(torch.zeros(2, hidden, dtype=dtype, device=device), counts,
              torch.ones(2, device=device))
        if isinstance(y, torch.Tensor) and tuple(y.shape) == (2, hidden):
            return m
    except Exception:
        pass
    return None


def build_experts(num_experts: int, num_local_experts: int, offset: int, hidden: int, ffn: int,
                  dtype: torch.dtype, device: torch.device,
                  prefer_project: bool = True) -> Tuple[nn.Module, str]:
    """Return ``(experts, label)`` for the L = ``num_local_experts`` experts starting at global
    id ``offset``; label names which implementation is used."""
    if prefer_project:
        m = _project_experts(num_experts, num_local_experts, offset, hidden, ffn, dtype, device)
        if m is not None:
            probe = torch.empty(0, hidden, dtype=dtype, device=device)
            impl = m.resolved_impl(probe) if hasattr(m, "resolved_impl") else "?"
            return m, f"token_dispatcher.experts.GroupedExperts (SwiGLU, {impl})"
    return SimpleExperts(num_local_experts, hidden, ffn, dtype, device), "simple per-expert MLP"
