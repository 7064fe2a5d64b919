"""``--check``: results must be right before a backend gets a number.

The ``alltoall`` backend is first checked against an independent dense reference built
from the all-gathered inputs of every rank; every other backend is then compared with
``alltoall`` on the same inputs: the dispatched rows (exact: dispatch only moves data),
``tokens_per_expert`` (exact), the row probs, and ``combine`` of an expert output that
scales every row by its prob (up to summation order). A budget-mode path
(``max_rows_per_rank``) is compared with the same exact-mode expectation on its kept rows:
the first ``sum(tokens_per_expert)`` rows must equal the exact rows, the rest be unused
(zero, prob 0), and its ``status`` must be 0 (nothing dropped).

Shapes: T tokens, K top-k, L local experts, R ranks, H hidden, N dispatched rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from .common import Ctx
from .workload import InputSet


@dataclass
class Expected:
    """What one rank must see for one input set.

    tokens_NH / probs_N / tokens_per_expert_L: the dispatch result.
    y_TH: combine of ``expert_fn(tokens, probs)``, accumulated in float32.
    """

    tokens_NH: torch.Tensor
    probs_N: torch.Tensor
    tokens_per_expert_L: torch.Tensor
    y_TH: torch.Tensor


def expert_fn(tokens_NH: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
    """The stand-in expert of the check: row * (1 + prob), so a row combined into the
    wrong token or with the wrong prob changes the result."""
    return tokens_NH * (1.0 + probs_N.float()).to(tokens_NH.dtype).unsqueeze(1)


def _all_gather_cat(ctx: Ctx, t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and ctx.world > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(parts, t.contiguous(), group=ctx.group)
    return torch.cat(parts)


def dense_expected(ctx: Ctx, st: InputSet) -> Expected:
    """Build the expected dispatch/combine of this rank from every rank's inputs.

    Rows for local expert e are the (source rank, token) pairs routed to e, in that order.
    Every rank has the same T (the bench uses equal token counts), so plain all-gathers do.
    """
    shape = ctx.shape
    T = shape.tokens
    L = shape.experts // ctx.world
    lo = ctx.rank * L
    x_all = _all_gather_cat(ctx, st.x_TH)              # [R*T, H]
    idx_all = _all_gather_cat(ctx, st.idx_TK)          # [R*T, K]
    p_all = _all_gather_cat(ctx, st.probs_TK)          # [R*T, K]
    mine_GK = (idx_all >= lo) & (idx_all < lo + L)
    g, k = mine_GK.nonzero(as_tuple=True)              # row-major: global token order
    lid = idx_all[g, k] - lo
    order = torch.argsort(lid * (ctx.world * T) + g, stable=True)
    g, k, lid = g[order], k[order], lid[order]
    tokens = x_all.index_select(0, g)
    probs = p_all[g, k].float()
    counts = torch.bincount(lid, minlength=L).cpu()
    # Combine: each token's rows, wherever they went, scaled by (1 + prob), summed.
    valid = st.idx_TK >= 0
    scale = (1.0 + st.probs_TK.float()).to(st.x_TH.dtype)
    y = (st.x_TH.unsqueeze(1) * scale.unsqueeze(2)).float()          # [T, K, H], rounded like the expert
    y = (y * valid.unsqueeze(2)).sum(1)
    return Expected(tokens, probs, counts, y)


def compare(out_tokens: torch.Tensor, out_tpe: torch.Tensor, out_probs: torch.Tensor,
            y: torch.Tensor, exp: Expected, dtype: torch.dtype,
            exact_layout: bool = True, kept_rows: bool = False) -> List[str]:
    """Return what differs (empty = equal within tolerance).

    exact_layout: the rows must have exactly the expected layout. False for variants whose
    output has a fixed row budget (unused rows, prob 0): then only ``tokens_per_expert``
    and combine are compared when the row count differs (combine still catches a row sent
    to the wrong token or carrying the wrong prob, since the check's expert scales by it).
    kept_rows:    the budget mode: ``out_tokens`` has B >= N rows; its first N =
                  ``sum(tokens_per_expert)`` rows and probs must be the expected ones
                  exactly, the remaining rows zero with prob 0.
    """
    errs: List[str] = []
    tpe = out_tpe.detach().to("cpu", torch.long).reshape(-1)
    if not torch.equal(tpe, exp.tokens_per_expert_L.long()):
        errs.append(f"tokens_per_expert {tpe.tolist()[:8]}... != expected "
                    f"{exp.tokens_per_expert_L.tolist()[:8]}...")
    probs_N = out_probs.reshape(-1)
    if kept_rows:
        n = int(tpe.sum())
        if out_tokens.shape[0] < n:
            errs.append(f"tokens has {out_tokens.shape[0]} rows, tokens_per_expert sums to {n}")
            n = out_tokens.shape[0]
        tail_NH, tail_N = out_tokens[n:], probs_N[n:]
        if bool((tail_NH != 0).any()):
            errs.append(f"{int((tail_NH != 0).any(1).sum())} unused rows past the {n} kept "
                        "ones are not zero")
        if bool((tail_N != 0).any()):
            errs.append(f"unused rows past the {n} kept ones have nonzero probs")
        out_tokens, probs_N = out_tokens[:n], probs_N[:n]
    if tuple(out_tokens.shape) != tuple(exp.tokens_NH.shape):
        if exact_layout or kept_rows:
            errs.append(f"tokens shape {tuple(out_tokens.shape)} != {tuple(exp.tokens_NH.shape)}"
                        + (" (kept rows)" if kept_rows else ""))
    else:
        if not torch.equal(out_tokens, exp.tokens_NH):
            d = (out_tokens.float() - exp.tokens_NH.float()).abs().max().item()
            errs.append(f"dispatched rows differ (max abs diff {d:.3g}); rows must be exact copies "
                        "grouped by local expert in (source rank, token) order")
        if not torch.allclose(probs_N.float(), exp.probs_N, rtol=1e-6, atol=1e-7):
            errs.append("row probs differ")
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    rel = float((y.float() - exp.y_TH).norm() / exp.y_TH.norm().clamp_min(1e-12))
    if not rel <= tol:
        errs.append(f"combine relative error {rel:.2e} > {tol:g}")
    return errs


def expected_from_output(out, y: torch.Tensor) -> Expected:
    """Take a checked backend's outputs as the expectation for the next backends."""
    return Expected(out.tokens.detach(), out.probs.detach().float().reshape(-1),
                    out.tokens_per_expert.detach().to("cpu", torch.long).reshape(-1),
                    y.detach().float())


def run_backend(disp, st: InputSet):
    """Dispatch + combine(expert_fn) of one set through a ``MoETokenDispatcher``."""
    with torch.no_grad():
        out = disp.dispatch(st.x_TH, topk_idx=st.idx_TK, topk_probs=st.probs_TK)
        y = disp.combine(expert_fn(out.tokens, out.probs), out.handle)
    return out, y
