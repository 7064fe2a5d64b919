"""Host µs of one cached launch through ``kernels._launch.launch`` with a stand-in compiled
kernel (no GPU needed): the launch cache's own cost, its key and binding, per source tree.

    python3 benchmarks/scripts/launch_key_cpu.py [--trees OLD,NEW] [--iters 20000]
        [--rounds 5] [--json OUT]

The kernel is the permute's ``_scatter_rows_kernel`` (18 parameters, 13 of them tensors or
ints) called as ``kernels._triton.scatter_rows`` calls it; its "compiled" form is a stand-in
whose launcher does nothing, so a figure is the cache's Python (key, lookup, argument list,
grid) plus the stand-in's empty ``[grid]`` call. Trees are loaded side by side as
``host_python_cpu.py`` does and timed in alternating rounds; medians of ``--rounds``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_python_cpu as hp  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import torch  # noqa: E402


class _Compiled:
    """A compiled kernel whose ``[grid]`` launcher does nothing."""

    def __getitem__(self, grid):
        return lambda *args: None


class _Kernel:
    """The jit function's signature and a ``[grid]`` that "compiles" to ``_Compiled``."""

    def __init__(self, real):
        self.fn, self.params = real.fn, real.params

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Compiled()


def _call_args():
    x = torch.zeros(128, 256, dtype=torch.bfloat16)
    pos = torch.zeros(128, 8, dtype=torch.int32)
    out = torch.zeros(1024, 256, dtype=torch.bfloat16)
    probs_M, probs_VK = torch.zeros(1024), torch.zeros(128, 8)
    args = (x, pos, 1, 0, pos, out, probs_VK, pos, probs_M, pos, 256, 1, 8)
    kwargs = dict(K=8, PEER=False, WITH_PROBS=True, BLOCK_H=256, INDIRECT=False, num_warps=1)
    return args, kwargs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="", help="comma-separated source trees to compare")
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    hp.Replay()  # gives the interpreter's kernels the ``params`` the cache reads
    torch.cuda.current_device = lambda: 0
    args, kwargs = _call_args()
    cases = {}
    for tree in a.trees.split(",") if a.trees else [""]:
        _, pkg, modules = hp.load_tree(tree or None)
        launch = modules["moe_dispatch.kernels._launch"]
        launch._knobs = None  # cached entries launch through [grid]: the stand-in's
        kernel = _Kernel(modules["moe_dispatch.kernels._triton"]._scatter_rows_kernel)
        launch.launch(kernel, (128, 1), *args, **kwargs)  # "compiles", caches
        cases[tree or "installed"] = (launch, kernel)
    res = {t: [] for t in cases}
    for _ in range(a.rounds):
        for tree, (launch, kernel) in cases.items():
            s = timeit.timeit(lambda: launch.launch(kernel, (128, 1), *args, **kwargs),
                              number=a.iters)
            res[tree].append(s / a.iters * 1e6)
    out = {t: {"median": statistics.median(v), "min": min(v), "max": max(v)}
           for t, v in res.items()}
    for t, v in out.items():
        print(f"{v['median']:6.2f} us per cached launch (rounds {v['min']:.2f}-{v['max']:.2f})"
              f"  {t}")
    if a.json:
        hp.write_json(a.json, per_launch_us=out)


if __name__ == "__main__":
    main()
