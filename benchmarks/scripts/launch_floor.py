"""How cheap a Triton launch can be on this host: one small kernel (the input check) launched
five ways, host µs per launch (median of rounds of back-to-back launches, tiny inputs).

    python3 benchmarks/scripts/launch_floor.py [--iters 500] [--rounds 5] [--json OUT]

  * ``jit``: ``kernel[grid](*args)`` (Triton's binder, key and cache lookup);
  * ``cached``: ``kernels._launch.launch`` (our specialization key + ``CompiledKernel[grid]``);
  * ``compiled[grid]``: the compiled kernel's runner alone (no key);
  * ``compiled.run``: the compiled kernel's launcher with the stream and grid given;
  * ``compiled.run ints``: the same with every pointer passed as an int address;
  * ``torch empty`` / ``torch add_`` for scale.
The gaps say where a launch's host time goes and how far a leaner launcher could cut it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def per_call_us(fn, iters, rounds):
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) / iters * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out), min(out), max(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from moe_dispatch.kernels import _check
    from moe_dispatch.kernels._launch import launch
    dev = torch.device("cuda", 0)
    idx = torch.randint(0, 32, (64, 8), device=dev)
    probs = torch.rand(64, 8, device=dev)
    idx_out = torch.empty_like(idx)
    flag = torch.empty((), dtype=torch.int64, device=dev)
    kern = _check._check_kernel
    args = (idx, probs, idx_out, flag, flag, idx.numel(), 32, 1)
    kw = dict(HAS_IDX=True, ONE_PROGRAM=True, BLOCK=2048, num_warps=4)
    full = args + (True, True, 2048)
    compiled = kern[(1,)](*args, **kw)
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream().cuda_stream
    ints = tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in full)
    run, fn, meta = compiled.run, compiled.function, compiled.packed_metadata
    a_buf = torch.zeros(1024, device=dev)
    cases = {
        "torch add_": lambda: a_buf.add_(1),
        "torch empty": lambda: torch.empty(64, 256, device=dev),
        "jit": lambda: kern[(1,)](*args, **kw),
        "cached": lambda: launch(kern, (1,), *args, **kw),
        "compiled[grid]": lambda: compiled[(1, 1, 1)](*full),
        "compiled.run": lambda: run(1, 1, 1, stream, fn, meta, None, None, None, *full),
        "compiled.run ints": lambda: run(1, 1, 1, stream, fn, meta, None, None, None, *ints),
    }
    for f in cases.values():
        f()
    res = {}
    for name, f in cases.items():
        med, lo, hi = per_call_us(f, a.iters, a.rounds)
        res[name] = dict(median_us=med, min_us=lo, max_us=hi)
        print(f"{name:20s} {med:7.2f} us  [{lo:.2f}-{hi:.2f}]", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "args": vars(a), "cases": res}, f,
                      indent=1)


if __name__ == "__main__":
    main()
