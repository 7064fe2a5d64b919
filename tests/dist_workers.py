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
                              topk=opts.get("topk"), backend_options=opts.get("backend_options"),
                              max_rows_per_rank=opts.get("max_rows_per_rank"))
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
                gp=g_leaf.cpu(), local_offset=disp.local_expert_offset,
                status=None if out.status is None else int(out.status.item()))


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


def _one_step(disp, case: Case, rank: int, row_mask=None):
    """dispatch -> experts -> combine -> backward; ``row_mask(out)`` ([N] bool) zeroes the
    expert outputs of rows not kept. Returns outputs, grads and the dispatch output."""
    H = case.xs[rank].shape[1]
    x = case.xs[rank].clone().requires_grad_(True)
    p = case.probs[rank].clone().requires_grad_(True)
    out = disp.dispatch(x, topk_idx=case.idxs[rank], topk_probs=p)
    y_rows = local_experts(case.W, disp.local_expert_offset)(out.tokens, out.tokens_per_expert,
                                                             out.probs)
    if row_mask is not None:
        y_rows = y_rows * row_mask(out).unsqueeze(1).to(y_rows.dtype)
    y = disp.combine(y_rows, out.handle)
    (y.reshape(-1, H) * case.gouts[rank]).sum().backward()
    gx = x.grad if x.grad is not None else torch.zeros_like(x)
    gp = p.grad if p.grad is not None else torch.zeros_like(p)
    return y.detach(), gx, gp, out


def run_budget_vs_exact(rank: int, world: int, case: Case, backend: str, budget: int,
                        pad_multiple=None, backend_options=None):
    """The budget mode against the exact mode on the same input, on this rank.

    The exact step runs with the expert outputs of rows at or past ``budget`` zeroed (the
    rows the budget mode must drop: the same order, the same padding), so the two must agree
    whether or not the budget overflowed. Returns what the test compares.
    """
    E = case.num_experts
    exact = MoETokenDispatcher(E, backend=backend, pad_multiple=pad_multiple)
    bud = MoETokenDispatcher(E, backend=backend, pad_multiple=pad_multiple,
                             max_rows_per_rank=budget, backend_options=backend_options)
    keep = lambda out: torch.arange(out.tokens.shape[0]) < budget  # noqa: E731
    y0, gx0, gp0, o0 = _one_step(exact, case, rank, keep)
    y1, gx1, gp1, o1 = _one_step(bud, case, rank)
    n = int(o1.tokens_per_expert.sum())
    kept_tpe = torch.minimum(
        o0.tokens_per_expert,
        (budget - (torch.cumsum(o0.tokens_per_expert, 0) - o0.tokens_per_expert)).clamp(min=0))
    return dict(
        rows=o1.tokens.shape[0], status=int(o1.status.item()),
        exact_rows=int(o0.tokens_per_expert.sum()),
        tpe_equal=torch.equal(o1.tokens_per_expert, kept_tpe),
        rows_equal=torch.equal(o1.tokens[:n], o0.tokens[:n]),
        probs_equal=torch.equal(o1.probs[:n], o0.probs[:n]),
        tail_zero=bool((o1.tokens[n:] == 0).all() and (o1.probs[n:] == 0).all()),
        y_err=float((y1 - y0).norm() / y0.norm().clamp(min=1e-12)),
        gx_err=float((gx1 - gx0).norm() / gx0.norm().clamp(min=1e-12)),
        gp_err=float((gp1 - gp0).norm() / gp0.norm().clamp(min=1e-12)),
        check=bud.check_status(o1))


def run_budget_bad_input(rank: int, world: int, case: Case, backend: str, which: str,
                         bad_rank: int, budget: int):
    """A good first call (the budget mode agrees its shapes), then a call where
    ``bad_rank``'s input is bad. Returns what ``check_status`` raised, per rank."""
    from moe_dispatch.protocol import DispatchInputError
    E = case.num_experts
    disp = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=budget)
    x, idx, p = case.xs[rank], case.idxs[rank].clone(), case.probs[rank].clone()
    first = disp.dispatch(x, topk_idx=idx, topk_probs=p)
    assert disp.check_status(first) == 0
    routing = dict(topk_idx=idx, topk_probs=p)
    if rank == bad_rank:
        if which == "expert_too_big":
            idx[0, 0] = E
        elif which == "nan_prob":
            p[0, 0] = float("nan")
        elif which == "idx_shape":
            routing = dict(topk_idx=idx[1:], topk_probs=p)
        elif which == "hidden_size":
            x = torch.randn(x.shape[0], x.shape[1] + 1)
        else:
            raise AssertionError(which)
    x = x.clone().requires_grad_(True)
    routing["topk_probs"] = routing["topk_probs"].clone().requires_grad_(True)
    out = disp.dispatch(x, **routing)
    y = disp.combine(out.tokens * out.probs.unsqueeze(1), out.handle)
    # The backward runs before the status is read (as in a training step that checks late):
    # the bad rank must join its collectives too, or the others would wait for it.
    y.float().sum().backward()
    try:
        disp.check_status(out)
    except DispatchInputError as exc:
        return dict(raised=str(exc), y_rows=y.shape[0])
    return dict(raised=None, y_rows=y.shape[0])


def run_exact_paths(rank: int, world: int, case: Case, backend: str, opts: dict):
    """The exact-mode step (dispatch -> experts -> combine -> backward) on this rank through
    the torch reference and through the fused kernels forced on (interpreted on CPU:
    ``test_budget_kernels.force_paths``). Returns {fused: outputs on the CPU}.

    opts: ``pad_multiple``; ``wire`` (True: FP8 on the wire); ``narrow_rank`` (that rank
    routes with one slot fewer, so the others widen it with -1 slots); ``device``.
    """
    import pytest
    from test_budget_kernels import force_paths
    outs = {}
    for fused in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            force_paths(mp, fused)
            outs[fused] = _exact_step(rank, case, backend, opts)
    return outs


def _exact_step(rank: int, case: Case, backend: str, opts: dict):
    disp = MoETokenDispatcher(case.num_experts, backend=backend,
                              pad_multiple=opts.get("pad_multiple"),
                              wire_dtype=torch.float8_e4m3fn if opts.get("wire") else None)
    dev = torch.device(opts.get("device", "cpu"))
    x = case.xs[rank].to(dev).clone().requires_grad_(True)
    p = case.probs[rank].to(dev).clone().requires_grad_(True)
    idx, p_in = case.idxs[rank].to(dev), p
    if opts.get("narrow_rank") == rank:
        idx, p_in = idx[:, :-1], p[:, :-1]
    out = disp.dispatch(x, topk_idx=idx, topk_probs=p_in)
    y = disp.combine(local_experts(case.W.to(dev), disp.local_expert_offset)(
        out.tokens, out.tokens_per_expert, out.probs), out.handle)
    (y.float() * case.gouts[rank].to(dev).float()).sum().backward()
    return dict(tokens=out.tokens.detach(), probs=out.probs.detach(),
                tpe=out.tokens_per_expert, y=y.detach(),
                gx=x.grad if x.grad is not None else torch.zeros_like(x),
                gp=p.grad if p.grad is not None else torch.zeros_like(p),
                plan=type(out.handle.backend_handle.plan).__name__)
