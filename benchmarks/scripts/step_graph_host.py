"""Host and device time of one training step's forward + backward on one GPU, three ways:
eager (budget mode), each MoE layer captured (``train.cuda_graph_scope: layers``) and the
whole step captured as one graph (``step``), on a ``moe-train`` recipe's model and batch.

    python3 benchmarks/scripts/step_graph_host.py [--recipe recipes/gpu_small.yaml]
        [--batch 8] [--iters 20] [--kernels N] [--json OUT.json]

Host µs: the device synced before each call and the clock read around the call alone (the
host's own work, not waiting on the GPU); device µs: CUDA events around the call. Medians
over ``--iters``; per layer = the step's figure over the model's MoE layers. The optimizer is
left out (it is eager in every mode). ``--kernels N``: the N GPU kernels with the most device
time in one call of each mode (torch.profiler; a graph replay's kernels are listed one by one),
to see what the GPU-bound step spends its time on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from token_dispatcher.train import RunOptions, load_recipe, loop
from token_dispatcher.train.step_graph import capture_step


def timed(fn, iters):
    """(median host µs, median device µs) of ``fn()``, the device idle before each call."""
    host, dev = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e6)
        end.synchronize()
        dev.append(start.elapsed_time(end) * 1e3)
    return statistics.median(host), statistics.median(dev)


def top_kernels(fn, n):
    """The ``n`` kernel names with the most summed device µs in one call of ``fn``, with their
    launch counts, and the call's total kernel µs: [(name, µs, count)], total."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            us, c = per.get(e.name, (0.0, 0))
            per[e.name] = (us + e.time_range.elapsed_us(), c + 1)
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    return [(k[:90], round(us, 1), c) for k, (us, c) in ranked[:n]], sum(us for us, _ in per.values())


def build(recipe_path, batch, budget):
    r = load_recipe(recipe_path, {"max_rows_per_rank": budget, "train.precision": "bf16",
                                  "train.cuda_graph": True, "train.batch_size": batch,
                                  "device": "cuda"})
    run = loop._build(r, RunOptions(out=tempfile.mkdtemp(), quiet=True),
                      loop._make_layout(0, 1, 1), torch.device("cuda", 0))
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    tok = run.data.local_batch_at(0, 0, 1).cuda()
    return run, amp, tok[:, :-1], tok[:, 1:]


def measure(recipe_path, batch, budget, iters, kernels=0):
    rows = {}
    for mode in ("eager", "layers", "step"):
        torch.manual_seed(0)
        run, amp, inp, tgt = build(recipe_path, batch, budget)
        forward = loop._model_forward(run, amp)
        if mode == "step":
            sg = capture_step(run.model, forward, inp, tgt)

            def call():
                sg(inp, tgt)
        else:
            if mode == "layers":
                with amp:
                    run.model.capture_moe_graphs(inp)

            def call():
                run.optim.zero_grad(set_to_none=False)
                forward(inp, tgt)[2].backward()
        for _ in range(3):
            call()
        host, dev = timed(call, iters)
        n = len(run.model.moe_layers())
        rows[mode] = dict(host_us=host, device_us=dev, host_us_per_layer=host / n, layers=n)
        print(mode, " ".join(f"{k}={v:.1f}" for k, v in rows[mode].items()), flush=True)
        if kernels:
            top, total = top_kernels(call, kernels)
            rows[mode].update(kernel_us=total, top_kernels=top)
            print(f"  kernel us {total:.0f}; top {kernels}:", flush=True)
            for name, us, c in top:
                print(f"    {us:9.1f} us {c:5d}x  {name}", flush=True)
        del run
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/gpu_small.yaml")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--budget", type=int, default=81920, help="max_rows_per_rank")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--kernels", type=int, default=0, help="list the top N GPU kernels")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = measure(a.recipe, a.batch, a.budget, a.iters, a.kernels)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "args": vars(a),
                       "median": rows}, f, indent=1)


if __name__ == "__main__":
    main()
