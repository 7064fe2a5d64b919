"""Host time of a CUDA-graphed MoE layer's forward + backward, with the GPU idle at each call.

    torchrun --standalone --nproc-per-node 1 benchmarks/scripts/layer_graph_host.py \
        [--backends alltoall,allgather,nvshmem] [--tokens 128] [--hidden 2048] [--iters 50]

A loop of calls ended by one sync measures the host only while the GPU keeps up: a layer
whose GPU time is longer than its host time fills the launch queue, and the host then
waits inside a launch (that wait is GPU time, not host work). Here the device is synced
before every call and the host clock read around the call alone, so the figure is the
host's own work: eager (``MoELayer`` without capture) and captured (``capture_layers``),
and, for the captured layer, its parts: the layer's forward, the output's ``backward`` call,
and the bare graph replays (forward then backward, as captured). ``--stack N``: N captured
layers in sequence under one ``backward`` call (as in a model) against one layer: the
marginal host cost of a layer. Medians over ``--iters``. ``--profile``: the N-layer step
(or one layer) under cProfile as well, its functions by own time (where the host time goes).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import json
import statistics
import time

import torch
import torch.distributed as dist

from token_dispatcher import MoETokenDispatcher
from token_dispatcher.layer import MoELayer, capture_layers


def idle_host_us(fn, iters):
    """Median host µs of ``fn()`` with the device idle when it starts."""
    out = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out)


def gpu_us(fn, iters):
    """Median device µs of ``fn()`` (CUDA events around it, device idle before): compared
    with the host figure it shows whether the host could have been waiting on the GPU."""
    out = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return statistics.median(out)


def raw_replays(call, iters):
    """Median host µs of the bare forward and backward graph replays, in the order the
    graphs were captured for (forward, then backward), the device idle before each."""
    fwd, bwd = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call.fwd_replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        call.bwd_replay()
        t3 = time.perf_counter()
        fwd.append((t1 - t0) * 1e6)
        bwd.append((t3 - t2) * 1e6)
    torch.cuda.synchronize()
    return {"graph_fwd_replay": statistics.median(fwd),
            "graph_bwd_replay": statistics.median(bwd)}


def build(backend, T, H, K, E, F, dev, graph):
    B = -(-int(1.25 * T * K) // 256) * 256
    torch.manual_seed(0)
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=B)
    layer = MoELayer(H, F, E, K, dispatcher=d).to(dev, torch.bfloat16)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    if graph:
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
        capture_layers([layer], [x.detach().clone().requires_grad_(True)])
    return layer, x


def measure(backend, T, H, K, E, F, dev, iters):
    row = {}
    g_TH = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    for mode in ("eager", "graph"):
        layer, x = build(backend, T, H, K, E, F, dev, mode == "graph")

        def step():
            layer(x).output.backward(g_TH)
        for _ in range(5):
            step()
        row[f"{mode}_fwd_bwd"] = idle_host_us(step, iters)
        if mode == "graph":
            row["graph_forward"] = idle_host_us(lambda: layer(x), iters)
            box = {}

            def fwd_then_time_bwd():
                box["m"] = layer(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                box["m"].output.backward(g_TH)
                box["us"] = (time.perf_counter() - t0) * 1e6
            bwd = []
            for _ in range(iters):
                fwd_then_time_bwd()
                bwd.append(box["us"])
            row["graph_backward"] = statistics.median(bwd)
            row.update(raw_replays(layer._graphed, iters))
    return row


def profiled(fn, iters, top=30) -> str:
    """``fn`` under cProfile (device idle before each call): functions by own time."""
    prof = cProfile.Profile()
    for _ in range(iters):
        torch.cuda.synchronize()
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def stack_per_layer(backend, n, T, H, K, E, F, dev, iters, profile=False):
    """Host µs of one forward + backward through ``n`` captured layers in sequence (one
    ``backward`` call, as in a model), for n and for 1: the marginal cost of a layer."""
    out = {}
    g_TH = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    for count in (1, n):
        layers = []
        for _ in range(count):
            layer, x = build(backend, T, H, K, E, F, dev, False)
            layers.append(layer)
        for layer in layers:
            for p in layer.parameters():
                p.grad = torch.zeros_like(p)
        capture_layers(layers, [x.detach().clone().requires_grad_(True) for _ in layers])

        def step():
            h = x
            for layer in layers:
                h = layer(h).output
            h.backward(g_TH)
        for _ in range(5):
            step()
        out[count] = idle_host_us(step, iters)
        out[f"gpu{count}"] = gpu_us(step, iters)
        if profile and count == n:
            print(profiled(step, iters), flush=True)
    return {f"stack{n}_fwd_bwd": out[n], "stack1_fwd_bwd": out[1],
            f"stack{n}_gpu": out[f"gpu{n}"], "stack1_gpu": out["gpu1"],
            "marginal_per_layer": (out[n] - out[1]) / (n - 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="alltoall,allgather,nvshmem")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--stack", type=int, default=0, help="also N captured layers in sequence")
    ap.add_argument("--profile", action="store_true", help="cProfile the N-layer step")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dist.init_process_group("nccl")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    rows = {}
    for be in a.backends.split(","):
        rows[be] = measure(be, a.tokens, a.hidden, a.topk, a.experts, a.ffn, dev, a.iters)
        if a.stack > 1:
            rows[be].update(stack_per_layer(be, a.stack, a.tokens, a.hidden, a.topk,
                                            a.experts, a.ffn, dev, a.iters, a.profile))
        print(be, " ".join(f"{k}={v:.1f}" for k, v in rows[be].items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "args": vars(a),
                       "host_us_median": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
