"""EP4: how sensitive DeepEP's dispatch time is to host delay before the layout launch, and
how much host time the ``deepep`` backend spends before it. Variants are timed side by
side in interleaved rounds with the bench's Clock (aligned ranks, L2 flush).

    PYTHONPATH=.:<DeepEP build> torchrun --standalone --nproc-per-node 4 \
        benchmarks/scripts/wrapper_host_overhead.py

``direct+spinN`` busy-waits N µs on the host before the layout launch; ``direct+check``
adds the project's one-launch input check. The last column is the host time from the
module call to the library's layout call (``v1_dispatch`` entry).
"""
import time, statistics
import torch, torch.distributed as dist
from moe_dispatch import kernels
import moe_dispatch.backends.deepep.buffer as vb
from _ep4 import E, deepep_buffer, direct_permute, setup

rank, R, sets, clock = setup()
L = E // R
from token_dispatcher import MoETokenDispatcher
buf, dcfg = deepep_buffer(R)

def spin(us):
    t = time.perf_counter() + us * 1e-6
    while time.perf_counter() < t: pass

def direct(pre=None, delay=0):
    def f(i):
        st = sets[i % len(sets)]
        if delay: spin(delay)
        if pre != "check":
            return direct_permute(buf, dcfg, st, L)
        idx, bad = kernels.check_values(st.idx_TK, st.probs_TK, E)
        return direct_permute(buf, dcfg, st, L, idx, lambda nte: nte.add_(bad, alpha=1 << 20))
    return f
marks = []
orig = vb.v1_dispatch
def marked(*a, **k):
    marks.append(time.perf_counter()); return orig(*a, **k)
vb.v1_dispatch = marked
D = {"wrap": MoETokenDispatcher(E, None, backend="deepep", backend_options={"num_sms": 24}),
     "wrap_nocheck": MoETokenDispatcher(E, None, backend="deepep", backend_options={"num_sms": 24}, check_inputs=False)}
def wrap(name):
    d = D[name]
    def f(i):
        st = sets[i % len(sets)]
        return d.dispatch(st.x_TH, topk_idx=st.idx_TK, topk_probs=st.probs_TK)
    return f
V = {"direct+permute": direct(), "direct+check": direct("check"), "direct+spin30": direct(delay=30),
     "direct+spin100": direct(delay=100), "wrap": wrap("wrap"), "wrap_nocheck": wrap("wrap_nocheck")}
res = {k: [] for k in V}; pre = {k: [] for k in V}
with torch.no_grad():
    for rnd in range(5):
        for k, f in V.items():
            res[k] += clock.run(lambda i, _: f(i), 20, 4).seconds
            if k.startswith("wrap"):  # host us from call to v1_dispatch entry
                for i in range(10):
                    torch.cuda.synchronize(); marks.clear(); t0 = time.perf_counter(); f(i)
                    pre[k].append((marks[0] - t0) * 1e6)
    torch.cuda.synchronize()
    def q(v, p): v = sorted(v); return v[int(p * (len(v) - 1))]
    out = {k: (statistics.median(v) * 1e6, q(v, .1) * 1e6, q(v, .9) * 1e6, statistics.median(pre[k]) if pre[k] else 0) for k, v in res.items()}
    # host microbench at this shape (rank 0's own numbers)
    st = sets[0]; hb = {}
    from moe_dispatch.routing import canonicalize
    for name, fn in {"check_values T=4096": lambda: kernels.check_values(st.idx_TK, st.probs_TK, E),
                     "canonicalize+check": lambda: canonicalize(st.x_TH, E, topk_idx=st.idx_TK, topk_probs=st.probs_TK),
                     "canonicalize nocheck": lambda: canonicalize(st.x_TH, E, topk_idx=st.idx_TK, topk_probs=st.probs_TK, check_values=False),
                     "get_dispatch_layout": lambda: buf.get_dispatch_layout(st.idx_TK, E),
                     "torch add_": lambda: st.probs_TK.add_(0)}.items():
        for _ in range(5): fn()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(200): fn()
        hb[name] = (time.perf_counter() - t0) / 200 * 1e6; torch.cuda.synchronize()
    allo = [None] * R; dist.all_gather_object(allo, (out, hb))
    if rank == 0:
        print("variant          per-rank median dispatch us  [p10-p90 of rank 0]   host us call->v1_dispatch (per rank)")
        for k in V:
            print(f"{k:16s} " + " ".join(f"{o[0][k][0]:7.1f}" for o in allo) + f"   [{allo[0][0][k][1]:.0f}-{allo[0][0][k][2]:.0f}]   " + " ".join(f"{o[0][k][3]:6.1f}" for o in allo))
        print("host us per call (back-to-back, per rank):")
        for n in allo[0][1]:
            print(f"  {n:24s} " + " ".join(f"{o[1][n]:7.1f}" for o in allo))
dist.barrier(); buf.destroy()
for d in D.values(): d.backend.free_buffer()
dist.barrier(); dist.destroy_process_group()
