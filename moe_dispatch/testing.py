"""Random routing cases and a single-process dense reference, for tests and ``bench --check``.

The reference is written with plain loops over experts and tokens, independent of the
vectorized code it checks. A "case" holds every rank's inputs, so one process can
compute what each rank of a distributed run must produce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class Case:
    """Inputs of every EP rank: xs[r] [T_r, H], idxs[r] [T_r, K] int64 (-1 masked),
    probs[r] [T_r, K] float32 (``masked_prob``, default 0, where masked), W [E, H, H]
    expert weights, gouts[r] [T_r, H] upstream gradients."""

    xs: List[torch.Tensor]
    idxs: List[torch.Tensor]
    probs: List[torch.Tensor]
    W: torch.Tensor
    gouts: List[torch.Tensor]
    num_experts: int

    @property
    def world(self) -> int:
        return len(self.xs)


def make_case(world: int, tokens: Sequence[int], hidden: int, num_experts: int, topk: int, *,
              seed: Optional[int] = None, mask_frac: float = 0.0, skew: Optional[str] = None,
              dtype=torch.float32, masked_prob: float = 0.0) -> Case:
    """Fresh random routing for ``world`` ranks with ``tokens[r]`` tokens each.

    skew: None (uniform distinct experts), "zipf" (popularity ~ 1/rank^1.2), or
          "one_expert" (every token's first slot is one random expert; with K=1 all tokens
          go to it).
    mask_frac: fraction of slots set to -1.
    masked_prob: the prob left in masked slots (the reference ignores it, as backends must;
          nonzero tests that they do).
    """
    g = torch.Generator().manual_seed(seed if seed is not None else
                                      int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))
    xs, idxs, probs, gouts = [], [], [], []
    hot = int(torch.randint(0, num_experts, (1,), generator=g).item())
    for r in range(world):
        T = tokens[r]
        if skew == "zipf":
            w = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
            w = w[torch.randperm(num_experts, generator=g)]
            idx = torch.multinomial(w.expand(T, -1), topk, replacement=False, generator=g) \
                if T else torch.zeros(0, topk, dtype=torch.long)
        else:
            idx = torch.rand(T, num_experts, generator=g).argsort(1)[:, :topk]
        if skew == "one_expert" and T:
            # put the hot expert in slot 0 without duplicating it in another slot
            others = torch.rand(T, num_experts, generator=g)
            others[:, hot] = 2.0
            idx = torch.cat([torch.full((T, 1), hot), others.argsort(1)[:, :topk - 1]], 1)
        idx = idx.long()
        p = torch.rand(T, topk, generator=g) + 0.05
        p = p / p.sum(1, keepdim=True)
        if mask_frac > 0 and T:
            m = torch.rand(T, topk, generator=g) < mask_frac
            idx = idx.masked_fill(m, -1)
            p = p.masked_fill(m, masked_prob)
        xs.append(torch.randn(T, hidden, generator=g).to(dtype))
        idxs.append(idx)
        probs.append(p.float())
        gouts.append(torch.randn(T, hidden, generator=g).to(dtype))
    W = torch.randn(num_experts, hidden, hidden, generator=g) / math.sqrt(hidden)
    return Case(xs, idxs, probs, W.to(dtype), gouts, num_experts)


def expert_fn(W_e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The test expert: a distinct nonlinear map per expert."""
    return torch.tanh(x @ W_e)


def capacity_mask_reference(idx_TK: torch.Tensor, probs_TK: torch.Tensor, num_experts: int,
                            capacity_factor: float, policy: str = "probs") -> torch.Tensor:
    """Loop version of the capacity rule: [T, K] bool, True where the slot is kept."""
    T, K = idx_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    if T == 0:
        return keep
    cap = int(math.ceil(T * K / num_experts * capacity_factor))
    for e in range(num_experts):
        slots = [(t, k) for t in range(T) for k in range(K) if int(idx_TK[t, k]) == e]
        if policy == "probs":
            slots.sort(key=lambda s: (-float(probs_TK[s]), s[0] * K + s[1]))
        for s in slots[:cap]:
            keep[s] = True
    return keep


def reference_dispatch(case: Case, rank: int, pad_multiple: Optional[int] = None,
                       idxs: Optional[List[torch.Tensor]] = None):
    """What rank ``rank`` must receive: (tokens [N, H], tokens_per_expert [L], probs [N]).

    Rows grouped by local expert ascending; within an expert by source rank, then token,
    then slot. ``idxs`` overrides the case's routing (e.g. after capacity drop).
    """
    idxs = case.idxs if idxs is None else idxs
    R, E = case.world, case.num_experts
    L = E // R
    H = case.xs[0].shape[1]
    rows, ps, counts = [], [], []
    for l in range(L):
        e = rank * L + l
        n = 0
        for s in range(R):
            for t in range(case.xs[s].shape[0]):
                for k in range(idxs[s].shape[1]):
                    if int(idxs[s][t, k]) == e:
                        rows.append(case.xs[s][t])
                        ps.append(float(case.probs[s][t, k]))
                        n += 1
        if pad_multiple:
            pad = (-n) % pad_multiple
            rows.extend([torch.zeros(H, dtype=case.xs[0].dtype)] * pad)
            ps.extend([0.0] * pad)
            n += pad
        counts.append(n)
    tokens = torch.stack(rows) if rows else torch.zeros(0, H, dtype=case.xs[0].dtype)
    return tokens, torch.tensor(counts, dtype=torch.long), torch.tensor(ps, dtype=torch.float32)


def reference_moe(case: Case, idxs: Optional[List[torch.Tensor]] = None):
    """Dense single-process MoE: y_t = sum_k p_tk * f_{e_tk}(x_t) on every rank's tokens.

    Returns (ys, grad_xs, grad_probs), lists per rank, grads of sum(y * gout) in float64.
    """
    idxs = case.idxs if idxs is None else idxs
    W = case.W.double()
    ys, gx, gp = [], [], []
    for r in range(case.world):
        x = case.xs[r].double().requires_grad_(True)
        p = case.probs[r].double().requires_grad_(True)
        y = torch.zeros_like(x)
        for e in range(case.num_experts):
            sel = (idxs[r] == e)
            if not bool(sel.any()):
                continue
            w_T = (p * sel).sum(1, keepdim=True)
            y = y + w_T * expert_fn(W[e], x) * sel.any(1, keepdim=True)
        (y * case.gouts[r].double()).sum().backward() if y.requires_grad else None
        ys.append(y.detach())
        gx.append(x.grad if x.grad is not None else torch.zeros_like(x))
        gp.append(p.grad if p.grad is not None else torch.zeros_like(p))
    return ys, gx, gp


def local_experts(W: torch.Tensor, offset: int):
    """Expert callable for ``MoETokenDispatcher.forward``: rows of local expert l use
    W[offset + l]; probs are applied here, as real experts do. Rows past
    sum(tokens_per_expert) (a static-budget buffer's tail) give zeros."""
    def run(tokens_NH, tokens_per_expert_L, probs_N):
        outs, start = [], 0
        for l, n in enumerate(tokens_per_expert_L.tolist()):
            outs.append(expert_fn(W[offset + l].to(tokens_NH.dtype), tokens_NH[start:start + n]))
            start += n
        outs.append(tokens_NH[start:] * 0)
        return torch.cat(outs) * probs_N.to(tokens_NH.dtype).unsqueeze(1)
    return run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    den = b.norm().item()
    num = (a - b).norm().item()
    if math.isnan(num):
        return float("inf")
    return num / den if den > 0 else num
