"""Host cost of the dispatch input check: ``python -m moe_dispatch.bench.check_cost``.

Times, per call and without a sync inside the timed loop (so it is host time, the GPU
running behind), the value check of ``routing.canonicalize`` as it was (~10 torch ops,
then ``probs * (idx >= 0)`` and the V1 backend's masked_fill / flag conversion) and as it
is now (one Triton launch, then one ``n_expert.add_`` in the V1 backend), at DeepEP's
benchmark shape (4096 tokens, top-8 of 256 experts). Also prints the GPU time of both.
"""
from __future__ import annotations

import argparse
import time

import torch

from moe_dispatch import routing


def _host_us(fn, n: int) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _gpu_us(fn, n: int) -> float:
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(20):
        fn()
    st.record()
    for _ in range(n):
        fn()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / n * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    E, T, K = a.experts, a.tokens, a.topk
    x = torch.randn(T, a.hidden, device=dev, dtype=torch.bfloat16)
    idx = torch.randint(0, E, (T, K), device=dev)
    p = torch.rand(T, K, device=dev)
    n_expert = torch.zeros(E, dtype=torch.int32, device=dev)

    def before():  # canonicalize's check + mask, then V1's masked_fill and flag add
        i, q = idx.long(), p.float()
        bad = (i.clamp(-1, E - 1) != i).any() | (q.nan_to_num(nan=-1.0, posinf=-1.0) < 0).any()
        q = q * (i >= 0)
        flag = bad.reshape(()).bool()
        i = i.masked_fill(flag, -1)
        n_expert.add_(flag.reshape(()).to(n_expert.dtype), alpha=1000)

    def after():
        _, i, q, check = routing.canonicalize(x, E, topk_idx=idx, topk_probs=p)
        n_expert.add_(check.device_bad, alpha=1000)

    def one_op():
        idx.clamp(-1, E - 1)

    for name, fn in [("before: check + mask + V1 flag ops", before),
                     ("after: canonicalize + V1 flag add", after),
                     ("reference: one small torch op", one_op)]:
        print(f"{name:40s} host {_host_us(fn, a.iters):7.1f} us/call   "
              f"GPU {_gpu_us(fn, 200):7.1f} us/call")


if __name__ == "__main__":
    main()
