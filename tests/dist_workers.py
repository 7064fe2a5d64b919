"""Functions every rank of a test pool runs: ``fn(rank, world, *args)``."""
from __future__ import annotations

import torch

from moe_dispatch.routing import topk_to_dense
from moe_dispatch.testing import Case, local_experts
from token_dispatcher import MoETokenDispatcher


def run_parity(rank: int, world: int, case: Case, backend: str, opts: dict):
    """One rank's dispatch -> experts -> combine -> backward on ``case``."""
    E = case.num_experts
    dev = torch.device(opts.get("device", "cpu"))
    disp = MoETokenDispatcher(E, backend=backend, capacity_factor=opts.get("capacity_factor"),
                              pad_multiple=opts.get("pad_multiple"),
                              capacity_policy=opts.get("capacity_policy", "probs"),
                              topk=opts.get("topk"), backend_options=opts.get("backend_options"))
    H = case.xs[rank].shape[1]
    x = case.xs[rank].to(dev).clone().requires_grad_(True)
    idx = case.idxs[rank].to(dev)
    p = case.probs[rank].to(dev).clone().requires_grad_(True)
    if opts.get("form", "topk") == "dense":
        rm, pd = topk_to_dense(idx, case.probs[rank].to(dev), E)
        pd = pd.clone().requires_grad_(True)
        routing = dict(routing_map=rm, probs=pd)
        leaf = pd
    else:
        routing = dict(topk_idx=idx, topk_probs=p)
        leaf = p
    x_in = x.view(x.shape[0] // 2, 2, H) if opts.get("shape3d") else x
    out = disp.dispatch(x_in, **routing)
    expert_out = local_experts(case.W.to(dev), disp.local_expert_offset)(
        out.tokens, out.tokens_per_expert, out.probs)
    y = disp.combine(expert_out, out.handle)
    (y.reshape(-1, H) * case.gouts[rank].to(dev)).sum().backward()
    g_leaf = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return dict(tokens=out.tokens.detach().cpu(), tpe=out.tokens_per_expert.cpu(),
                probs=out.probs.detach().cpu(), y=y.detach().cpu(), y_shape=tuple(y.shape),
                gx=(x.grad if x.grad is not None else torch.zeros_like(x)).cpu(),
                gp=g_leaf.cpu(), local_offset=disp.local_expert_offset)


def run_bad_input(rank: int, world: int, case: Case, backend: str, which: str, bad_rank: int):
    """``bad_rank`` gets invalid input of kind ``which``; the others get valid input."""
    E = case.num_experts
    # the top-k hint applies to the dense form only; every rank builds the same dispatcher
    disp = MoETokenDispatcher(E, backend=backend,
                              topk=1 if which == "dense_too_many_for_topk" else None)
    x, idx, p = case.xs[rank], case.idxs[rank].clone(), case.probs[rank].clone()
    routing = dict(topk_idx=idx, topk_probs=p)
    if rank == bad_rank:
        if which == "expert_too_big":
            idx[0, 0] = E
        elif which == "expert_below_minus_one":
            idx[0, 0] = -2
        elif which == "nan_prob":
            p[0, 0] = float("nan")
        elif which == "inf_prob":
            p[0, 0] = float("inf")
        elif which == "negative_prob":
            p[0, 0] = -0.5
        elif which == "idx_shape":
            routing = dict(topk_idx=idx[1:], topk_probs=p[1:])
        elif which == "probs_shape":
            routing = dict(topk_idx=idx, topk_probs=p[:, :1])
        elif which == "both_forms":
            rm, pd = topk_to_dense(idx, p, E)
            routing = dict(topk_idx=idx, topk_probs=p, routing_map=rm, probs=pd)
        elif which == "neither_form":
            routing = {}
        elif which == "int_hidden":
            x = x.to(torch.int64)
        elif which == "float_idx":
            routing = dict(topk_idx=idx.float(), topk_probs=p)
        elif which == "dense_map_shape":
            rm, pd = topk_to_dense(idx, p, E)
            routing = dict(routing_map=rm[:, :-1], probs=pd[:, :-1])
        elif which == "dense_nan":
            rm, pd = topk_to_dense(idx, p, E)
            pd[0, 0] = float("nan")
            routing = dict(routing_map=rm, probs=pd)
        elif which == "dense_too_many_for_topk":
            rm, pd = topk_to_dense(idx, p, E)
            routing = dict(routing_map=rm, probs=pd)
        elif which == "hidden_size":
            x = torch.randn(x.shape[0], x.shape[1] + 1)
        else:
            raise AssertionError(which)
    disp.dispatch(x, **routing)
    return "no error"


def construct(rank: int, world: int, experts_by_rank, backend_by_rank):
    MoETokenDispatcher(experts_by_rank[rank], backend=backend_by_rank[rank])
    return "constructed"


def timed_warmup(rank: int, world: int, sleep_s_by_rank, min_warmup_s: float):
    """Clock.run with a time-based warm-up whose per-call time differs by rank (no
    collective inside, so each rank sees its own speed). Returns (calls, timed samples)."""
    import time

    import torch.distributed as dist

    from moe_dispatch.bench.timing import Clock

    clock = Clock(torch.device("cpu"), dist.group.WORLD, min_warmup_s=min_warmup_s)
    calls = []

    def fn(i, _):
        time.sleep(sleep_s_by_rank[rank])
        calls.append(i)

    t = clock.run(fn, iters=3, warmup=2)
    return len(calls), len(t.seconds)
