"""Host µs of one dispatch and one combine with the GPU path's Python and torch calls but no
kernel, on any machine (no GPU needed): what our own code costs the host between launches.

    python3 benchmarks/scripts/host_python_cpu.py [--backends alltoall,allgather]
        [--modes exact,budget] [--iters 60] [--hidden 256] [--trees OLD,NEW] [--sections]
        [--json OUT]

The CUDA code path is forced onto CPU tensors (``kernels.use_triton`` patched, as
``budget_launches_cpu.py`` does). One warm-up call per case runs every Triton kernel under
the interpreter and records what each launch wrote (its tensor arguments afterwards); the
timed calls then *replay* each launch: they copy the recorded results into the launch's
tensors, so every host int read after the sync, every shape and every Python branch is what
a GPU run sees. The launch cache's specialization key runs too (``_launch.launch`` with its
fast path forced on): each launch then takes its slow branch, whose call is the replay. The
time inside each replay is measured and subtracted, so a figure is the host time of the
dispatcher, the backend, the kernel wrappers, the key, torch's allocations and small ops on
CPU tensors: everything but the kernels' launcher calls (``launch_floor.py`` measures those
on a GPU host). 128 tokens, top-8 of 256 experts, one process (EP1), no autograd.

``--trees``: source trees (folders holding ``moe_dispatch`` and ``token_dispatcher``) to
compare in one process, their calls interleaved call by call, so a shared CPU's noise falls
on both alike (default: the installed package alone). Medians over ``--iters`` calls with
the 10th / 90th percentiles. ``--sections``: the steps of ``alltoall``'s exact dispatch timed
apart as well (``time_sections``).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import platform
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

_INTERPRET = interp.InterpretedFunction.__getitem__
_DEVICE = torch.cuda.current_device
T, K, E = 128, 8, 256


class Replay:
    """Records each interpreted launch's tensor arguments after it ran, per case, then
    replays them in order (a copy into the same arguments), timing itself so the caller can
    subtract it."""

    def __init__(self):
        self.logs, self.case, self.next, self.inside_s = {}, None, 0, 0.0
        self.replaying = set()

        def getitem(kernel, grid):
            def run(*args, **kwargs):
                t0 = time.perf_counter()
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                if self.case not in self.replaying:
                    _INTERPRET(kernel, grid)(*args, **kwargs)
                    self.logs[self.case].append([t.clone() for t in tensors])
                else:
                    for t, saved in zip(tensors, self.logs[self.case][self.next]):
                        t.copy_(saved)
                    self.next += 1
                self.inside_s += time.perf_counter() - t0
            return run
        interp.InterpretedFunction.__getitem__ = getitem
        # The launch cache reads which parameters are constexpr from a JITFunction's params.
        interp.InterpretedFunction.params = property(lambda k: [
            SimpleNamespace(num=i, is_constexpr="constexpr" in str(p.annotation))
            for i, p in enumerate(inspect.signature(k.fn).parameters.values())])

    def record(self, case, fn):
        self.case, self.logs[case] = case, []
        fn()

    def timed(self, case, fn, first=True):
        """(result of fn(), host µs of fn outside the replays), replaying ``case`` from its
        first launch (``first``) or from where the last call stopped."""
        self.case, self.inside_s = case, 0.0
        self.next = 0 if first else self.next
        self.replaying.add(case)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0 - self.inside_s) * 1e6


def _ours():
    return {m: mod for m, mod in sys.modules.items()
            if m.split(".")[0] in ("moe_dispatch", "token_dispatcher")}


def use_tree(modules):
    """Make ``modules`` (a tree's, from ``load_tree``) the ones ``sys.modules`` holds, so the
    imports made inside functions at call time find that tree's modules."""
    sys.modules.update(modules)


def load_tree(path):
    """(dispatcher class, package folder, its modules) of the package tree at ``path`` (None:
    the installed one), imported afresh beside any tree loaded before, with the CUDA path
    forced on CPU tensors and the launch cache's fast path on. Every module of the tree that
    imports here is imported now (the registry imports backends lazily: later, ``sys.path``
    no longer leads to this tree)."""
    for name in _ours():
        del sys.modules[name]
    if path:
        sys.path.insert(0, path)
    try:
        kernels = importlib.import_module("moe_dispatch.kernels")
        launch = importlib.import_module("moe_dispatch.kernels._launch")
        cls = importlib.import_module("token_dispatcher").MoETokenDispatcher
        for top in ("moe_dispatch", "token_dispatcher"):
            pkg = importlib.import_module(top)
            for info in pkgutil.walk_packages(pkg.__path__, top + "."):
                try:
                    with warnings.catch_warnings():  # optional libraries' import notes
                        warnings.simplefilter("ignore")
                        importlib.import_module(info.name)
                except Exception:  # an optional backend's library is missing here
                    pass
    finally:
        if path:
            sys.path.remove(path)
    kernels.use_triton = lambda t: isinstance(t, torch.Tensor)
    launch._enabled = lambda: True  # the key runs; every launch misses and replays
    modules = _ours()
    bad = [m for m, mod in modules.items() if path and not os.path.realpath(
        getattr(mod, "__file__", None) or path).startswith(os.path.realpath(path))]
    if bad:
        raise RuntimeError(f"modules of {path} loaded from elsewhere: {bad[:5]}")
    return cls, os.path.dirname(kernels.__file__), modules


def _inputs(hidden):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, hidden, generator=g).to(torch.bfloat16)
    probs, idx = torch.topk(torch.rand(T, E, generator=g), K, 1)
    return x, idx, probs.softmax(-1)


