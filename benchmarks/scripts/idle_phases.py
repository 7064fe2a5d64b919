"""EP4: does a backend's dispatch time depend on what ran before it? Phases per backend
(``deepep``, ``nvshmem``): timing, timing again, after a --check pass, after freeing its
outputs, after gc + empty_cache, after a 5 s sleep, after two combines.

    PYTHONPATH=.:<DeepEP build> torchrun --standalone --nproc-per-node 4 \
        benchmarks/scripts/idle_phases.py

Timed with the bench's Clock (its warm-up rules included).
"""
import time, statistics, gc
import torch, torch.distributed as dist
from moe_dispatch.bench import check as chk
from _ep4 import setup

rank, R, sets, clock = setup()
from token_dispatcher import MoETokenDispatcher
lines = []
def med(t): return statistics.median(t.seconds) * 1e6
for name, opts in (("deepep", {"num_sms": 24}), ("nvshmem", {})):
    disp = MoETokenDispatcher(256, None, backend=name, backend_options=opts)
    f = lambda i, _=None: disp.dispatch(sets[i % 4].x_TH, topk_idx=sets[i % 4].idx_TK, topk_probs=sets[i % 4].probs_TK)
    res = []
    with torch.no_grad():
        res.append(("base", med(clock.run(f, 30, 8))))
        res.append(("base2", med(clock.run(f, 30, 2))))
        keep = []
        for s in range(2):
            out, y = chk.run_backend(disp, sets[s]); keep.append((out, y))
        res.append(("after check (outputs held)", med(clock.run(f, 30, 2))))
        keep.clear()
        res.append(("outputs freed", med(clock.run(f, 30, 2))))
        gc.collect(); torch.cuda.empty_cache()
        res.append(("gc+empty_cache", med(clock.run(f, 30, 2))))
        for s in range(2):
            out, y = chk.run_backend(disp, sets[s])
        del out, y
        res.append(("check again, freed", med(clock.run(f, 30, 2))))
        time.sleep(5); dist.barrier()
        res.append(("after 5 s sleep", med(clock.run(f, 30, 2))))
        c = [disp.combine(*(lambda o: (chk.expert_fn(o.tokens, o.probs), o.handle))(f(s))) for s in range(2)]
        del c
        res.append(("after 2 combines", med(clock.run(f, 30, 2))))
    allo = [None] * R; dist.all_gather_object(allo, res)
    if rank == 0:
        for j, (lab, _) in enumerate(res):
            lines.append(f"{name:8s} {lab:28s} " + " ".join(f"{a[j][1]:7.1f}" for a in allo))
    torch.cuda.synchronize(); dist.barrier()
    if hasattr(disp.backend, "free_buffer"): disp.backend.free_buffer()
    del disp; gc.collect(); torch.cuda.empty_cache(); dist.barrier()
if rank == 0: print("\n".join(lines))
dist.barrier(); dist.destroy_process_group()
