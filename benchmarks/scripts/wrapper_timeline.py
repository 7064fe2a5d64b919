"""The ``deepep`` backend against DeepEP ``Buffer`` + permute at EP4: interleaved timings of
four variants, then a torch.profiler timeline of one iteration of each on rank 0.

    PYTHONPATH=.:<DeepEP build> torchrun --standalone --nproc-per-node 4 \
        benchmarks/scripts/wrapper_timeline.py

Variants: ``direct+permute`` (Buffer layout + dispatch + our permute), ``wrap``
(``MoETokenDispatcher(backend="deepep")``), ``wrap_nocheck`` (``check_inputs=False``),
``backend_only`` (the backend's ``dispatch`` without the module). The profiler perturbs
the timings; use wrapper_host_overhead.py for numbers. Chrome traces go to $OUT.
"""
import os, time, statistics
import torch, torch.distributed as dist
from moe_dispatch.protocol import PendingCheck
from _ep4 import E, deepep_buffer, direct_permute, setup

rank, R, sets, clock = setup()
L = E // R
from token_dispatcher import MoETokenDispatcher
buf, dcfg = deepep_buffer(R)

def direct_perm(i):
    return direct_permute(buf, dcfg, sets[i % len(sets)], L)

D = {}
D["wrap"] = MoETokenDispatcher(E, None, backend="deepep", backend_options={"num_sms": 24})
D["wrap_nocheck"] = MoETokenDispatcher(E, None, backend="deepep", backend_options={"num_sms": 24}, check_inputs=False)
def wrap(name):
    d = D[name]
    def f(i):
        st = sets[i % len(sets)]
        return d.dispatch(st.x_TH, topk_idx=st.idx_TK, topk_probs=st.probs_TK)
    return f
def backend_only(i):
    st = sets[i % len(sets)]
    return D["wrap"].backend.dispatch(st.x_TH, st.idx_TK, st.probs_TK, PendingCheck(None, None))
V = {"direct+permute": direct_perm, "wrap": wrap("wrap"), "wrap_nocheck": wrap("wrap_nocheck"),
     "backend_only": backend_only}
res = {k: [] for k in V}
host = {k: [] for k in V}
with torch.no_grad():
    for rnd in range(4):
        for k, f in V.items():
            t = clock.run(lambda i, _: f(i), 20, 5)
            res[k] += t.seconds
            # host time per call (no alignment): launch-to-return incl. DeepEP's CPU wait
            hs = []
            for i in range(10):
                torch.cuda.synchronize(); clock.align(); torch.cuda.synchronize()
                t0 = time.perf_counter(); f(i); hs.append(time.perf_counter() - t0)
            host[k] += hs
    torch.cuda.synchronize()
    out = {k: (statistics.median(v) * 1e6, statistics.median(host[k]) * 1e6) for k, v in res.items()}
    allo = [None] * R; dist.all_gather_object(allo, out)
    if rank == 0:
        print("variant               dispatch us per rank (median)        host us (median)")
        for k in V:
            print(f"{k:20s} " + " ".join(f"{o[k][0]:7.1f}" for o in allo) + "   |  " + " ".join(f"{o[k][1]:7.1f}" for o in allo))
    # profiler timeline of one aligned iteration each
    from torch.profiler import profile, ProfilerActivity, record_function
    for k, f in V.items():
        for i in range(3): f(i)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                clock._flush.zero_(); clock.align()
                with record_function(f"ITER_{k}_{i}"):
                    f(i)
            torch.cuda.synchronize()
        if rank == 0:
            ev = prof.events()
            it = [e for e in ev if e.name == f"ITER_{k}_1" and e.device_type.name == "CPU"]
            t0 = it[0].time_range.start if it else 0
            rows = []
            for e in ev:
                if e.time_range.start < t0: continue
                if e.device_type.name == "CUDA" or e.name.startswith("cuda") or e.name.startswith("ITER"):
                    rows.append((e.time_range.start - t0, e.time_range.elapsed_us(), e.device_type.name[:4], e.name[:90]))
            rows.sort()
            print(f"--- timeline {k} (rank 0, iteration 2; us from ITER start; host wait shows as gaps)")
            for r in rows[:70]:
                print(f"{r[0]:9.1f} {r[1]:8.1f} {r[2]} {r[3]}")
            prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), f"trace_{k}.json"))
dist.barrier(); buf.destroy()
for d in D.values(): d.backend.free_buffer()
dist.barrier(); dist.destroy_process_group()
