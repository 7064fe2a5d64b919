"""Where one dispatch / combine call spends its time, on one GPU (EP1), from torch.profiler.

    torchrun --standalone --nproc-per-node 1 benchmarks/scripts/profile_calls.py \
        [--backends alltoall,allgather,nvshmem] [--presets small] [--modes exact,budget] \
        [--out DIR]

For each (preset, backend, mode) it warms the call up, then profiles ``--calls`` calls of
dispatch + combine (forward, no grad) with CPU and CUDA activity, and reports per call:
  * launches: kernel launches the host made (``cudaLaunchKernel`` / ``cuLaunchKernel`` /
    graph launches), memcpys and syncs (``cudaStreamSynchronize`` etc.);
  * host_us: the host's wall time per call; the top host-time ops (self CPU time);
  * gpu_us: the summed GPU kernel time per call, and the kernels by total time.
A Chrome trace per case is written to ``--out`` (open in Perfetto). The budget mode is also
profiled as captured CUDA graphs (``budget-graph``): there the kernel list is what one
replay runs on the GPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from budget_ep1 import graphed, routing  # this folder: the same routing and capture
from token_dispatcher import MoETokenDispatcher

PRESETS = {"small": (128, 7168, 8, 256), "mid": (4096, 2048, 6, 64)}
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
          "cudaGraphLaunch")
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def case_fns(backend, mode, T, H, K, E, dev, g):
    """(dispatch fn, combine fn) of one case; both no-arg, results kept in a box."""
    budget = -(-int(1.25 * T * K) // 256) * 256 if mode.startswith("budget") else None
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=budget)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    idx, p = routing(T, E, K, dev, g)
    box = {}

    def disp():
        box["out"] = d.dispatch(x, topk_idx=idx, topk_probs=p)

    def comb():
        box["y"] = d.combine(box["out"].tokens, box["out"].handle)
    disp(), comb()
    if mode == "budget-graph":
        disp_g = graphed(disp)
        disp_g()
        return disp_g, graphed(comb)
    return disp, comb


def profile_one(fn, calls, trace):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    return summarize(prof, calls, host)


def summarize(prof, calls, host_us):
    launches = syncs = memcpy = 0
    kernels = collections.Counter()
    kernel_us = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += 1
            kernel_us[e.name] += e.device_time
        elif e.name in LAUNCH:
            launches += 1
        elif e.name in SYNC:
            syncs += 1
        elif e.name.startswith("cudaMemcpy"):
            memcpy += 1
    self_cpu = collections.Counter()
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA and e.key.startswith(("aten::", "triton", "c10d", "nccl", "Memcpy", "cuda")):
            self_cpu[e.key] += e.self_cpu_time_total
    return {
        "host_us": host_us, "launches": launches / calls, "syncs": syncs / calls,
        "memcpy": memcpy / calls, "gpu_kernels": sum(kernels.values()) / calls,
        "gpu_us": sum(kernel_us.values()) / calls,
        "top_host_self_us": [(k, v / calls) for k, v in self_cpu.most_common(15)],
        "top_kernels_us": [(k[:90], kernels[k] / calls, kernel_us[k] / calls)
                           for k, _ in kernel_us.most_common(25)],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="alltoall,allgather,nvshmem")
    ap.add_argument("--presets", default="small")
    ap.add_argument("--modes", default="exact,budget,budget-graph")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace-presets", default="small", help="write Chrome traces for these")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    g = torch.Generator(dev).manual_seed(0)
    rows = []
    for preset in a.presets.split(","):
        T, H, K, E = PRESETS[preset]
        for be in a.backends.split(","):
            for mode in a.modes.split(","):
                row = {"preset": preset, "backend": be, "mode": mode}
                try:
                    with torch.no_grad():
                        disp, comb = case_fns(be, mode, T, H, K, E, dev, g)
                        for name, fn in (("dispatch", disp), ("combine", comb)):
                            trace = os.path.join(a.out, f"{preset}-{be}-{mode}-{name}.json") \
                                if a.out and preset in a.trace_presets.split(",") else None
                            row[name] = profile_one(fn, a.calls, trace)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(brief(row), flush=True)
    if a.out:
        with open(os.path.join(a.out, "profile_calls.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                       "args": vars(a), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


def brief(row) -> str:
    head = f"{row['preset']:>5} {row['backend']:<9} {row['mode']:<12}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    out = [head]
    for name in ("dispatch", "combine"):
        r = row[name]
        out.append(f"  {name}: host {r['host_us']:.0f} us, launches {r['launches']:.0f}, "
                   f"syncs {r['syncs']:.1f}, memcpy {r['memcpy']:.1f}, "
                   f"gpu kernels {r['gpu_kernels']:.0f} / {r['gpu_us']:.0f} us")
        out.append("    host: " + ", ".join(f"{k} {v:.0f}" for k, v in r["top_host_self_us"][:8]))
        out.append("    gpu:  " + ", ".join(f"{k[:40]} x{n:.0f} {v:.0f}"
                                            for k, n, v in r["top_kernels_us"][:8]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
