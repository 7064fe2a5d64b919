"""GPU proof of the fused-kernel backends (run under torchrun on 2 and 4 GPUs).

    torchrun --nproc-per-node 4 tests/test_gpu_backends.py --backends deepep,uccl_over_deep_ep \
        --out results.json [--bench]

Every rank builds the same random cases (fresh seed, broadcast), runs dispatch -> a
per-expert nonlinear map -> combine -> backward through ``MoETokenDispatcher`` for each
backend, and rank 0 compares each backend with the single-process float64 dense
reference (``moe_dispatch.testing``) and with ``alltoall``: dispatched rows, per-expert
counts, probs, outputs, grads to hidden and to the router probs. Cases: uneven counts
with -1 slots, a zero-token rank, all tokens on one expert, zipf skew with
pad_multiple, dense routing with a zero-token rank. Then the seed API
(``moe_dispatch.fused_a2a``) round trip, the buffer-size mirror against DeepEP's own
hint, and with ``--bench`` the timing at DeepEP's benchmark shape: ``deep_ep.Buffer``
called directly vs ``fused_a2a`` vs the ``deepep`` backend (plus the direct Buffer with
the same local permutation, so the backend's extra work is shown separately), median of
CUDA-event times, interleaved.

``uccl_over_deep_ep`` is the ``uccl`` backend's adapter with
``backend_options={"buffer_module": "deep_ep"}``: UCCL-EP's Buffer has DeepEP V1's API,
so this proves the adapter where UCCL itself cannot load. Under pytest (CPU CI) the single
test here skips.
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
        from moe_dispatch import v1_backend
        from moe_dispatch.v1_buffer import DEEP_EP
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


def seed_api(world):
    """fused_a2a round trip: combine(2 * dispatch(x)) = 2 x * ranks reached; grads."""
    from moe_dispatch import fused_a2a
    from moe_dispatch.v1_buffer import nvl_size_hint
    rank = dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(_bcast_seed() + rank)
    T, H, E, K = 512, 1024, 8 * world, 4
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    idx = torch.rand(T, E, device="cuda", generator=g).argsort(1)[:, :K].contiguous()
    idx[::5, 1] = -1
    p = torch.rand(T, K, device="cuda", generator=g).requires_grad_(True)
    group = dist.group.WORLD
    recv_x, recv_idx, recv_p, tpe, handle = fused_a2a.fused_dispatch(x, idx, p, E, group)
    y, _ = fused_a2a.fused_combine(recv_x * 2, group, handle)
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
        "nvshmem": fused_a2a._is_nvshmem_available(),
    }
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
        agg = {"ok": all(o["y"] < TOL and o["gx"] < TOL and o["gp"] < 1e-5 and o["tpe_sum_ok"]
                         and o["size_mirror_ok"] for o in out),
               "worst_y": max(o["y"] for o in out), "worst_gx": max(o["gx"] for o in out),
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
    """Interleaved CUDA-event timing of each fn; median over iters, max over ranks."""
    times = {k: [] for k in fns}
    for i in range(warmup + iters):
        for k, fn in fns.items():
            dist.barrier()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(s.elapsed_time(e))
    med = torch.tensor([statistics.median(times[k]) for k in fns], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return dict(zip(fns, med.tolist()))


def bench(world, backends, iters):
    import deep_ep
    from moe_dispatch import fused_a2a
    from moe_dispatch.permute import group_plan, permute, unpermute
    from moe_dispatch.protocol import BackendConfig, PendingCheck
    from moe_dispatch.registry import get_backend_class
    from moe_dispatch.v1_buffer import required_bytes
    rank = dist.get_rank()
    T, H, K, E = 4096, 7168, 8, 256
    L = E // world
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    scores = torch.randn(T, E, device="cuda", generator=g).abs() + 1
    probs, idx = torch.topk(scores, K, dim=-1)
    probs = (probs / probs.sum(1, keepdim=True)).float().contiguous()
    idx = idx.contiguous()
    group = dist.group.WORLD
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
    for be in backends:
        try:
            b = get_backend_class(be)(BackendConfig(
                group=group, num_experts=E,
                options=dict(BACKEND_OPTIONS.get(be, {}))))
        except Exception as exc:
            log0(f"[bench] {be}: {exc}")
            continue

        def d_be(b=b, be=be):
            st[be] = b.dispatch(x, idx, probs, ok)

        def c_be(b=b, be=be):
            b.combine(st[be].tokens_NH, st[be].handle)

        d_be()
        fns_d[be] = d_be
        fns_c[be] = c_be
    td = _median_ms(fns_d, iters)
    tc = _median_ms(fns_c, iters)
    recv_rows = torch.tensor([float(rx.shape[0])], device="cuda")
    dist.all_reduce(recv_rows, op=dist.ReduceOp.MAX)
    direct.destroy()
    fused_a2a.free_buffer()
    res = {"iters": iters, "dispatch_ms": td, "combine_ms": tc, "recv_rows_max": recv_rows.item(),
           "dispatch_GBps_direct": recv_rows.item() * H * 2 / (td["deep_ep.Buffer"] * 1e-3) / 1e9,
           "overhead_fused_a2a_pct": 100 * ((td["fused_a2a"] + tc["fused_a2a"]) /
                                            (td["deep_ep.Buffer"] + tc["deep_ep.Buffer"]) - 1)}
    if "deepep" in td:
        res["overhead_backend_vs_Buffer+permute_pct"] = 100 * (
            (td["deepep"] + tc["deepep"]) / (td["Buffer+permute"] + tc["Buffer+permute"]) - 1)
        res["overhead_backend_vs_bare_Buffer_pct"] = 100 * (
            (td["deepep"] + tc["deepep"]) / (td["deep_ep.Buffer"] + tc["deep_ep.Buffer"]) - 1)
    log0(f"[bench R={world}] " + json.dumps(res))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="deepep,uccl_over_deep_ep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--bench-backends", default="deepep,alltoall")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed-api", default="v1", help="v1, hybrid, both or none")
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
    if args.seed_api in ("v1", "both"):
        summary["seed_api"] = seed_api(world)
    if args.seed_api in ("hybrid", "both"):
        summary["seed_hybrid_api"] = seed_hybrid_api(world)
    if args.bench:
        summary["bench"] = bench(world, [b for b in args.bench_backends.split(",") if b],
                                 args.iters)
    from moe_dispatch import fused_a2a, hybrid_buffer
    if args.cpu_smoke:
        smoke.__exit__(None, None, None)
    else:
        fused_a2a.free_buffer()  # every rank, before the process group goes
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
        print("SUMMARY " + json.dumps({"world": world, "parity_all_ok": ok,
                                       "alltoall_failures": summary["alltoall_failures"],
                                       "seed_api": summary.get("seed_api"),
                                       "bench": summary.get("bench")}, default=str), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def test_gpu_parity():
    """Placeholder for pytest: the proof runs under torchrun (see the module docstring)."""
    import pytest
    if not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ:
        pytest.skip("needs CUDA GPUs under torchrun: torchrun --nproc-per-node N "
                    "tests/test_gpu_backends.py")


if __name__ == "__main__":
    main()