def _stats(vals):
    vals = sorted(vals)
    n = len(vals)
    return {"median": statistics.median(vals), "p10": vals[n // 10], "p90": vals[(9 * n) // 10]}


def measure(trees, backend, mode, hidden, iters, rep) -> dict:
    """Host µs of dispatch and combine per tree for one backend and mode (module doc)."""
    budget = None if mode == "exact" else -(-int(1.25 * T * K) // 256) * 256
    x, idx, probs = _inputs(hidden)
    disp = {}
    for tree, (cls, _, modules) in trees.items():
        use_tree(modules)
        disp[tree] = cls(E, backend=backend, max_rows_per_rank=budget)
    res = {tree: {"dispatch": [], "combine": []} for tree in trees}

    def call(d):
        out = d.dispatch(x, topk_idx=idx, topk_probs=probs)
        return out, lambda: d.combine(out.tokens, out.handle)
    with torch.no_grad():
        for tree, d in disp.items():
            use_tree(trees[tree][2])
            for _ in range(2):  # the first call agrees the shapes (budget mode)
                rep.record((tree, backend, mode), lambda: call(d)[1]())
        for _ in range(iters):
            for tree, d in disp.items():
                use_tree(trees[tree][2])
                case = (tree, backend, mode)
                (_, combine), us = rep.timed(case, lambda: call(d))
                res[tree]["dispatch"].append(us)
                _, us = rep.timed(case, combine, first=False)
                res[tree]["combine"].append(us)
                if rep.next != len(rep.logs[case]):
                    raise RuntimeError(f"{case}: {rep.next} launches replayed, "
                                       f"{len(rep.logs[case])} recorded")
    return {tree: {"launches": len(rep.logs[(tree, backend, mode)]),
                   **{k: _stats(v) for k, v in r.items()}}
            for tree, r in res.items()}


# --sections: the steps of alltoall's exact dispatch, timed apart (names in its module).
_A2A_STEPS = ("route_message", "read_tables", "expert_counts", "pack_rows", "exact_receive_plan")
_A2A_METHODS = ("_exchange_routing", "_send_rows", "_receive_rows")


def time_sections(modules, rep: Replay, acc: dict) -> None:
    """Wrap the steps of one tree's ``alltoall`` exact dispatch with timers that leave the
    replays out; each replayed call appends its µs to ``acc[step]``. The timers cost host
    time too: read the steps against each other, not against a run without them."""
    mod = modules["moe_dispatch.backends.alltoall"]

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            i0, t0 = rep.inside_s, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if rep.case in rep.replaying:
                    acc.setdefault(label, []).append(
                        (time.perf_counter() - t0 - (rep.inside_s - i0)) * 1e6)
        setattr(owner, name, timed)
    for name in _A2A_STEPS:
        if hasattr(mod, name):
            wrap(mod, name, name)
    for name in _A2A_METHODS:
        wrap(mod.AllToAllBackend, name, "AllToAllBackend." + name)
    wrap(mod.AllToAllBackend, "dispatch", "AllToAllBackend.dispatch (all)")


def write_json(path: str, **fields) -> None:
    """``fields`` with the machine's facts (CPU, cores, Python, torch, the command) as JSON."""
    with open(path, "w") as f:
        json.dump({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "torch": torch.__version__,
                   "argv": sys.argv, **fields}, f, indent=1)


def _print_case(backend, mode, runs: dict) -> None:
    for tree, v in runs.items():
        print(f"{backend:10s} {mode:6s} launches {v['launches']:2d}  " + "  ".join(
            f"{k} {v[k]['median']:6.1f} us (p10 {v[k]['p10']:.1f}, p90 {v[k]['p90']:.1f})"
            for k in ("dispatch", "combine")) + f"  {tree}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="alltoall,allgather")
    ap.add_argument("--modes", default="exact,budget")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--trees", default="", help="comma-separated source trees to compare")
    ap.add_argument("--sections", action="store_true",
                    help="also time the steps of alltoall's exact dispatch (time_sections)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rep = Replay()
    torch.cuda.current_device = lambda: 0  # the launch cache asks; nothing else uses it
    trees = {t or "installed": load_tree(t or None) for t in a.trees.split(",")}
    sections = {t: {} for t in trees}
    if a.sections:
        for t, (_, _, modules) in trees.items():
            time_sections(modules, rep, sections[t])
    results = {}
    for backend in a.backends.split(","):
        for mode in a.modes.split(","):
            results[f"{backend}-{mode}"] = measure(trees, backend, mode, a.hidden, a.iters, rep)
            _print_case(backend, mode, results[f"{backend}-{mode}"])
    torch.cuda.current_device = _DEVICE
    steps = {t: {k: _stats(v) for k, v in acc.items()} for t, acc in sections.items() if acc}
    for t, acc in steps.items():
        for k, v in acc.items():
            print(f"  step {k:36s} {v['median']:7.1f} us (p10 {v['p10']:.1f}, p90 "
                  f"{v['p90']:.1f})  {t}")
    if a.json:
        write_json(a.json, packages={t: v[1] for t, v in trees.items()}, results=results,
                   alltoall_exact_steps=steps)


if __name__ == "__main__":
    main()
