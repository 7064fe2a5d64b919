"""Where the host time of a dispatch goes, by Python function (cProfile), on one GPU (EP1).

    torchrun --standalone --nproc-per-node 1 benchmarks/scripts/host_profile.py \
        [--backends alltoall,allgather] [--presets small] [--modes exact,budget] [--calls 100]

For each case: the host µs per call without the profiler (median of 5 rounds), then the
functions by cumulative and by own time over ``--calls`` profiled calls (the profiler adds
its own overhead; read the shares, not the absolute numbers).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.distributed as dist

from budget_ep1 import routing  # this folder: the same routing
from token_dispatcher import MoETokenDispatcher

PRESETS = {"small": (128, 7168, 8, 256), "mid": (4096, 2048, 6, 64)}


def make_call(backend, mode, T, H, K, E, dev):
    g = torch.Generator(dev).manual_seed(0)
    budget = -(-int(1.25 * T * K) // 256) * 256 if mode == "budget" else None
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=budget)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    idx, probs = routing(T, E, K, dev, g)

    def call():
        out = d.dispatch(x, topk_idx=idx, topk_probs=probs)
        d.combine(out.tokens, out.handle)
    return call


def host_us(call, calls):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="alltoall,allgather")
    ap.add_argument("--presets", default="small")
    ap.add_argument("--modes", default="exact,budget")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    dist.init_process_group("nccl")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    for preset in a.presets.split(","):
        T, H, K, E = PRESETS[preset]
        for be in a.backends.split(","):
            for mode in a.modes.split(","):
                with torch.no_grad():
                    call = make_call(be, mode, T, H, K, E, dev)
                    for _ in range(10):
                        call()
                    rounds = [host_us(call, a.calls) for _ in range(5)]
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(a.calls):
                        call()
                    prof.disable()
                print(f"=== {preset} {be} {mode}: dispatch+combine host us/call "
                      f"median {statistics.median(rounds):.0f} "
                      f"[{min(rounds):.0f}-{max(rounds):.0f}]", flush=True)
                for key in ("cumulative", "tottime"):
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(a.top)
                    print(f"--- by {key}\n" + s.getvalue().split("\n\n", 2)[-1], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
