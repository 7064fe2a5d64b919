"""Rank functions for the fused-kernel backend tests (run by the gloo pool).

Each installs the CPU stand-ins of tests/fake_ep.py for its duration only and frees every
buffer it made before returning, so the shared pool is left as it was found.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import fake_ep
from dist_workers import run_parity


@contextlib.contextmanager
def fakes(hybrid_api: str = "current"):
    from moe_dispatch import fused_a2a
    from moe_dispatch.backends.deepep import buffer as v1_buffer, v1 as v1_backend
    from moe_dispatch.backends.hybridep import buffer as hybrid_buffer
    from moe_dispatch.backends.hybridep import backend as hybridep
    fake_ep.install(hybrid_api=hybrid_api)
    # The stand-ins run on CPU; the backends' CUDA requirement is lifted for their duration.
    cuda_checks = (v1_backend.cuda_reason, hybridep.cuda_reason)
    v1_backend.cuda_reason = hybridep.cuda_reason = lambda: None
    saved = (fused_a2a.HAVE_DEEP_EP, fused_a2a.HAVE_HYBRIDEP, fused_a2a.HAVE_UCCL_EP)
    fused_a2a.HAVE_DEEP_EP = fused_a2a.HAVE_HYBRIDEP = fused_a2a.HAVE_UCCL_EP = True
    for k in fake_ep.LOG:
        fake_ep.LOG[k] = 0 if k != "uccl_intranode" else None
    try:
        yield
    finally:
        v1_buffer.free_all()
        hybrid_buffer.reset_all()
        fused_a2a.HAVE_DEEP_EP, fused_a2a.HAVE_HYBRIDEP, fused_a2a.HAVE_UCCL_EP = saved
        v1_backend.cuda_reason, hybridep.cuda_reason = cuda_checks
        fake_ep.uninstall()


def fake_parity(rank, world, case, backend, opts, hybrid_api="current"):
    with fakes(hybrid_api):
        out = run_parity(rank, world, case, backend, opts)
        out["log"] = dict(fake_ep.LOG)
        return out


def fake_fused_api(rank, world, T, H, E, K, seed):
    """Seed API round trip: fused_dispatch -> fused_combine, with grads."""
    from moe_dispatch import fused_a2a
    with fakes():
        g = torch.Generator().manual_seed(seed + rank)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16).requires_grad_(True)
        idx = torch.rand(T, E, generator=g).argsort(1)[:, :K].contiguous()
        idx[::3, 0] = -1
        p = torch.rand(T, K, generator=g).requires_grad_(True)
        group = dist.group.WORLD
        recv_x, recv_idx, recv_p, tpe, handle = fused_a2a.fused_dispatch(x, idx, p, E, group)
        assert fused_a2a._buffer is not None
        y, none = fused_a2a.fused_combine(recv_x * 2, group, handle)
        loss = (y.float() * torch.arange(H).float()).sum() + (recv_p * recv_p).sum()
        loss.backward()
        n_ranks = torch.zeros(T, world, dtype=torch.bool)
        L = E // world
        n_ranks.scatter_(1, torch.where(idx >= 0, idx // L, 0), idx >= 0)
        out = dict(recv_idx=recv_idx, tpe=tpe, y=y.detach(), x=x.detach(), gx=x.grad,
                   gp=p.grad, idx=idx, p=p.detach(), n_ranks=n_ranks.sum(1), none=none,
                   buffer_set=fused_a2a._buffer is not None)
        fused_a2a.free_buffer()
        out["buffer_after_free"] = fused_a2a._buffer
        out["log"] = dict(fake_ep.LOG)
        return out


def fake_buffer_growth(rank, world):
    from moe_dispatch import fused_a2a
    with fakes():
        group = dist.group.WORLD
        b1 = fused_a2a.get_buffer(group, 1024)
        b1_again = fused_a2a.get_buffer(group, 512)
        b2 = fused_a2a.get_buffer(group, 4096)
        res = dict(same=b1 is b1_again, grew=b2 is not b1, nvl1=b1.num_nvl_bytes,
                   nvl2=b2.num_nvl_bytes, old_destroyed=b1.destroyed,
                   global_is_new=fused_a2a._buffer is b2)
        fused_a2a.set_deepep_num_sms(24)
        b3 = fused_a2a.get_buffer(group, 4096)  # more channels need more room
        res["grew_for_sms"] = b3 is not b2
        fused_a2a.set_deepep_num_sms(20)
        fused_a2a.free_buffer()
        res["log"] = dict(fake_ep.LOG)
        res["after_free"] = fused_a2a._buffer
        return res


def fake_hybrid_api(rank, world, T, H, E, pad_multiple, npt):
    """Seed HybridEP API round trip (uneven T is not allowed by the library: equal here)."""
    from moe_dispatch import fused_a2a
    from moe_dispatch.routing import topk_to_dense
    with fakes():
        g = torch.Generator().manual_seed(100 + rank)
        L = E // world
        x = torch.randn(T, H, generator=g).to(torch.bfloat16).requires_grad_(True)
        idx = torch.rand(T, E, generator=g).argsort(1)[:, :2]
        rm, pr = topk_to_dense(idx, torch.rand(T, 2, generator=g), E)
        pr = pr.requires_grad_(True)
        group = dist.group.WORLD
        tok, probs, scale, tpe, handle = fused_a2a.hybrid_ep_dispatch(
            x, rm, pr, group, L, num_permuted_tokens=npt, pad_multiple=pad_multiple)
        y = fused_a2a.hybrid_ep_combine(tok * 3, handle, num_permuted_tokens=npt,
                                        pad_multiple=pad_multiple)
        (y.float().sum() + (probs * probs).sum()).backward()
        out = dict(tok_rows=tok.shape[0], tpe=tpe.clone(), y=y.detach(), x=x.detach(),
                   gx=x.grad, gp=pr.grad, rm=rm, pr=pr.detach(), overflow=int(handle[10][0]),
                   buffer_set=fused_a2a._hybrid_ep_buffer is not None)
        fused_a2a.reset_hybrid_ep_buffer()
        out["after_reset"] = fused_a2a._hybrid_ep_buffer
        return out


def fake_hybrid_overflow(rank, world, case, npt):
    """hybridep backend with a too-small num_permuted_tokens: the flag must be raised."""
    from moe_dispatch.backends.hybridep import HybridEPBackend
    from token_dispatcher import MoETokenDispatcher
    with fakes():
        disp = MoETokenDispatcher(case.num_experts, backend="hybridep",
                                  backend_options={"num_permuted_tokens": npt})
        out = disp.dispatch(case.xs[rank], topk_idx=case.idxs[rank], topk_probs=case.probs[rank])
        h = out.handle.backend_handle
        return dict(rows=out.tokens.shape[0], overflowed=HybridEPBackend.overflowed(h),
                    tpe=out.tokens_per_expert)


def _mutate(which, x, idx, p, E):
    """Bad (or, for ``wider_k``, unusual but valid) input of kind ``which`` for one rank."""
    routing = dict(topk_idx=idx, topk_probs=p)
    if which == "expert_too_big":
        idx[0, 0] = E
    elif which == "expert_below_minus_one":
        idx[0, 0] = -2
    elif which in ("nan_prob", "negative_prob"):
        with torch.no_grad():  # p is a leaf that requires grad
            p[0, 0] = float("nan") if which == "nan_prob" else -0.5
    elif which == "idx_shape":
        routing = dict(topk_idx=idx[1:], topk_probs=p[1:])
    elif which == "neither_form":
        routing = {}
    elif which == "int_hidden":
        x = x.to(torch.int64)
    elif which == "hidden_size":
        x = torch.randn(x.shape[0], x.shape[1] + 8, device=x.device).to(x.dtype)
    elif which == "dense_nan":
        from moe_dispatch.routing import topk_to_dense
        rm, pd = topk_to_dense(idx, p.detach(), E)
        pd[0, 0] = float("nan")
        routing = dict(routing_map=rm, probs=pd)
    elif which == "wider_k":
        # one more (masked) slot on this rank only: valid, the ranks' K differ
        routing = dict(topk_idx=torch.cat([idx, idx.new_full((idx.shape[0], 1), -1)], 1),
                       topk_probs=torch.cat([p, p.new_zeros(p.shape[0], 1)], 1))
    elif which is not None:
        raise AssertionError(which)
    return x, routing


def fake_steps(rank, world, backend, steps, flag_offset=None):
    """``run_steps`` with the CPU stand-ins of the libraries."""
    with fakes():
        return run_steps(rank, world, backend, steps, "cpu", flag_offset)


def run_steps(rank, world, backend, steps, device="cpu", flag_offset=None):
    """One dispatcher, several dispatch -> experts -> combine -> backward steps.

    steps: list of (case, opts, which, bad_rank); ``which`` (see ``_mutate``) is applied on
    ``bad_rank`` only. Returns per step ("ok", outputs on the CPU, agreements) or ("err",
    exception class, message, agreements); ``agreements`` counts the backend's validation
    exchanges. ``flag_offset`` replaces ``v1_buffer.flag_offset`` (to make real counts
    look flagged).
    """
    from moe_dispatch.backends.deepep import buffer as v1_buffer, v1 as v1_backend
    from moe_dispatch.routing import topk_to_dense
    from moe_dispatch.testing import local_experts
    from token_dispatcher import MoETokenDispatcher
    dev = torch.device(device)
    calls = [0]
    real_agree, real_offset = v1_backend.agree, v1_buffer.flag_offset

    def counting_agree(*a, **k):
        calls[0] += 1
        return real_agree(*a, **k)

    out = []
    v1_backend.agree = counting_agree
    if flag_offset is not None:
        v1_buffer.flag_offset = lambda R: flag_offset
    try:
        disp = None
        for case, opts, which, bad_rank in steps:
            if disp is None:
                disp = MoETokenDispatcher(case.num_experts, backend=backend,
                                          pad_multiple=opts.get("pad_multiple"),
                                          backend_options=opts.get("backend_options"))
            E = case.num_experts
            calls[0] = 0
            x = case.xs[rank].to(dev).clone().requires_grad_(True)
            p = case.probs[rank].to(dev).clone().requires_grad_(True)
            idx = case.idxs[rank].to(dev).clone()
            if opts.get("form") == "dense":
                rm, pd = topk_to_dense(idx, p.detach(), E)
                leaf = pd.clone().requires_grad_(True)
                x_in, routing = x, dict(routing_map=rm, probs=leaf)
            else:
                leaf = p
                x_in, routing = _mutate(which if rank == bad_rank else None, x, idx, p, E)
            try:
                d = disp.dispatch(x_in, **routing)
            except Exception as exc:
                out.append(("err", type(exc).__name__, str(exc), calls[0]))
                continue
            n_agree = calls[0]
            y = disp.combine(local_experts(case.W.to(dev), disp.local_expert_offset)(
                d.tokens, d.tokens_per_expert, d.probs), d.handle)
            (y.float() * case.gouts[rank].to(dev)).sum().backward()
            g_leaf = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            res = dict(tokens=d.tokens.detach().cpu(), tpe=d.tokens_per_expert.cpu(),
                       probs=d.probs.detach().cpu(), y=y.detach().cpu(), y_shape=tuple(y.shape),
                       gx=(x.grad if x.grad is not None else torch.zeros_like(x)).cpu(),
                       gp=g_leaf.cpu(), local_offset=disp.local_expert_offset)
            out.append(("ok", res, n_agree))
    finally:
        v1_backend.agree, v1_buffer.flag_offset = real_agree, real_offset
    return out


def fake_budget_vs_exact(rank, world, case, backend, budget, pad_multiple=None,
                         backend_options=None):
    """``dist_workers.run_budget_vs_exact`` (budget mode against the exact mode with the
    dropped rows' outputs zeroed) with the CPU stand-ins of the libraries."""
    from dist_workers import run_budget_vs_exact
    with fakes():
        return run_budget_vs_exact(rank, world, case, backend, budget, pad_multiple,
                                   backend_options)


def fake_budget_bad_input(rank, world, case, backend, which, bad_rank, budget):
    """``dist_workers.run_budget_bad_input`` with the CPU stand-ins of the libraries."""
    from dist_workers import run_budget_bad_input
    with fakes():
        return run_budget_bad_input(rank, world, case, backend, which, bad_rank, budget)


def fake_budget_bad_backward(rank, world, case, backend, which, bad_rank, budget):
    """A good first call, then ``bad_rank`` sends a host error ("idx_shape") or another
    hidden size ("hidden_size"); every rank runs dispatch -> experts -> combine -> backward
    (which must not hang: the bad rank takes part in the backward's collectives too), then
    ``check_status``. Returns what it raised."""
    from moe_dispatch.protocol import DispatchInputError
    from moe_dispatch.testing import local_experts
    from token_dispatcher import MoETokenDispatcher
    with fakes():
        disp = MoETokenDispatcher(case.num_experts, backend=backend, max_rows_per_rank=budget)
        experts = local_experts(case.W, disp.local_expert_offset)
        for step in range(2):
            x = case.xs[rank].clone().requires_grad_(True)
            p = case.probs[rank].clone().requires_grad_(True)
            routing = dict(topk_idx=case.idxs[rank], topk_probs=p)
            if step == 1 and rank == bad_rank and which == "idx_shape":
                routing = dict(topk_idx=case.idxs[rank][1:], topk_probs=p[1:])
            if step == 1 and rank == bad_rank and which == "hidden_size":
                x = torch.randn(x.shape[0], x.shape[1] + 8).to(x.dtype).requires_grad_(True)
            out = disp.dispatch(x, **routing)
            y = disp.combine(experts(out.tokens, out.tokens_per_expert, out.probs), out.handle)
            (y.float() * y.float()).sum().backward()
        try:
            disp.check_status(out)
        except DispatchInputError as exc:
            return str(exc)
        return None


def fake_budget_steps(rank, world, backend, cases, budget, backend_options=None):
    """One budget-mode dispatcher over several calls (the first agrees shapes, the others
    must not exchange anything but the library's own data). Per call: the run_parity-like
    outputs, the status, and how many host agreements ran."""
    from moe_dispatch.backends import budget as budget_mod
    from moe_dispatch.testing import local_experts
    from token_dispatcher import MoETokenDispatcher
    calls = [0]
    real_agree = budget_mod.BudgetShape.__dict__["agree"]  # the staticmethod itself

    def counting_agree(*a, **k):
        calls[0] += 1
        return real_agree.__func__(*a, **k)

    out = []
    with fakes():
        budget_mod.BudgetShape.agree = staticmethod(counting_agree)
        try:
            disp = MoETokenDispatcher(cases[0].num_experts, backend=backend,
                                      max_rows_per_rank=budget, backend_options=backend_options)
            for case in cases:
                calls[0] = 0
                x = case.xs[rank].clone().requires_grad_(True)
                p = case.probs[rank].clone().requires_grad_(True)
                d = disp.dispatch(x, topk_idx=case.idxs[rank], topk_probs=p)
                y = disp.combine(local_experts(case.W, disp.local_expert_offset)(
                    d.tokens, d.tokens_per_expert, d.probs), d.handle)
                (y.float() * case.gouts[rank]).sum().backward()
                out.append(dict(tokens=d.tokens.detach(), tpe=d.tokens_per_expert,
                                probs=d.probs.detach(), y=y.detach(), gx=x.grad, gp=p.grad,
                                status=disp.check_status(d), agreements=calls[0]))
        finally:
            budget_mod.BudgetShape.agree = real_agree
    return out


def fake_construct(rank, world, backend, budget, hybrid_api, backend_options):
    """Build a dispatcher (8 experts) with the stand-ins; construction errors propagate."""
    from token_dispatcher import MoETokenDispatcher
    with fakes(hybrid_api):
        MoETokenDispatcher(8, backend=backend, max_rows_per_rank=budget,
                           backend_options=backend_options)
        return "constructed"


def fake_small_rows(rank, world, case):
    """With the real library's small-row limit, a small hidden size raises on every rank."""
    from moe_dispatch.backends.deepep.v1 import MIN_ROW_BYTES
    with fakes():
        fake_ep.Buffer.min_row_bytes = MIN_ROW_BYTES
        try:
            return run_parity(rank, world, case, "deepep", {})
        finally:
            fake_ep.Buffer.min_row_bytes = 16
