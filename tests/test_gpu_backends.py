"""GPU proof of the fused-kernel backends (run under torchrun on 2 and 4 GPUs).

    torchrun --nproc-per-node 4 tests/test_gpu_backends.py --backends deepep,uccl_over_deep_ep \
        --out results.json [--warm-steps] [--seed-api v1|hybrid|uccl|both|none] \
        [--bench [--breakdown] --bench-backends deepep,...]

Every rank builds the same random cases (fresh seed, broadcast), runs dispatch -> a
per-expert nonlinear map -> combine -> backward through ``MoETokenDispatcher`` for each
backend, and rank 0 compares each backend with the single-process float64 dense
reference (``moe_dispatch.testing``) and with ``alltoall``: dispatched rows, per-expert
counts, probs, outputs, grads to hidden and to the router probs. Cases: uneven counts
with -1 slots, a zero-token rank, all tokens on one expert, zipf skew with
pad_multiple, dense routing with a zero-token rank. ``--budget``: the sync-free budget
mode (``max_rows_per_rank``) of each backend (``budget_checks``). ``--warm-steps``: one dispatcher
through valid, bad and reshaped calls (the V1 backends' sync-free validation). Then the
seed API (``moe_dispatch.fused_a2a``) round trip, the buffer-size mirror against DeepEP's
own hint, and with ``--bench`` the timing at DeepEP's benchmark shape: ``deep_ep.Buffer``
called directly vs ``fused_a2a`` vs each backend (plus the direct Buffer with the same
local permutation, "Buffer+permute", so the backend's extra work is shown separately),
median of CUDA-event times, interleaved; ``--breakdown`` adds the per-stage pieces.

``uccl_over_deep_ep`` is the ``uccl`` backend's adapter with
``backend_options={"buffer_module": "deep_ep"}``: UCCL-EP's Buffer has DeepEP V1's API,
so this proves the adapter where UCCL itself cannot load. Under pytest (CPU CI) the GPU
test skips and ``test_script_cpu_smoke`` runs this script on gloo ranks with the CPU
stand-ins (``--cpu-smoke``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_dispatch.backends.uccl import UCCLBackend  # noqa: E402
from moe_dispatch.registry import register_backend  # noqa: E402
from moe_dispatch.testing import make_case, reference_dispatch, reference_moe, rel_err  # noqa: E402


class UCCLOverDeepEP(UCCLBackend):
    """The ``uccl`` adapter pointed at ``deep_ep.Buffer`` (explicit, test-only)."""

    name = "uccl_over_deep_ep"

    def __init__(self, config):
        from dataclasses import replace
        opts = dict(config.options or {})
        opts.setdefault("buffer_module", "deep_ep")
        super().__init__(replace(config, options=opts))

    @classmethod
    def availability(cls):
        from moe_dispatch.backends.deepep import v1 as v1_backend
        from moe_dispatch.backends.deepep.buffer import DEEP_EP
        return DEEP_EP.reason() or v1_backend.cuda_reason()



SCENARIOS = {
    "uneven_masked": (lambda R: [96 + 40 * r for r in range(R)], dict(mask_frac=0.2), {}),
    "zero_token_rank": (lambda R: [0] + [128] * (R - 1), dict(mask_frac=0.1), {}),
    "one_expert": (lambda R: [64] * R, dict(skew="one_expert", topk=1), {}),
    "zipf_pad16": (lambda R: [160] * R, dict(skew="zipf"), {"pad_multiple": 16}),
    "dense_zero_rank": (lambda R: [0] + [80] * (R - 1), dict(mask_frac=0.1), {"form": "dense"}),
}
TOL = 3e-2  # BF16 rows and BF16 combine
BACKEND_OPTIONS: dict = {}


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


DEVICE = "cuda"


def _bcast_seed() -> int:
    t = torch.randint(0, 2 ** 31 - 1, (1,), device=DEVICE)
    dist.broadcast(t, 0)
    return int(t.item())


def _block_multiset_equal(tok, ref, tpe):
    """Rows equal up to order within each expert block (for libraries ordering differently)."""
    if tok.shape != ref.shape:
        return False
    v = torch.randn(tok.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = 0
    for n in tpe.tolist():
        a = torch.sort(tok[start:start + n].double() @ v).values
        b = torch.sort(ref[start:start + n].double() @ v).values
        if not torch.allclose(a, b):
            return False
        start += n
    return True


def parity(backends, world, hidden, experts_per_rank, topk):
    from dist_workers import run_parity
    rank = dist.get_rank()
    out = {}
    for scen, (tokens, kw, opts) in SCENARIOS.items():
        kw = dict(kw)
        k = kw.pop("topk", topk)
        seed = _bcast_seed()
        case = make_case(world, tokens(world), hidden, experts_per_rank * world, k, seed=seed,
                         dtype=torch.bfloat16, **kw)
        ref = reference_moe(case) if rank == 0 else None
        per_backend = {}
        for be in ["alltoall"] + backends:
            o = dict(opts, device=DEVICE)
            if be in BACKEND_OPTIONS:
                o["backend_options"] = dict(BACKEND_OPTIONS[be])
            t0 = time.time()
            try:
                res = run_parity(rank, world, case, be, o)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                err = None
            except Exception as exc:  # recorded; the other ranks raise too (agreed checks)
                res, err = None, f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            gathered = [None] * world
            dist.all_gather_object(gathered, (res, err))
            if rank == 0:
                per_backend[be] = _judge(case, opts, gathered, ref)
                per_backend[be]["s"] = round(time.time() - t0, 2)
                if be != "alltoall" and per_backend[be].get("ok") is not None:
                    a2a = per_backend["alltoall"].get("_res")
                    mine = per_backend[be].get("_res")
                    if a2a and mine:
                        per_backend[be]["vs_alltoall_y"] = max(
                            rel_err(m["y"], a["y"]) for m, a in zip(mine, a2a))
                        per_backend[be]["vs_alltoall_gx"] = max(
                            rel_err(m["gx"], a["gx"]) for m, a in zip(mine, a2a))
        if rank == 0:
            for v in per_backend.values():
                v.pop("_res", None)
            out[scen] = per_backend
            log0(f"[parity R={world}] {scen}: " + ", ".join(
                f"{b}={'OK' if v.get('ok') else 'FAIL'}" for b, v in per_backend.items()))
            for b, v in per_backend.items():
                if not v.get("ok"):  # how it failed: exception text or the error sizes
                    log0(f"[parity-detail R={world}] {scen} {b}: {v}")
    return out


def _judge(case, opts, gathered, ref):
    errs = [e for _, e in gathered if e]
    if errs:
        return {"ok": False, "error": errs[0][:400]}
    ys, gxs, gps = ref
    res = [r for r, _ in gathered]
    worst = {"y": 0.0, "gx": 0.0, "gp": 0.0}
    rows_exact, rows_multiset = True, True
    for r, out in enumerate(res):
        tok, tpe, pr = reference_dispatch(case, r, opts.get("pad_multiple"))
        tpe_ok = torch.equal(out["tpe"].cpu(), tpe)
        exact = tpe_ok and torch.equal(out["tokens"], tok) and torch.equal(out["probs"], pr)
        rows_exact &= exact
        rows_multiset &= tpe_ok and _block_multiset_equal(out["tokens"], tok, tpe)
        T, H = case.xs[r].shape
        worst["y"] = max(worst["y"], rel_err(out["y"].reshape(T, H), ys[r]))
        worst["gx"] = max(worst["gx"], rel_err(out["gx"], gxs[r]))
        gp_ref = gps[r]
        if opts.get("form") == "dense":
            from moe_dispatch.routing import topk_to_dense
            gp_ref = topk_to_dense(case.idxs[r], gps[r], case.num_experts)[1]
        worst["gp"] = max(worst["gp"], rel_err(out["gp"], gp_ref))
    ok = rows_multiset and all(v < TOL for v in worst.values())
    return {"ok": ok, "rows_exact_order": rows_exact, "rows_same_per_expert": rows_multiset,
            **{f"err_{k}": round(v, 5) for k, v in worst.items()}, "_res": res}


def warm_steps(world, backend):
    """One dispatcher through valid, bad and reshaped calls: after the first call, valid
    same-shape calls need no validation exchange (counted), a bad rank makes every rank
    raise without a hang (value errors: flag in DeepEP's counts; a rank's new hidden size:
    error), a new shape on every rank or a wider top-k on one rank is agreed and redone.
    Rank 0 checks every successful step against the float64 reference."""
    from ep_workers import run_steps
    rank = dist.get_rank()
    seeds = [_bcast_seed() for _ in range(9)]

    def case(i, hidden=256):
        return make_case(world, [48 + 16 * r for r in range(world)], hidden, 8 * world, 4,
                         seed=seeds[i], dtype=torch.bfloat16, mask_frac=0.1)

    plan = [  # case, bad kind, bad rank, expected outcome, expected validation exchanges
        (case(0), None, None, "ok", 1),
        (case(1), None, None, "ok", 0),
        (case(2), "expert_too_big", world - 1, "err", 1),
        (case(3), "nan_prob", 0, "err", 1),
        (case(4), None, None, "ok", 0),
        (case(5), "hidden_size", world - 1, "err", 1),
        (case(6, 512), None, None, "ok", 1),
        (case(7, 512), "wider_k", 0, "ok", 1),
        (case(8, 512), None, None, "ok", 0),
    ]
    steps = [(c, {}, which, bad) for c, which, bad, _, _ in plan]
    o = dict(BACKEND_OPTIONS.get(backend, {}))
    if o:
        steps = [(c, {"backend_options": o}, w, b) for c, _, w, b in steps]
    try:
        mine, err = run_steps(rank, world, backend, steps, DEVICE), None
    except Exception as exc:  # recorded; must not happen
        mine, err = None, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, err))
    if rank != 0:
        return None
    errs = [e for _, e in gathered if e]
    if errs:
        out = {"ok": False, "error": errs[0][:400]}
        log0(f"[warm-steps R={world}] {backend}: {out}")
        return out
    steps_out, ok = [], True
    for i, (c, which, bad, want, n_agree) in enumerate(plan):
        got = [g[0][i] for g in gathered]
        kinds = {r[0] for r in got}
        agreements = [r[-1] for r in got]
        st = {"step": i, "bad": which, "want": want, "got": sorted(kinds),
              "agreements": agreements, "want_agreements": n_agree}
        good = kinds == {want} and all(a == n_agree for a in agreements)
        if want == "ok" and kinds == {"ok"}:
            j = _judge(c, {}, [(r[1], None) for r in got], reference_moe(c))
            j.pop("_res", None)
            st.update(j)
            good &= bool(j["ok"])
        elif want == "err" and kinds == {"err"}:
            st["messages"] = [r[2][:120] for r in got]
            good &= all(r[1] == "DispatchInputError" for r in got)
        st["pass"] = good
        ok &= good
        steps_out.append(st)
    out = {"ok": ok, "steps": steps_out}
    log0(f"[warm-steps R={world}] {backend}: {'OK' if ok else 'FAIL'} " + json.dumps(
        [(st["step"], st["bad"], st["got"], st["agreements"], st["pass"]) for st in steps_out]))
    return out


def _budget_step(disp, case, rank, which=None):
    """One budget-mode dispatch -> experts -> combine -> backward on this rank's input
    (``which`` = "bad_ids": an out-of-range expert id). Returns the outputs on the CPU, the
    status read once, and what ``check_status`` raised (or None)."""
    from moe_dispatch.protocol import DispatchInputError
    from moe_dispatch.testing import local_experts
    dev = torch.device(DEVICE)
    x = case.xs[rank].to(dev).clone().requires_grad_(True)
    p = case.probs[rank].to(dev).clone().requires_grad_(True)
    idx = case.idxs[rank].to(dev).clone()
    if which == "bad_ids" and idx.numel():
        idx[0, 0] = case.num_experts
    out = disp.dispatch(x, topk_idx=idx, topk_probs=p)
    y = disp.combine(local_experts(case.W.to(dev), disp.local_expert_offset)(
        out.tokens, out.tokens_per_expert, out.probs), out.handle)
    (y.float() * case.gouts[rank].to(dev).float()).sum().backward()
    try:
        status, raised = disp.check_status(out), None
    except DispatchInputError as exc:
        status, raised = None, str(exc)
    return dict(tokens=out.tokens.detach().cpu(), tpe=out.tokens_per_expert.cpu(),
                probs=out.probs.detach().cpu(), y=y.detach().cpu(), gx=x.grad.cpu(),
                gp=p.grad.cpu(), status=status, raised=raised)


def budget_checks(world, backend):
    """The budget mode (``max_rows_per_rank``) of ``backend``, on one dispatcher: every
    scenario with a budget all rows fit (judged like ``parity``: status 0, B rows, zero
    tail), a hot expert overflowing a small budget on another dispatcher (flagged where it
    overflowed, finite), one rank's bad ids (nothing raises until ``check_status``, which
    raises on every rank), and on GPUs a steady-state step under
    ``torch.cuda.set_sync_debug_mode("error")`` (no host sync in dispatch, the experts,
    combine or the backward)."""
    from token_dispatcher import MoETokenDispatcher
    rank = dist.get_rank()
    budget = 1024 * world
    out, ok = {}, True
    o = dict(BACKEND_OPTIONS.get(backend, {}))
    disp = MoETokenDispatcher(8 * world, backend=backend, max_rows_per_rank=budget,
                              backend_options=o or None)
    for scen in ("uneven_masked", "zero_token_rank", "one_expert"):
        tokens, kw, _ = SCENARIOS[scen]
        kw = dict(kw)
        case = make_case(world, tokens(world), 256, 8 * world, kw.pop("topk", 4),
                         seed=_bcast_seed(), dtype=torch.bfloat16, **kw)
        res = _gathered(lambda: _budget_step(disp, case, rank))
        if rank == 0:
            j = _judge_budget(case, res, budget)
            out[scen], ok = j, ok and j["ok"]
    case = make_case(world, [128] * world, 256, 8 * world, 2, seed=_bcast_seed(),
                     dtype=torch.bfloat16, skew="one_expert")
    small = MoETokenDispatcher(8 * world, backend=backend, max_rows_per_rank=64,
                               backend_options=o or None)
    res = _gathered(lambda: _budget_step(small, case, rank))
    if rank == 0:
        good = all(r and r["tokens"].shape[0] == 64 and int(r["tpe"].sum()) <= 64
                   and torch.isfinite(r["y"].float()).all() for r, _ in res)
        good &= any(r and r["status"] & 1 for r, _ in res)
        out["overflow"] = {"ok": good, "status": [r and r["status"] for r, _ in res]}
        ok &= good
    res = _gathered(lambda: _budget_step(disp, case, rank, "bad_ids" if rank == world - 1
                                         else None))
    if rank == 0:
        good = all(r and r["raised"] for r, _ in res)
        out["bad_input"] = {"ok": good, "raised": [r and (r["raised"] or "")[:80] for r, _ in res]}
        ok &= good
    if DEVICE == "cuda":
        def steady():
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                disp_out = disp.dispatch(x, topk_idx=idx, topk_probs=p)
                y = disp.combine(disp_out.tokens * disp_out.probs.unsqueeze(1).to(x.dtype),
                                 disp_out.handle)
                y.float().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            return {"status": int(disp_out.status.item())}
        x = case.xs[rank].cuda().clone().requires_grad_(True)
        idx, p = case.idxs[rank].cuda(), case.probs[rank].cuda().clone().requires_grad_(True)
        res = _gathered(steady)
        if rank == 0:
            good = all(r is not None for r, _ in res)
            out["no_host_sync"] = {"ok": good, "error": [e for _, e in res if e][:1]}
            ok &= good
    if rank == 0:
        out["ok"] = ok
        log0(f"[budget R={world}] {backend}: {'OK' if ok else 'FAIL'} " + json.dumps(
            {k: v.get("ok") for k, v in out.items() if isinstance(v, dict)}))
    return out


def _gathered(fn):
    """Run ``fn`` here (an exception is recorded, as the other ranks' would be) and gather
    every rank's (result, error) to every rank."""
    try:
        res, err = fn(), None
    except Exception as exc:  # recorded; judged on rank 0
        res, err = None, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (res, err))
    return gathered


