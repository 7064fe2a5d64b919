"""CPU proxy for the GPU launches of one budget-mode dispatch (no GPU needed).

    python benchmarks/scripts/budget_launches_cpu.py alltoall [--torch] [--exact]

Runs one single-process budget dispatch (128 tokens, top-8 of 256 experts) with the CUDA
code path forced onto CPU tensors (the Triton kernels under TRITON_INTERPRET=1) and counts
what it launches: each Triton kernel launch, plus each top-level torch compute op (an op
none of whose callers is one; views and allocations excluded), i.e. one GPU kernel each on
CUDA. ``--torch`` counts the plain torch path (the CPU path) instead; ``--exact`` the exact
mode (no budget; at EP1 its collectives launch nothing either). On a GPU,
``budget_ep1.py --count-kernels`` counts the real kernels.
"""
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from moe_dispatch import kernels  # noqa: E402
from token_dispatcher import MoETokenDispatcher  # noqa: E402

NO_KERNEL = {  # ops that launch nothing on a GPU
    "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::view", "aten::to",
    "aten::resize_", "aten::detach", "aten::_unsafe_view", "aten::expand", "aten::slice",
    "aten::select", "aten::reshape", "aten::t", "aten::transpose", "aten::unsqueeze",
    "aten::squeeze", "aten::alias", "aten::lift_fresh", "aten::narrow", "aten::split",
    "aten::unbind", "aten::empty_like", "aten::new_empty", "aten::permute", "aten::detach_",
    "aten::result_type", "aten::broadcast_tensors", "aten::_reshape_alias", "aten::flatten",
    "aten::view_as", "aten::chunk", "aten::item", "aten::_local_scalar_dense",
    "aten::is_nonzero", "aten::scalar_tensor", "aten::contiguous",
    "aten::resolve_conj", "aten::resolve_neg"}  # (``tolist``: no-ops on real tensors)


def _name_launches():
    """Wrap every interpreted Triton launch in a profiler range named after its kernel."""
    get = interp.InterpretedFunction.__getitem__

    def getitem(self, grid):
        launch = get(self, grid)

        def run(*args, **kw):
            with record_function("triton::" + self.fn.__name__):
                return launch(*args, **kw)
        return run
    interp.InterpretedFunction.__getitem__ = getitem


def _mark_host_work():
    """The exact mode's work on the host copy of the routing message (CPU tensors on a GPU
    machine too): a ``host::`` range, whose ops are counted apart from the launches."""
    from moe_dispatch.backends import allgather, alltoall, exact
    real = getattr(exact, "expert_counts", None)
    if real is None:  # an older package: its host work is Python, no torch op
        return

    def marked(*args, **kw):
        with record_function("host::expert_counts"):
            return real(*args, **kw)
    alltoall.expert_counts = allgather.expert_counts = marked


def _launches(prof) -> tuple:
    """(launch names, names of the ops on the host copy)."""
    def compute(e):
        return e.name.startswith("triton::") or (e.name.startswith("aten::")
                                                  and e.name not in NO_KERNEL)

    def parents(e):
        p = e.cpu_parent
        while p is not None:
            yield p
            p = p.cpu_parent

    def top(e):
        return not any(compute(p) for p in parents(e))

    ops = [e for e in prof.events() if compute(e) and top(e)]
    host = [e for e in ops if any(p.name.startswith("host::") for p in parents(e))]
    return [e.name for e in ops if e not in host], [e.name for e in host]


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "alltoall"
    fused = "--torch" not in sys.argv
    exact = "--exact" in sys.argv
    if fused:  # the CUDA path, on CPU tensors
        kernels.use_triton = lambda t: isinstance(t, torch.Tensor)
    _name_launches()
    _mark_host_work()
    T, H, K, E = 128, 256, 8, 256
    B = -(-int(1.25 * T * K) // 256) * 256
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=None if exact else B)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    probs, idx = torch.topk(torch.rand(T, E, generator=g), K, 1)
    idx[torch.rand(T, K, generator=g) < 0.05] = -1
    probs = probs.softmax(-1)
    d.dispatch(x, topk_idx=idx, topk_probs=probs)  # the first call agrees the shapes
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        d.dispatch(x, topk_idx=idx, topk_probs=probs)
    names, host = _launches(prof)
    print(f"{backend} {'exact' if exact else 'budget'} dispatch, "
          f"{'CUDA (fused)' if fused else 'torch'} path: "
          f"{len(names)} launches")
    for name, n in collections.Counter(names).most_common():
        print(f"  {n:3d} {name}")
    if host:
        print(f"  and {len(host)} torch op(s) on the host copy of the message: {host}")


if __name__ == "__main__":
    main()
