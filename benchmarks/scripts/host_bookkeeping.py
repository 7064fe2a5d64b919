"""Host µs of the small Python chores on the exact dispatch path, old way and new way, on
any machine (no GPU needed): the host cost is the CPU's.

    python3 benchmarks/scripts/host_bookkeeping.py [--L 256] [--iters 20000] [--json OUT]

  * an environment switch: ``os.environ.get`` against ``kernels._env.get``;
  * the per-expert counts after the sync at L local experts, one source row: the Python
    column sums + int conversion + ``torch.tensor(list)`` the exact mode used, against
    ``exact.expert_counts`` on the host copy (torch on the CPU);
  * ``t.device.type`` against ``t.is_cuda`` (``kernels.use_triton``);
  * an autograd Function's ``apply`` under ``torch.no_grad`` (a trivial one) against the
    direct call the kernel wrappers now make when nothing needs a gradient.
Medians of 5 rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import timeit

import torch

from moe_dispatch.backends.exact import HEAD, expert_counts
from moe_dispatch.kernels import _env


def us(fn, iters):
    return statistics.median(timeit.repeat(fn, number=iters, repeat=5)) / iters * 1e6


class _Trivial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, g):
        return None, g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    table = torch.randint(0, 50, (1, HEAD + a.L))
    got = table.tolist()

    def old_counts():
        tpe = [sum(c) for c in zip(*(row[HEAD:] for row in got))]
        counts = [int(c) for c in tpe]
        return counts, torch.tensor(tpe, dtype=torch.long)

    t, u = torch.zeros(4), torch.zeros(4)

    def no_grad_apply():
        with torch.no_grad():
            return _Trivial.apply(t, u)

    def no_grad_direct():
        with torch.no_grad():
            return u
    cases = {
        "os.environ.get": lambda: os.environ.get("MOE_DISPATCH_TRITON", "1"),
        "_env.get": lambda: _env.get("MOE_DISPATCH_TRITON", "1"),
        f"counts L={a.L}: python loops + torch.tensor": old_counts,
        f"counts L={a.L}: expert_counts": lambda: expert_counts(table, HEAD, a.L, None),
        "t.device.type": lambda: t.device.type,
        "t.is_cuda": lambda: t.is_cuda,
        "no_grad: Function.apply": no_grad_apply,
        "no_grad: direct call": no_grad_direct,
    }
    assert old_counts()[0] == expert_counts(table, HEAD, a.L, None)[0]
    res = {name: us(fn, a.iters) for name, fn in cases.items()}
    for name, v in res.items():
        print(f"{name:45s} {v:7.2f} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "args": vars(a), "host_us": res}, f, indent=1)


if __name__ == "__main__":
    main()
