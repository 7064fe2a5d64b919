"""The budget mode on one GPU (EP1): correctness against the exact mode, and host cost.

Run under torchrun with one rank (``torchrun --standalone --nproc-per-node 1
benchmarks/scripts/budget_ep1.py --json OUT.json``). For each backend and preset:
  * check: the budget mode's kept rows, probs, counts, combine and both gradients equal the
    exact mode's on fresh random routing (max abs difference, must be 0 / tiny);
  * time, per call, dispatch and combine (forward) in three ways, interleaved in one loop:
    the exact mode, the budget mode eager, and the budget mode captured as CUDA graphs
    (one for dispatch, one for combine, replayed). ``host_us`` is the time the host spends
    in the call (nothing waits for the GPU); ``wall_us`` the time per call of a loop of
    calls ended by one sync (the larger of host and GPU time, as a training step sees it);
  * the whole MoE layer (router, dispatch, grouped experts, combine; forward + backward):
    eager against ``layer.capture_layers`` (captured forward + backward graphs; the backward
    graph adds the parameters' gradients into ``.grad``: ``token_dispatcher/layer_graph.py``).
    The gradients accumulate over the timed calls (never zeroed), in place in both ways;
  * kernels: the GPU operations (kernels, memsets, copies) one budget dispatch launches,
    eager and in one replay of its CUDA graph, and one exact-mode dispatch (eager; its host
    sync is the "Memcpy DtoH") (torch.profiler). ``--count-kernels`` prints
    only these, with their names (``torchrun --standalone --nproc-per-node 1
    benchmarks/scripts/budget_ep1.py --count-kernels --backends alltoall,allgather``).
Numbers are medians over repeats; every repeat's value is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from token_dispatcher import MoETokenDispatcher
from token_dispatcher.layer import MoELayer, capture_layers

PRESETS = {"small": (128, 7168, 8, 256), "mid": (4096, 2048, 6, 64)}


def routing(T, E, K, dev, g):
    scores = torch.rand(T, E, device=dev, generator=g)
    probs, idx = torch.topk(scores, K, dim=1)
    idx[torch.rand(T, K, device=dev, generator=g) < 0.05] = -1  # some masked slots
    return idx, probs.softmax(-1)


def budget_for(T, K):
    return -(-int(1.25 * T * K) // 256) * 256


def check(backend, T, H, K, E, dev, g):
    B = budget_for(T, K)
    ex = MoETokenDispatcher(E, backend=backend)
    bu = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=B)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    idx, p = routing(T, E, K, dev, g)
    res = {}
    for name, d in (("exact", ex), ("budget", bu)):
        xs = x.clone().requires_grad_(True)
        ps = p.clone().requires_grad_(True)
        out = d.dispatch(xs, topk_idx=idx, topk_probs=ps)
        y = d.combine(out.tokens.float().mul(out.probs[:, None]).to(x.dtype), out.handle)
        gy = torch.randn(y.shape, device=dev, generator=torch.Generator(dev).manual_seed(1),
                         dtype=y.dtype)
        (y.float() * gy.float()).sum().backward()
        res[name] = (out, y, xs.grad, ps.grad)
    (o0, y0, gx0, gp0), (o1, y1, gx1, gp1) = res["exact"], res["budget"]
    n = int(o0.tokens_per_expert.sum())
    return dict(
        budget=B, rows=n, status=int(o1.status.item()),
        tpe_equal=bool(torch.equal(o0.tokens_per_expert.to(dev), o1.tokens_per_expert)),
        rows_maxdiff=float((o1.tokens[:n].float() - o0.tokens.float()).abs().max()),
        tail_nonzero=int((o1.tokens[n:] != 0).sum()),
        y_maxdiff=float((y1.float() - y0.float()).abs().max()),
        gx_maxdiff=float((gx1.float() - gx0.float()).abs().max()),
        gp_maxdiff=float((gp1 - gp0).abs().max()))


def host_and_wall(fn, iters):
    """(host us per call, wall us per call) for ``iters`` calls of ``fn``."""
    torch.cuda.synchronize()
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(iters):
        h0 = time.perf_counter()
        fn()
        host += time.perf_counter() - h0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return host / iters * 1e6, wall / iters * 1e6


def graphed(fn):
    """Capture ``fn`` (after warm-up) into a CUDA graph; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_dispatch(backend, T, H, K, E, dev, g, iters, repeats):
    B = budget_for(T, K)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    idx, p = routing(T, E, K, dev, g)
    ways = {}
    for mode, budget in (("exact", None), ("budget", B)):
        d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=budget)
        box = {}

        def disp(d=d, box=box):
            box["out"] = d.dispatch(x, topk_idx=idx, topk_probs=p)

        def comb(d=d, box=box):
            box["y"] = d.combine(box["out"].tokens, box["out"].handle)
        with torch.no_grad():
            disp(), comb()
        ways[mode] = (disp, comb)
        if budget is not None:
            with torch.no_grad():
                ways["budget-graph"] = (graphed(disp), graphed(comb))
    out = {k: {"dispatch": [], "combine": []} for k in ways}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved: every way sees the same machine state
            for k, (disp, comb) in ways.items():
                out[k]["dispatch"].append(host_and_wall(disp, iters))
                disp()
                out[k]["combine"].append(host_and_wall(comb, iters))
    return out


