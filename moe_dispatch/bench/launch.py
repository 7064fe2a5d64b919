"""Host time per launch of the project's GPU kernels, on one GPU.

    python -m moe_dispatch.bench.launch [--iters 300] [--json out.json]

The GPU path of a dispatch is host-bound before its one host sync: the GPU waits for the
host to launch the staging, barrier and layout kernels. This measures what each launch
costs the host (``time.perf_counter`` over back-to-back calls on tiny inputs, so the GPU
never holds the host back), next to a torch op and a CUDA-graph replay for scale:
  * ``torch add_``: one eager torch kernel (C++ launch path),
  * each Triton wrapper the dispatch path calls, through ``kernel[grid](...)``,
  * ``graph replay``: one ``torch.cuda.CUDAGraph.replay`` of a captured group of kernels,
  * ``dispatch+combine``: the whole ``nvshmem`` engine on a group of one (no peers),
    eager and with its CUDA graphs (``--profile``: where its host time goes), and through
    ``MoETokenDispatcher`` (input checks and canonical form included).
Medians of ``--repeats`` rounds of ``--iters`` calls each, in microseconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def device_ops(fn) -> list:
    """Names of the GPU operations (kernels, memsets, copies) one call of ``fn`` runs, in
    start order: torch.profiler with CUDA activity around the call. ``fn`` may be a CUDA
    graph's replay (the profiler reports a graph's kernels one by one), so this also
    counts what a captured step launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    return [e.name for e in sorted(gpu, key=lambda e: e.time_range.start)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=300, help="calls per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the median is reported)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile of the nvshmem dispatch+combine calls")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("moe_dispatch.bench.launch needs a CUDA GPU")
    from moe_dispatch.kernels import _triton
    from moe_dispatch import kernels
    from moe_dispatch.permute import triton_group_plan
    from moe_dispatch.protocol import BackendConfig, PendingCheck

    dev = torch.device("cuda")
    torch.manual_seed(0)
    T, H, K, E, L = 64, 256, 8, 32, 32
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    idx = torch.topk(torch.rand(T, E, device=dev), K, dim=-1).indices
    probs = torch.rand(T, K, device=dev)
    lid = idx.contiguous()
    T_cap = 64
    xs = torch.empty(T_cap, H, device=dev, dtype=torch.bfloat16)
    ids = torch.empty(T_cap, K, device=dev, dtype=torch.int32)
    ps = torch.empty(T_cap, K, device=dev, dtype=torch.float32)
    meta = torch.zeros(16, device=dev, dtype=torch.int64)
    code = torch.zeros((), device=dev, dtype=torch.int64)
    status = torch.zeros(1, device=dev, dtype=torch.int32)
    flags = torch.zeros(64, device=dev, dtype=torch.int32)
    flag_table = torch.tensor([flags.data_ptr()], device=dev, dtype=torch.int64)
    idx_table = torch.tensor([ids.data_ptr()], device=dev, dtype=torch.int64)
    meta_table = torch.tensor([meta.data_ptr()], device=dev, dtype=torch.int64)
    pos = torch.empty(T_cap * K, device=dev, dtype=torch.int64)
    host = torch.empty(16 + L + 2, device=dev, dtype=torch.int64)
    hist = torch.empty(1 << 16, device=dev, dtype=torch.int32)
    valid = torch.empty(T, K, device=dev, dtype=torch.bool)
    pos_TR = torch.empty(T, 1, device=dev, dtype=torch.int64)
    plan = triton_group_plan(lid, L, torch.bincount(lid.flatten(), minlength=L).tolist())
    pos_NK, filled = kernels.plan_maps(plan)
    out = torch.empty(plan.num_out_rows, H, device=dev, dtype=torch.bfloat16)
    red = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    a = torch.zeros(1024, device=dev)

    def stage():
        _triton.stage(x, idx, probs, T, xs, ids, ps, meta, code, T, H * 2)

    def layout():
        _triton.layout_plan(idx_table, meta_table, status, T_cap * K, 0, L, 1, 1 << 62, pos,
                            host, scratch=lambda n: hist[:n])

    cases = {
        "torch add_": lambda: a.add_(1),
        "torch empty": lambda: torch.empty(T, H, device=dev),
        "check_values": lambda: kernels.check_values(idx, probs, E),
        "stage": stage,
        "barrier (R=1)": lambda: _triton.barrier(flag_table, 0, 0, status),
        "layout_plan (2 launches)": layout,
        "token_maps": lambda: _triton.token_maps(idx, T, E, L, T_cap, 1, valid, pos_TR),
        "permute scatter_rows": lambda: _triton.scatter_rows(x, pos_NK, out),
        "unpermute gather_reduce": lambda: _triton.gather_reduce(out, pos_NK, red),
        "group_plan (counts given)": lambda: triton_group_plan(lid, L, plan.tokens_per_expert),
    }
    for fn in cases.values():  # compile
        fn()
    torch.cuda.synchronize()

    # A graph of the pre-sync kernels (stage, barrier, layout) for comparison.
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            stage()
            _triton.barrier(flag_table, 0, 0, status)
            layout()
    torch.cuda.current_stream().wait_stream(s)
    cases["graph replay (stage+barrier+layout)"] = g.replay

    # The whole engine on a group of one.
    from moe_dispatch.backends.nvshmem import NVSHMEMBackend
    ok = PendingCheck(None, None)

    def engine_case(host_graph):
        be = NVSHMEMBackend(BackendConfig(num_experts=E, group=None, pad_multiple=None,
                                          options={"host_graph": host_graph}))

        def dc():
            r = be.dispatch(x, idx, probs, ok)
            be.combine(r.tokens_NH, r.handle)
        for _ in range(3):  # compile; the second call captures the pre-sync graph
            dc()
        return dc
    cases["nvshmem dispatch+combine (R=1, eager)"] = engine_case(False)
    cases["nvshmem dispatch+combine (R=1, host graph)"] = dc = engine_case(True)

    # The same through the user-facing module: input checks, canonical form, handle.
    from token_dispatcher import MoETokenDispatcher
    disp = MoETokenDispatcher(E, backend="nvshmem")

    def mc():
        out = disp.dispatch(x, topk_idx=idx, topk_probs=probs)
        disp.combine(out.tokens, out.handle)
    for _ in range(3):
        mc()
    cases["MoETokenDispatcher nvshmem dispatch+combine (R=1)"] = mc

    res = {}
    for name, fn in cases.items():
        rounds = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            rounds.append((time.perf_counter() - t0) / args.iters * 1e6)
            torch.cuda.synchronize()
        res[name] = statistics.median(rounds)
        print(f"{name:40s} {res[name]:8.1f} us host per call")
    if args.profile:
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            dc()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print(f"cProfile of {args.iters} nvshmem dispatch+combine calls (host graph), "
              f"by own time:")
        print(buf.getvalue())
    out_json = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": __import__("triton").__version__, "host_us_per_call": res}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_json, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