def _judge_budget(case, gathered, budget):
    errs = [e for _, e in gathered if e]
    if errs:
        return {"ok": False, "error": errs[0][:400]}
    res = [r for r, _ in gathered]
    j = _judge(case, {}, [({**r, "tokens": r["tokens"][:int(r["tpe"].sum())],
                            "probs": r["probs"][:int(r["tpe"].sum())]}, None) for r in res],
               reference_moe(case))
    j.pop("_res", None)
    tails = all(not r["tokens"][int(r["tpe"].sum()):].float().any() for r in res)
    shape = all(r["tokens"].shape[0] == budget and r["status"] == 0 for r in res)
    j.update(ok=bool(j["ok"] and tails and shape), zero_tail=tails, rows_and_status=shape)
    return j


def seed_api(world, lib="deep_ep"):
    """fused_a2a round trip: combine(2 * dispatch(x)) = 2 x * ranks reached; grads.
    lib "deep_ep": fused_dispatch / fused_combine (+ the buffer-size mirror check);
    lib "uccl": uccl_fused_dispatch / uccl_fused_combine over UCCL-EP's Buffer."""
    from moe_dispatch import fused_a2a
    from moe_dispatch.backends.deepep.buffer import nvl_size_hint
    rank = dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(_bcast_seed() + rank)
    T, H, E, K = 512, 1024, 8 * world, 4
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    idx = torch.rand(T, E, device="cuda", generator=g).argsort(1)[:, :K].contiguous()
    idx[::5, 1] = -1
    p = torch.rand(T, K, device="cuda", generator=g).requires_grad_(True)
    group = dist.group.WORLD
    if lib == "uccl":
        dispatch, combine = fused_a2a.uccl_fused_dispatch, fused_a2a.uccl_fused_combine
    else:
        dispatch, combine = fused_a2a.fused_dispatch, fused_a2a.fused_combine
    recv_x, recv_idx, recv_p, tpe, handle = dispatch(x, idx, p, E, group)
    y, _ = combine(recv_x * 2, group, handle)
    w = torch.arange(H, device="cuda").float() / H
    ((y.float() * w).sum() + (recv_p * recv_p).sum()).backward()
    L = E // world
    # masked slots land in a spare column, so they never overwrite a True
    reach = torch.zeros(T, world + 1, dtype=torch.bool, device="cuda")
    reach.scatter_(1, torch.where(idx >= 0, idx // L, world), True)
    n = reach[:, :world].sum(1, keepdim=True).float()
    res = {
        "y": rel_err(y.float(), x.detach().float() * 2 * n),
        "gx": rel_err(x.grad.float(), (2 * w * n).expand(T, H)),
        "gp": rel_err(p.grad, torch.where(idx >= 0, 2 * p.detach(), 0.0)),
        "tpe_sum_ok": int(tpe.sum()) == int((recv_idx >= 0).sum()),
        "nvshmem": fused_a2a._is_nvshmem_available() if lib == "deep_ep" else None,
    }
    if lib == "uccl":
        res["size_mirror_ok"] = True
        res["buffer_mirror_ok"] = fused_a2a._uccl_buffer is not None
        Buffer = fused_a2a._v1.UCCL.load()
        fused_a2a.set_uccl_num_sms(24)
        assert Buffer.num_sms == 24
        fused_a2a.set_uccl_num_sms(20)
    else:
        Buffer = fused_a2a._v1.DEEP_EP.load()
        cfg = sys.modules["deep_ep"].Config
        res["size_mirror_ok"] = all(
            nvl_size_hint(s, 256, hb, world) == cfg(s, 6, 256, 6, 128).get_nvl_buffer_size_hint(hb, world)
            for s in (20, 24) for hb in (2048, 14336))
        fused_a2a.set_deepep_num_sms(24)
        assert Buffer.num_sms == 24
        fused_a2a.set_deepep_num_sms(20)
    out = [None] * world
    dist.all_gather_object(out, res)
    if rank == 0:
        agg = {"lib": lib,
               "ok": all(o["y"] < TOL and o["gx"] < TOL and o["gp"] < 1e-5 and o["tpe_sum_ok"]
                         and o["size_mirror_ok"] for o in out),
               "worst_y": max(o["y"] for o in out), "worst_gx": max(o["gx"] for o in out),
               "worst_gp": max(o["gp"] for o in out),
               "nvshmem": out[0]["nvshmem"], "size_mirror_ok": out[0]["size_mirror_ok"]}
        log0(f"[seed-api R={world}] {agg}")
        return agg
    return None


def seed_hybrid_api(world):
    from moe_dispatch import fused_a2a
    from moe_dispatch.routing import topk_to_dense
    rank = dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(_bcast_seed() + rank)
    T, H, E = 256, 1024, 8 * world
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    idx = torch.rand(T, E, device="cuda", generator=g).argsort(1)[:, :4]
    rm, pr = topk_to_dense(idx, torch.rand(T, 4, device="cuda", generator=g), E)
    pr = pr.requires_grad_(True)
    tok, probs, _, tpe, handle = fused_a2a.hybrid_ep_dispatch(x, rm, pr, dist.group.WORLD,
                                                              E // world, pad_multiple=16)
    y = fused_a2a.hybrid_ep_combine(tok * 3, handle, pad_multiple=16)
    (y.float().sum() + (probs * probs).sum()).backward()
    n = rm.sum(1, keepdim=True).float()
    res = {"y": rel_err(y.float(), x.detach().float() * 3 * n),
           "gx": rel_err(x.grad.float(), (3 * n).expand(T, H)),
           "gp": rel_err(pr.grad, torch.where(rm, 2 * pr.detach(), 0.0)),
           "pad_ok": all(int(c) % 16 == 0 for c in tpe.tolist())}
    out = [None] * world
    dist.all_gather_object(out, res)
    if rank == 0:
        log0(f"[seed-hybrid R={world}] {out}")
        return out
    return None


# ------------------------------------------------------------------ timing


def _median_ms(fns, iters, warmup=5):
    """Interleaved timing of each fn: (CUDA-event ms, host ms), each the median over iters
    and the max over ranks. Every call starts on an idle GPU after a barrier, so the event
    time includes the host work before the first kernel; host ms is the time until the
    call returned (DeepEP's dispatch returns after its CPU wait for the counts)."""
    times = {k: [] for k in fns}
    host = {k: [] for k in fns}
    cuda = DEVICE == "cuda"
    for i in range(warmup + iters):
        for k, fn in fns.items():
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if cuda:
                e.record()
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(s.elapsed_time(e) if cuda else (t1 - t0) * 1e3)
                host[k].append((t1 - t0) * 1e3)
    med = torch.tensor([statistics.median(times[k]) for k in fns] +
                       [statistics.median(host[k]) for k in fns], device=DEVICE)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    med = med.tolist()
    n = len(fns)
    return dict(zip(fns, med[:n])), dict(zip(fns, med[n:]))


def _with_env(fn, **env):
    """fn run with environment variables set (e.g. MOE_DISPATCH_TRITON=0: torch permute)."""
    def run():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


V1_BACKENDS = ("deepep", "uccl", "uccl_over_deep_ep")


def bench(world, backends, iters, breakdown=False):
    """DeepEP's benchmark shape (4096 tokens/rank, hidden 7168, top-8 of 256 experts).

    Always: deep_ep.Buffer called directly (layout + dispatch / combine), the seed API
    (fused_a2a), the direct Buffer followed by the project's local permutation
    ("Buffer+permute": what a backend must produce) and each backend in ``backends``.
    With ``breakdown``, for the first V1 backend also: the backend forced to run its
    validation exchange every call, the backend with the torch permutation
    (MOE_DISPATCH_TRITON=0), MoETokenDispatcher with check_inputs False / True, and the
    pieces alone: agree(), DeepEP's layout, canonicalize(), group_plan + permute
    (Triton / torch), unpermute (Triton / torch).
    """
    import deep_ep
    from moe_dispatch import fused_a2a
    from moe_dispatch.backends.hybridep import buffer as hybrid_buffer
    from moe_dispatch.backends.common import agree
    from moe_dispatch.permute import group_plan, permute, unpermute
    from moe_dispatch.protocol import BackendConfig, PendingCheck
    from moe_dispatch.registry import get_backend_class
    from moe_dispatch.routing import canonicalize
    from moe_dispatch.backends.deepep.buffer import required_bytes
    from token_dispatcher import MoETokenDispatcher
    rank = dist.get_rank()
    T, H, K, E = (4096, 7168, 8, 256) if DEVICE == "cuda" else (32, 64, 4, 16)  # cpu-smoke
    L = E // world
    g = torch.Generator(device=DEVICE).manual_seed(1234 + rank)
    x = torch.randn(T, H, device=DEVICE, generator=g).bfloat16()
    scores = torch.randn(T, E, device=DEVICE, generator=g).abs() + 1
    probs, idx = torch.topk(scores, K, dim=-1)
    probs = (probs / probs.sum(1, keepdim=True)).float().contiguous()
    idx = idx.contiguous()
    group = dist.group.WORLD
    dev = torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else \
        torch.device("cpu")
    # HybridEP buffers of the parity runs were built for another expert count.
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    hybrid_buffer.reset_all()
    dist.barrier()
    nvl, _ = required_bytes(deep_ep.Buffer, world, H * 2)
    direct = deep_ep.Buffer(group, nvl, 0, explicitly_destroy=True)
    ok = PendingCheck(None, None)

    def d_direct():
        a, b, c, dd, _ = direct.get_dispatch_layout(idx, E)
        return direct.dispatch(x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=a,
                               num_tokens_per_rdma_rank=b, is_token_in_rank=dd,
                               num_tokens_per_expert=c)

    st = {}
    rx, ridx, rp, counts, h, _ = d_direct()
    st["direct"] = (rx, h)

    def c_direct():
        direct.combine(st["direct"][0], st["direct"][1])

    def d_fused():
        st["fused"] = fused_a2a.fused_dispatch(x, idx, probs, E, group)

    d_fused()

    def c_fused():
        fused_a2a.fused_combine(st["fused"][0], group, st["fused"][4])

    def d_direct_perm():
        rx, ridx, rp, counts, h, _ = d_direct()
        plan = group_plan(ridx, L, counts, None)
        tok, pp = permute(rx, rp, plan)
        st["dp"] = (tok, plan, h)

    d_direct_perm()

    def c_direct_perm():
        tok, plan, h = st["dp"]
        direct.combine(unpermute(tok, plan), h)

    fns_d = {"deep_ep.Buffer": d_direct, "fused_a2a": d_fused,
             "Buffer+permute": d_direct_perm}
    fns_c = {"deep_ep.Buffer": c_direct, "fused_a2a": c_fused,
             "Buffer+permute": c_direct_perm}
    detailed = None
    for be in backends:
        opts = dict(BACKEND_OPTIONS.get(be, {}))
        try:
            b = get_backend_class(be)(BackendConfig(group=group, num_experts=E, options=opts))
        except Exception as exc:
            log0(f"[bench] {be}: {type(exc).__name__}: {exc}")
            continue

        def d_be(b=b, key=be):
            st[key] = b.dispatch(x, idx, probs, ok)

        def c_be(b=b, key=be):
            b.combine(st[key].tokens_NH, st[key].handle)

        d_be()
        fns_d[be], fns_c[be] = d_be, c_be
        if not breakdown or detailed is not None or be not in V1_BACKENDS:
            continue
        detailed = be

        def d_sync(b=b, key=be + " agree every call"):
            b._agreed = None  # forget the agreed shape: validation exchange + host sync
            st[key] = b.dispatch(x, idx, probs, ok)

        def c_sync(b=b, key=be + " agree every call"):
            b.combine(st[key].tokens_NH, st[key].handle)

        d_sync()
        fns_d[be + " agree every call"], fns_c[be + " agree every call"] = d_sync, c_sync
        key_t = be + " torch permute"
        fns_d[key_t] = _with_env(lambda b=b, k=key_t: st.__setitem__(k, b.dispatch(x, idx, probs, ok)),
                                 MOE_DISPATCH_TRITON="0")
        fns_c[key_t] = _with_env(lambda b=b, k=key_t: b.combine(st[k].tokens_NH, st[k].handle),
                                 MOE_DISPATCH_TRITON="0")
        fns_d[key_t]()
        for chk in (False, True):
            key = f"dispatcher({be}, check_inputs={chk})"
            disp = MoETokenDispatcher(E, backend=be, backend_options=opts, check_inputs=chk,
                                      topk=K)

            def d_disp(disp=disp, key=key):
                st[key] = disp.dispatch(x, topk_idx=idx, topk_probs=probs)

            def c_disp(disp=disp, key=key):
                disp.combine(st[key].tokens, st[key].handle)

            d_disp()
            fns_d[key], fns_c[key] = d_disp, c_disp
    if breakdown:
        fns_d["agree() alone"] = lambda: agree(ok, group, dev, [H, K])
        fns_d["layout alone"] = lambda: direct.get_dispatch_layout(idx, E)
        fns_d["canonicalize(check) alone"] = lambda: canonicalize(
            x, E, topk_idx=idx, topk_probs=probs, check_values=True)
        plan0 = group_plan(ridx, L, counts, None)
        tok0, _ = permute(rx, rp, plan0)

        def plan_perm():
            plan = group_plan(ridx, L, counts, None)
            permute(rx, rp, plan)

        fns_d["plan+permute alone (triton)"] = plan_perm
        fns_d["plan+permute alone (torch)"] = _with_env(plan_perm, MOE_DISPATCH_TRITON="0")
        fns_c["unpermute alone (triton)"] = lambda: unpermute(tok0, plan0)
        fns_c["unpermute alone (torch)"] = _with_env(lambda: unpermute(tok0, plan0),
                                                     MOE_DISPATCH_TRITON="0")
    td, hd = _median_ms(fns_d, iters)
    tc, hc = _median_ms(fns_c, iters)
    recv_rows = torch.tensor([float(rx.shape[0])], device=DEVICE)
    dist.all_reduce(recv_rows, op=dist.ReduceOp.MAX)
    st.clear()
    direct.destroy()
    fused_a2a.free_buffer()
    base_d, base_c = td["Buffer+permute"], tc["Buffer+permute"]
    res = {"iters": iters, "shape": {"T": T, "H": H, "K": K, "E": E},
           "dispatch_ms": td, "combine_ms": tc, "dispatch_host_ms": hd, "combine_host_ms": hc,
           "recv_rows_max": recv_rows.item(),
           "dispatch_GBps_direct": recv_rows.item() * H * 2 / (td["deep_ep.Buffer"] * 1e-3) / 1e9,
           "overhead_fused_a2a_pct": 100 * ((td["fused_a2a"] + tc["fused_a2a"]) /
                                            (td["deep_ep.Buffer"] + tc["deep_ep.Buffer"]) - 1),
           "dispatch_overhead_vs_Buffer+permute_pct": {
               k: round(100 * (v / base_d - 1), 2) for k, v in td.items()
               if k not in ("deep_ep.Buffer", "fused_a2a", "Buffer+permute") and "alone" not in k},
           "combine_overhead_vs_Buffer+permute_pct": {
               k: round(100 * (v / base_c - 1), 2) for k, v in tc.items()
               if k not in ("deep_ep.Buffer", "fused_a2a", "Buffer+permute") and "alone" not in k}}
    for be in backends:
        if be in td:
            res[f"overhead_{be}_vs_Buffer+permute_pct"] = 100 * (
                (td[be] + tc[be]) / (base_d + base_c) - 1)
    log0(f"[bench R={world}] " + json.dumps(res))
    if dist.get_rank() == 0:
        lines = [f"[bench-table R={world}] {'':44s} dispatch ms (host) | combine ms (host) "
                 "| vs Buffer+permute d / c"]
        for k in list(td) + [k for k in tc if k not in td]:
            d = f"{td[k]:7.3f} ({hd[k]:7.3f})" if k in td else " " * 17
            c = f"{tc[k]:7.3f} ({hc[k]:7.3f})" if k in tc else " " * 17
            pd = res["dispatch_overhead_vs_Buffer+permute_pct"].get(k)
            pc = res["combine_overhead_vs_Buffer+permute_pct"].get(k)
            rel = "" if pd is None and pc is None else f"{pd if pd is not None else '':>7} / {pc if pc is not None else ''}"
            lines.append(f"[bench-table R={world}] {k:44s} {d} | {c} | {rel}")
        print("\n".join(lines), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="deepep,uccl_over_deep_ep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--bench-backends", default="deepep,alltoall")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed-api", default="v1", help="v1, hybrid, both, uccl or none")
    ap.add_argument("--warm-steps", action="store_true",
                    help="V1 backends: one dispatcher through valid, bad and reshaped calls")
    ap.add_argument("--budget", action="store_true",
                    help="the budget mode (max_rows_per_rank) of every backend in --backends")
    ap.add_argument("--breakdown", action="store_true",
                    help="with --bench: per-stage timing of the first V1 backend")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check this script itself: parity on gloo/CPU with tests/fake_ep.py")
    ap.add_argument("--options", default="{}",
                    help='JSON {backend name: backend_options}, e.g. {"hybridep": {...}}')
    args = ap.parse_args()
    # Registered here, not at import: pytest collection must not add names to the registry.
    register_backend("uccl_over_deep_ep", "test_gpu_backends:UCCLOverDeepEP")
    global BACKEND_OPTIONS
    BACKEND_OPTIONS = json.loads(args.options)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu_smoke:
        global DEVICE
        DEVICE = "cpu"
        import ep_workers
        dist.init_process_group("gloo")
        smoke = ep_workers.fakes()
        smoke.__enter__()
    else:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    backends = [b for b in args.backends.split(",") if b]
    summary = {"world": world, "device": "cpu-smoke" if args.cpu_smoke else
               torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import deep_ep
        summary["deep_ep"] = getattr(deep_ep, "__file__", "?")
    except Exception as exc:
        summary["deep_ep"] = f"not importable: {exc}"
    summary["parity"] = parity(backends, world, args.hidden, 8, 4)
    if args.warm_steps:
        summary["warm_steps"] = {be: warm_steps(world, be) for be in backends
                                 if be in V1_BACKENDS}
    if args.budget:
        summary["budget"] = {be: budget_checks(world, be) for be in backends}
    if args.seed_api in ("v1", "both"):
        summary["seed_api"] = seed_api(world)
    if args.seed_api == "uccl":
        summary["seed_api"] = seed_api(world, "uccl")
    if args.seed_api in ("hybrid", "both"):
        summary["seed_hybrid_api"] = seed_hybrid_api(world)
    if args.bench:
        summary["bench"] = bench(world, [b for b in args.bench_backends.split(",") if b],
                                 args.iters, args.breakdown)
    from moe_dispatch import fused_a2a
    from moe_dispatch.backends.hybridep import buffer as hybrid_buffer
    if args.cpu_smoke:
        smoke.__exit__(None, None, None)
    else:
        fused_a2a.free_buffer()  # every rank, before the process group goes
        from moe_dispatch.backends.deepep import buffer as v1_buffer
        v1_buffer.free_all()     # UCCL's (and any other V1 library's) buffers too
        hybrid_buffer.reset_all()
    if dist.get_rank() == 0:
        ok = all(v.get("ok") for s in summary["parity"].values() for b, v in s.items()
                 if b != "alltoall")
        summary["parity_all_ok"] = ok
        summary["alltoall_failures"] = [sc for sc, s in summary["parity"].items()
                                        if not s.get("alltoall", {}).get("ok")]
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1, default=str)
        b = summary.get("bench") or {}
        if summary.get("warm_steps"):
            summary["warm_steps_ok"] = all(v and v.get("ok") for v in summary["warm_steps"].values())
        if summary.get("budget"):
            summary["budget_ok"] = all(v and v.get("ok") for v in summary["budget"].values())
        print("SUMMARY " + json.dumps({"world": world, "parity_all_ok": ok,
                                       "warm_steps_ok": summary.get("warm_steps_ok"),
                                       "budget_ok": summary.get("budget_ok"),
                                       "alltoall_failures": summary["alltoall_failures"],
                                       "seed_api": summary.get("seed_api"),
                                       "seed_hybrid_api": summary.get("seed_hybrid_api"),
                                       "bench_overhead_pct": {
                                           k: v for k, v in b.items() if "overhead" in k}},
                                      default=str), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def test_script_cpu_smoke():
    """This script itself (parity judging, warm steps, timing table) on 2 gloo ranks with
    the CPU stand-ins, so a broken script is caught before GPU time is spent on it."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here,
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.abspath(__file__), "--cpu-smoke", "--seed-api", "none", "--backends",
         "deepep,uccl_over_deep_ep", "--warm-steps", "--budget", "--bench", "--breakdown",
         "--bench-backends", "deepep", "--iters", "2"],
        capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["parity_all_ok"] and summary["warm_steps_ok"] and summary["budget_ok"], line
    pct = summary["bench_overhead_pct"]["dispatch_overhead_vs_Buffer+permute_pct"]
    assert {"deepep", "deepep agree every call", "dispatcher(deepep, check_inputs=True)"} <= set(pct)
    assert "[bench-table R=2] agree() alone" in proc.stdout


def test_gpu_parity():
    """Placeholder for pytest: the proof runs under torchrun (see the module docstring)."""
    import pytest
    if not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ:
        pytest.skip("needs CUDA GPUs under torchrun: torchrun --nproc-per-node N "
                    "tests/test_gpu_backends.py")


if __name__ == "__main__":
    main()