def count_kernels(backend, T, H, K, E, dev, g):
    """The GPU operations of one dispatch: {"eager": names, "graph": names, "exact": names}
    (one eager budget-mode call, one replay of the captured budget dispatch, one eager
    exact-mode call: its host sync is the "Memcpy DtoH")."""
    from moe_dispatch.bench.launch import device_ops
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=budget_for(T, K))
    exact = MoETokenDispatcher(E, backend=backend)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    idx, p = routing(T, E, K, dev, g)

    def disp(d=d):
        d.dispatch(x, topk_idx=idx, topk_probs=p)
    with torch.no_grad():
        disp()  # the first call agrees the shapes (one host sync) and compiles
        disp(exact)
        return {"eager": device_ops(disp), "graph": device_ops(graphed(disp)),
                "exact": device_ops(lambda: disp(exact))}


def time_layer(backend, T, H, K, E, dev, g, iters, repeats):
    B = budget_for(T, K)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    ways = {}
    g_TH = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    for mode in ("eager", "graph"):
        d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=B)
        torch.manual_seed(0)
        layer = MoELayer(H, 512, E, K, dispatcher=d).to(dev, torch.bfloat16)
        if mode == "graph":
            capture_layers([layer], [x.detach().clone().requires_grad_(True)])

        def step(layer=layer):
            # Forward + backward of the layer alone (the output's gradient given), so the
            # host time is the layer's, not a loss's.
            m = layer(x)
            m.output.backward(g_TH)
        step()
        ways[mode] = (layer, step)
    out = {k: [] for k in ways}
    for _ in range(repeats):
        for k, (_, step) in ways.items():
            out[k].append(host_and_wall(step, iters))
    graphed = ways["graph"][0]._graphed
    if graphed is None or graphed.live.calls != 1 + repeats * iters:
        # A silently eager "graph" row would pass for a graph's time.
        raise RuntimeError("the captured layer did not replay its graphs on every call")
    return out


def med(pairs, i):
    return statistics.median(p[i] for p in pairs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="alltoall,allgather,nvshmem")
    ap.add_argument("--presets", default="small,mid")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-layer timing")
    ap.add_argument("--count-kernels", action="store_true",
                    help="only count (and name) the GPU operations of one budget dispatch")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    g = torch.Generator(dev).manual_seed(0)
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "args": vars(a), "rows": []}
    for preset in a.presets.split(","):
        T, H, K, E = PRESETS[preset]
        for be in a.backends.split(","):
            row = {"preset": preset, "backend": be}
            try:
                row["kernels"] = count_kernels(be, T, H, K, E, dev, g)
                if a.count_kernels:
                    report["rows"].append(row)
                    print(kernel_summary(row), flush=True)
                    continue
                row["check"] = check(be, T, H, K, E, dev, g)
                row["dispatch"] = time_dispatch(be, T, H, K, E, dev, g, a.iters, a.repeats)
                row["layer"] = {} if a.no_layer else time_layer(be, T, min(H, 2048), K, E, dev, g, a.iters // 2,
                                          a.repeats)
            except Exception as exc:  # report and go on with the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            report["rows"].append(row)
            print(summary(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


def kernel_summary(row) -> str:
    lines = [f"{row['preset']:>5} {row['backend']:<9} GPU operations per dispatch: "
             + ", ".join(f"{way} {len(ops)}" for way, ops in row["kernels"].items())]
    for way, ops in row["kernels"].items():
        lines.append(f"  {way}: " + ", ".join(ops))
    return "\n".join(lines)


def summary(row) -> str:
    head = f"{row['preset']:>5} {row['backend']:<9}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    c = row["check"]
    parts = [f"check rows={c['rows']} B={c['budget']} status={c['status']} "
             f"tpe_eq={c['tpe_equal']} d_rows={c['rows_maxdiff']:.3g} tail={c['tail_nonzero']} "
             f"d_y={c['y_maxdiff']:.3g} d_gx={c['gx_maxdiff']:.3g} d_gp={c['gp_maxdiff']:.3g}"]
    for way, t in row["dispatch"].items():
        parts.append(f"  {way:<13} dispatch host/wall {med(t['dispatch'], 0):7.1f}/"
                     f"{med(t['dispatch'], 1):7.1f} us  combine {med(t['combine'], 0):7.1f}/"
                     f"{med(t['combine'], 1):7.1f} us")
    for way, t in row["layer"].items():
        parts.append(f"  layer {way:<7} fwd+bwd host/wall {med(t, 0):8.1f}/{med(t, 1):8.1f} us")
    parts.append("  GPU operations per dispatch: " + ", ".join(
        f"{way} {len(ops)}" for way, ops in row["kernels"].items()))
    return head + " " + "\n".join(parts)


if __name__ == "__main__":
    main()
