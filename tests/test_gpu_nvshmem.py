"""The ``nvshmem`` backend on GPUs: one process per GPU, NCCL + torch symmetric memory.

    torchrun --nproc-per-node 4 tests/test_gpu_nvshmem.py           # every check
    torchrun --nproc-per-node 4 tests/test_gpu_nvshmem.py --bench   # DeepEP-shape timing
    torchrun --nproc-per-node 4 -m pytest -q tests/test_gpu_nvshmem.py

Checks: parity with ``alltoall`` and with the single-process dense reference (forward
and backward: tokens, tokens_per_expert, probs, combine output, grads of hidden and
probs), with skew, a zero-token rank, -1 slots, padding, bf16; the plain-torch version;
the static-budget (sync-free) mode including overflow; a CUDA-graph capture of
dispatch -> experts -> combine replayed with new inputs. Each check runs on every rank,
compares after all communication is done, and the ranks agree on the verdict, so one
failure is reported without hanging the others. Fresh random data every run.
Skipped (under pytest) without CUDA or outside torchrun.

MOE_NVSHMEM_TEST_CPU=1 runs the same checks on CPU processes (gloo) to debug this harness
without GPUs: "symmetric memory" is then a set of shared files every rank maps, and the
Triton kernels run under TRITON_INTERPRET=1 (the CUDA-only checks are skipped).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu

CPU_MODE = os.environ.get("MOE_NVSHMEM_TEST_CPU") in ("1", "2")
if __name__ != "__main__" and (CPU_MODE or not torch.cuda.is_available()
                               or int(os.environ.get("WORLD_SIZE", "1")) < 2):
    pytest.skip("needs CUDA GPUs under torchrun (WORLD_SIZE >= 2)", allow_module_level=True)
if CPU_MODE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = torch.device("cpu" if CPU_MODE else "cuda")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_dispatch.protocol import BackendConfig, PendingCheck  # noqa: E402
from moe_dispatch.registry import get_backend_class  # noqa: E402
from moe_dispatch.testing import (local_experts, make_case, reference_dispatch,  # noqa: E402
                                  reference_moe, rel_err)


def _init():
    if not dist.is_initialized():
        if CPU_MODE:
            dist.init_process_group("gloo")
        else:
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return dist.get_rank(), dist.get_world_size()


def _sync():
    if not CPU_MODE:
        torch.cuda.synchronize()


def _log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def _shared_seed() -> int:
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=DEV)
    dist.broadcast(seed, 0)
    return int(seed.item())


def _agree(ok: bool) -> bool:
    flag = torch.tensor([0 if ok else 1], device=DEV)
    dist.all_reduce(flag)
    return flag.item() == 0


def _backend(name, E, pad=None, options=None, group=None, budget=None):
    """``budget``: max_rows_per_rank (the static-budget mode), as the dispatcher passes it."""
    group = group or dist.group.WORLD
    if CPU_MODE and name == "nvshmem":
        opts = dict(options or {})
        if budget is not None:
            opts["max_rows_per_rank"] = budget  # the engine's own key (see NVSHMEMBackend)
        return _CpuNVSHMEM(group, E, pad, opts)
    return get_backend_class(name)(BackendConfig(group, E, pad, options,
                                                 max_rows_per_rank=budget))


class _ShmTransport:
    """CPU stand-in for symmetric memory: each allocation is one shared file per rank,
    mapped by every rank, so peer addresses are real addresses in this process."""

    _n = 0

    def __new__(cls, group):
        from moe_dispatch.backends.nvshmem import symm_memory

        class T(symm_memory.Transport):
            def __init__(self):
                super().__init__()
                self.group = group
                self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
                self.device = DEV
                self.status = torch.zeros(1, dtype=torch.int32)
                self.tag = f"{os.environ.get('MASTER_PORT', '0')}_{os.getppid()}"

            def alloc(self, nbytes):
                _ShmTransport._n += 1
                name = lambda r: f"/dev/shm/moe_nvshmem_test_{self.tag}_{_ShmTransport._n}_{r}"  # noqa: E731
                mine = torch.from_file(name(self.rank), shared=True, size=nbytes, dtype=torch.uint8)
                mine.fill_(255)  # NaN poison
                dist.barrier(group=self.group)
                maps = [mine if r == self.rank else
                        torch.from_file(name(r), shared=True, size=nbytes, dtype=torch.uint8)
                        for r in range(self.world)]
                dist.barrier(group=self.group)
                os.unlink(name(self.rank))
                return symm_memory.Window(mine, [m.data_ptr() for m in maps], lambda s: maps[s])

            def barrier(self, channel):
                dist.barrier(group=self.group)

            def host_max(self, vals):
                t = torch.tensor(vals, dtype=torch.int64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
                return t.tolist()

        return T()


class _FakeSymmMem:
    """MOE_NVSHMEM_TEST_CPU=2: a stand-in for torch.distributed._symmetric_memory (shared
    files again), so that the real ``symm_memory.SymmTransport`` and the Triton barrier kernel run
    across processes (interpreted)."""

    def __init__(self):
        self.files = {}
        self.n = 0

    def _name(self, n, r):
        return f"/dev/shm/moe_nvshmem_fake_{os.environ.get('MASTER_PORT', '0')}_{os.getppid()}_{n}_{r}"

    def empty(self, nbytes, dtype, device):
        self.n += 1
        t = torch.from_file(self._name(self.n, dist.get_rank()), shared=True, size=nbytes,
                            dtype=torch.uint8)
        self.files[t.data_ptr()] = (self.n, nbytes)
        return t

    def rendezvous(self, buf, group_name):
        n, nbytes = self.files[buf.data_ptr()]
        dist.barrier()
        maps = [buf if r == dist.get_rank() else
                torch.from_file(self._name(n, r), shared=True, size=nbytes, dtype=torch.uint8)
                for r in range(dist.get_world_size())]
        dist.barrier()
        os.unlink(self._name(n, dist.get_rank()))

        class Handle:
            buffer_ptrs = [m.data_ptr() for m in maps]

            @staticmethod
            def get_buffer(rank, sizes, dtype, storage_offset=0):
                return maps[rank][storage_offset:].view(dtype)[:sizes[0]]

            @staticmethod
            def barrier(channel=0, timeout_ms=0):
                dist.barrier()

        return Handle()


_cpu_transports = {}


class _CpuNVSHMEM:
    def __init__(self, group, E, pad, options):
        from moe_dispatch.backends.nvshmem import symm_memory
        from moe_dispatch.backends.nvshmem import engine as nvshmem
        tr = _cpu_transports.get(group.group_name)
        if tr is None:
            if os.environ.get("MOE_NVSHMEM_TEST_CPU") == "2":
                sys.modules["torch.distributed._symmetric_memory"] = _FakeSymmMem()
                tr = symm_memory.SymmTransport(group, DEV, (options or {}).get("barrier", "auto"))
            else:
                tr = _ShmTransport(group)
            _cpu_transports[group.group_name] = tr
        self.engine = nvshmem._Engine(tr, E, pad, options)

    def dispatch(self, *a):
        return self.engine.dispatch(*a)

    def combine(self, *a):
        return self.engine.combine(*a)


def _experts(W, offset, tokens, tpe, probs):
    return local_experts(W, offset)(tokens, tpe, probs)


def _graph_experts(scale_L, tokens, tpe, probs):
    """Sync-free experts for CUDA graphs: row scaled by its expert's factor and its prob."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    e_row = torch.searchsorted(torch.cumsum(tpe, 0), rows, right=True)
    scale = torch.cat([scale_L, scale_L.new_zeros(1)]).index_select(0, e_row)
    return tokens * (scale * probs).to(tokens.dtype).unsqueeze(1)


def _run(be, case, rank, dtype, W, backward=True):
    dev = DEV
    x = case.xs[rank].to(dev, dtype).clone().requires_grad_(True)
    idx = case.idxs[rank].to(dev)
    p = case.probs[rank].to(dev).clone().requires_grad_(True)
    res = be.dispatch(x, idx, p, PendingCheck(None, None))
    L = case.num_experts // dist.get_world_size()
    y = be.combine(_experts(W, rank * L, res.tokens_NH, res.tokens_per_expert_L, res.probs_N),
                   res.handle)
    if backward:
        (y.float() * case.gouts[rank].to(dev).float()).sum().backward()
    st = getattr(res.handle, "status", None)
    return dict(tokens=res.tokens_NH.detach().cpu(), tpe=res.tokens_per_expert_L.cpu(),
                tpe_device=res.tokens_per_expert_L.device.type,
                probs=res.probs_N.detach().cpu(), y=y.detach().float().cpu(),
                gx=None if x.grad is None else x.grad.float().cpu(),
                gp=None if p.grad is None else p.grad.cpu(),
                status=None if st is None else int(st.item()))


def _compare_ref(res, case, rank, pad, tol, budget=None):
    errs = []
    tok_ref, tpe_ref, p_ref = reference_dispatch(case, rank, pad)
    n = tok_ref.shape[0]
    if not torch.equal(res["tpe"], tpe_ref):
        errs.append(f"tokens_per_expert {res['tpe'].tolist()} != {tpe_ref.tolist()}")
    rows = res["tokens"].shape[0]
    if budget is None and rows != n:
        errs.append(f"{rows} rows, expected {n}")
    elif budget is not None:
        if rows != budget:
            errs.append(f"{rows} rows, expected the budget {budget}")
        if not ((res["tokens"][n:] == 0).all() and (res["probs"][n:] == 0).all()):
            errs.append("rows past the real ones are not zero")
        if res["status"] != 0:
            errs.append(f"status {res['status']}")
    if not errs:
        if not torch.equal(res["tokens"][:n], tok_ref.to(res["tokens"].dtype)):
            errs.append(f"tokens differ (max {float((res['tokens'][:n].float() - tok_ref.float()).abs().max()):.3g})")
        if not torch.equal(res["probs"][:n], p_ref):
            errs.append("probs differ")
    ys, gxs, gps = reference_moe(case)
    for key, ref in (("y", ys[rank]), ("gx", gxs[rank]), ("gp", gps[rank])):
        e = rel_err(res[key], ref)
        if not e <= tol:
            errs.append(f"{key} rel. error {e:.2e} > {tol}")
    return errs


def _compare_pair(a, b, tol, what):
    errs = []
    for key in ("tpe", "tokens", "probs"):
        if not torch.equal(a[key], b[key]):
            errs.append(f"{key} differs from {what}")
    for key in ("y", "gx", "gp"):
        if a[key] is None and b[key] is None:
            continue
        e = rel_err(a[key], b[key])
        if not e <= tol:
            errs.append(f"{key} vs {what}: rel. error {e:.2e} > {tol}")
    return errs


# ===================================================================== checks

CASES = {
    # name: (tokens(R, r), case kwargs, pad, dtype, hidden, experts per rank, topk)
    "uniform": (lambda R, r: 96, {}, None, torch.float32, 64, 8, 4),
    "masked_slots": (lambda R, r: 80 + 8 * r, dict(mask_frac=0.3), None, torch.float32, 64, 8, 4),
    "zipf_skew": (lambda R, r: 64 + 32 * r, dict(skew="zipf"), None, torch.float32, 64, 8, 4),
    "zero_token_rank": (lambda R, r: 0 if r == 1 else 72, dict(mask_frac=0.1), None,
                        torch.float32, 64, 8, 4),
    "one_expert": (lambda R, r: 50, dict(skew="one_expert"), None, torch.float32, 64, 4, 4),
    "pad_multiple": (lambda R, r: 70 + r, dict(mask_frac=0.1), 8, torch.float32, 64, 8, 4),
    # same H/K as repeat_large_bf16: one set of compiled kernel variants (compile time)
    "bf16": (lambda R, r: 64, dict(mask_frac=0.05), None, torch.bfloat16, 1024, 16, 8),
}


def _case(name, R):
    tok, kw, pad, dtype, H, per_rank, K = CASES[name]
    case = make_case(R, [tok(R, r) for r in range(R)], hidden=H, num_experts=per_rank * R,
                     topk=K, seed=_shared_seed(), dtype=dtype, **kw)
    return case, pad, dtype


def check_parity(name, impl="triton"):
    rank, R = dist.get_rank(), dist.get_world_size()
    case, pad, dtype = _case(name, R)
    W = case.W.to(DEV)
    opts = {"impl": impl}
    ours = _run(_backend("nvshmem", case.num_experts, pad, opts), case, rank, dtype, W)
    ref_a2a = _run(_backend("alltoall", case.num_experts, pad), case, rank, dtype, W)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    errs = _compare_ref(ours, case, rank, pad, tol)
    errs += _compare_pair(ours, ref_a2a, 1e-5 if dtype == torch.float32 else 1e-2, "alltoall")
    return errs


def check_narrow_k_rank():
    """A zero-token rank whose top-k width is 1 while the others use 4 (what a dense
    routing map gives an empty rank): the ranks share one staged slot layout."""
    rank, R = dist.get_rank(), dist.get_world_size()
    case, pad, dtype = _case("zero_token_rank", R)
    case.idxs[1] = case.idxs[1][:, :1]
    case.probs[1] = case.probs[1][:, :1]
    W = case.W.to(DEV)
    ours = _run(_backend("nvshmem", case.num_experts, pad), case, rank, dtype, W)
    ref_a2a = _run(_backend("alltoall", case.num_experts, pad), case, rank, dtype, W)
    errs = _compare_ref(ours, case, rank, pad, 1e-5)
    errs += _compare_pair(ours, ref_a2a, 1e-5, "alltoall")
    if ours["gp"] is not None and ours["gp"].shape != case.probs[rank].shape:
        errs.append(f"prob grad shape {tuple(ours['gp'].shape)}")
    return errs


def check_repeat_large():
    """Bigger rows (bf16, H 1024, 512 tokens) five times in a row vs alltoall: races show
    up as errors that move between repetitions."""
    rank, R = dist.get_rank(), dist.get_world_size()
    errs = []
    be = _backend("nvshmem", 16 * R)
    a2a = _backend("alltoall", 16 * R)
    for it in range(5):
        case = make_case(R, [512 - 64 * (r % 2) for r in range(R)], hidden=1024,
                         num_experts=16 * R, topk=8, seed=_shared_seed(), dtype=torch.bfloat16,
                         mask_frac=0.05)
        W = case.W.to(DEV)
        a = _run(be, case, rank, torch.bfloat16, W)
        b = _run(a2a, case, rank, torch.bfloat16, W)
        errs += [f"iteration {it}: {e}" for e in _compare_pair(a, b, 1e-2, "alltoall")]
    return errs


def check_back_to_back_dispatch():
    """Three dispatches in a row with no combine (or any other barrier) between them, one
    rank's reads made late each time: a dispatch ends without a barrier, so the next one
    must stage into the other buffer set while the slow peer still reads this one."""
    rank, R = dist.get_rank(), dist.get_world_size()
    be = _backend("nvshmem", 8 * R)
    engine = be.engine
    a2a = _backend("alltoall", 8 * R)
    # Cases first: drawing a shared seed is a collective, which would line the ranks up.
    cases = [make_case(R, [96 + 16 * ((r + it) % R) for r in range(R)], hidden=64,
                       num_experts=8 * R, topk=4, seed=_shared_seed(), dtype=torch.float32,
                       mask_frac=0.1) for it in range(3)]
    outs = []
    for it, case in enumerate(cases):
        slow = rank == it % R
        # The slow rank reads late (host sleep on CPU, a GPU spin before its pull kernel).
        engine.before_pull = (lambda: time.sleep(0.5)) if slow and CPU_MODE else \
            (lambda: torch.cuda._sleep(50_000_000)) if slow else None
        x = case.xs[rank].to(DEV)
        outs.append(be.dispatch(x, case.idxs[rank].to(DEV), case.probs[rank].to(DEV),
                                PendingCheck(None, None)))
    engine.before_pull = None
    errs = []
    for it, (case, res) in enumerate(zip(cases, outs)):
        ref = a2a.dispatch(case.xs[rank].to(DEV), case.idxs[rank].to(DEV),
                           case.probs[rank].to(DEV), PendingCheck(None, None))
        if not torch.equal(res.tokens_NH.cpu(), ref.tokens_NH.cpu()):
            errs.append(f"dispatch {it}: tokens differ from alltoall")
        if not torch.equal(res.probs_N.cpu(), ref.probs_N.cpu()):
            errs.append(f"dispatch {it}: probs differ from alltoall")
    return errs


def check_host_graph():
    """The default mode's CUDA graphs and speculative pull against the eager path and
    alltoall, forward + backward, new data and a fresh check-code tensor every call.
    Token counts per call: 320, 200, 320, 200, 320, 200, 320, 320 (minus 24 per rank).
    Each shape runs exactly first (which sizes its speculative buffer), then speculatively
    (new graph key: seen), then from a captured graph. Calls 7 and 8 find the speculative
    buffer too small (forced to one row): the fallback to an exact plan, eagerly and then
    from a graph captured with that one-row budget. A third nvshmem instance runs the graphs
    without speculation (the pull graph after the sync)."""
    rank, R = dist.get_rank(), dist.get_world_size()
    E, H = 16 * R, 1024
    graphed = _backend("nvshmem", E)
    eager = _backend("nvshmem", E, None, {"host_graph": False})
    # Graphs without speculation: the pull graph replays after the host sync.
    exact = _backend("nvshmem", E, None, {"speculative_rows": False})
    a2a = _backend("alltoall", E)
    errs = []
    counts = [320, 200, 320, 200, 320, 200, 320, 320]
    cases = [make_case(R, [n - 24 * r for r in range(R)], hidden=H, num_experts=E, topk=8,
                       seed=_shared_seed(), dtype=torch.bfloat16, mask_frac=0.05)
             for n in counts]
    # Each shape keeps one multiset of routing rows (its calls shuffle the rows): the row
    # counts, hence the speculative buffer sizes and the graph keys, repeat exactly, so
    # the number of graphs is known; hidden states, probs and row order are new each call.
    first = {}
    for it, (n, case) in enumerate(zip(counts, cases)):
        base = first.setdefault(n, case)
        g = torch.Generator().manual_seed(1000 + it)
        case.idxs = [b[torch.randperm(b.shape[0], generator=g)] for b in base.idxs]
    for it, case in enumerate(cases):
        if it >= 6:
            for be in (graphed, eager):
                be.engine._spec_rows = {k: 1 for k in be.engine._spec_rows}
        W = case.W.to(DEV)
        outs = []
        for be in (graphed, eager, a2a, exact):
            x = case.xs[rank].to(DEV, torch.bfloat16).clone().requires_grad_(True)
            p = case.probs[rank].to(DEV).clone().requires_grad_(True)
            bad = torch.zeros((), dtype=torch.int64, device=DEV)  # a new code tensor per call
            res = be.dispatch(x, case.idxs[rank].to(DEV), p, PendingCheck(None, bad, "bad"))
            L = E // R
            y = be.combine(_experts(W, rank * L, res.tokens_NH, res.tokens_per_expert_L,
                                    res.probs_N), res.handle)
            (y.float() * case.gouts[rank].to(DEV).float()).sum().backward()
            hd = res.handle
            outs.append(dict(tokens=res.tokens_NH.detach().cpu(),
                             tpe=res.tokens_per_expert_L.cpu(),
                             probs=res.probs_N.detach().cpu(), y=y.detach().float().cpu(),
                             gx=x.grad.float().cpu(), gp=p.grad.cpu(),
                             maps=None if be is a2a else
                             [t.cpu() for t in (hd.pos_VK, hd.pos_TR, hd.valid_TK)]))
        errs += [f"call {it}: {e}" for e in _compare_pair(outs[0], outs[1], 0.0, "eager")]
        errs += [f"call {it}: {e}" for e in _compare_pair(outs[0], outs[2], 1e-2, "alltoall")]
        errs += [f"call {it}: {e}" for e in _compare_pair(outs[3], outs[1], 0.0,
                                                          "eager (speculative_rows=False)")]
        for j, name in ((0, "graphed"), (3, "speculative_rows=False")):
            for m, (a, b) in zip(("pos_VK", "pos_TR", "valid_TK"),
                                 zip(outs[j]["maps"], outs[1]["maps"])):
                if not torch.equal(a, b):
                    bad = (a != b).nonzero()
                    errs.append(f"call {it}: {name} handle {m} differs from eager at "
                                f"{bad.shape[0]} places, first {bad[:3].tolist()}: "
                                f"{a[tuple(bad[0])].item()} vs {b[tuple(bad[0])].item()}")
    n_graphs = sum(1 for g in graphed.engine._graphs.values() if g)
    if n_graphs != 3:
        errs.append(f"{n_graphs} graphs captured, expected 3 (one per token count, one with "
                    f"the one-row budget)")
    if any(g for g in eager.engine._graphs.values()):
        errs.append("host_graph=False captured a graph")
    n_exact = sum(1 for g in exact.engine._graphs.values() if g)
    if n_exact != 2 or exact.engine._spec_rows:
        errs.append(f"speculative_rows=False: {n_exact} graphs (expected 2), speculative "
                    f"sizes {exact.engine._spec_rows}")
    return errs


def check_graph_buffers_live():
    """Every buffer the default mode's CUDA graphs write must outlive them. After the graphs
    are captured, fill the allocator's free small blocks with sentinel tensors, then dispatch
    and combine again: no sentinel may change (a buffer freed after capture would be handed
    to a sentinel and overwritten by the replay), and the results must match the eager path."""
    import gc
    rank, R = dist.get_rank(), dist.get_world_size()
    E, H = 16 * R, 1024
    graphed = _backend("nvshmem", E)
    eager = _backend("nvshmem", E, None, {"host_graph": False})
    base = make_case(R, [256 - 16 * r for r in range(R)], hidden=H, num_experts=E, topk=8,
                     seed=_shared_seed(), dtype=torch.bfloat16, mask_frac=0.05)
    L = E // R
    errs, sentinels = [], []

    def call(be, it):
        g = torch.Generator().manual_seed(500 + it)
        idx = base.idxs[rank][torch.randperm(base.idxs[rank].shape[0], generator=g)].to(DEV)
        x = base.xs[rank].to(DEV, torch.bfloat16) * (1 + it)
        res = be.dispatch(x, idx, base.probs[rank].to(DEV), PendingCheck(None, None))
        y = be.combine(_experts(base.W.to(DEV), rank * L, res.tokens_NH,
                                res.tokens_per_expert_L, res.probs_N), res.handle)
        return res.tokens_NH.cpu(), y.float().cpu()

    for it in range(6):
        if it == 3:  # the graphs were captured on call 2; now take every free small block
            gc.collect()
            for nbytes in (512, 4096, 32768, 262144):
                sentinels += [torch.full((nbytes // 4,), 0x5A5A5A5A, dtype=torch.int32,
                                         device=DEV) for _ in range(64)]
        a, b = call(graphed, it), call(eager, it)
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            errs.append(f"call {it}: graphed result differs from eager")
    torch.cuda.synchronize()
    hit = sum(1 for t in sentinels if not bool((t == 0x5A5A5A5A).all()))
    if hit:
        errs.append(f"{hit} sentinel tensors were overwritten by a graph replay")
    if not any(g for g in graphed.engine._graphs.values()):
        errs.append("no graph was captured")
    return errs


def check_static_budget():
    rank, R = dist.get_rank(), dist.get_world_size()
    case, pad, dtype = _case("masked_slots", R)
    need = max(int(reference_dispatch(case, r, 4)[1].sum()) for r in range(R))
    budget = need + 37
    W = case.W.to(DEV)
    be = _backend("nvshmem", case.num_experts, 4, budget=budget)
    res = _run(be, case, rank, dtype, W)
    errs = []
    if res["tpe_device"] != DEV.type:
        errs.append("tokens_per_expert is not a device tensor in static-budget mode")
    errs += _compare_ref(res, case, rank, 4, 1e-5, budget=budget)
    return errs


def check_static_overflow():
    """Budget far too small: flagged, bounded, finite; the next call is still right."""
    rank, R = dist.get_rank(), dist.get_world_size()
    case, pad, dtype = _case("uniform", R)
    W = case.W.to(DEV)
    be = _backend("nvshmem", case.num_experts, None, budget=17)
    res = _run(be, case, rank, dtype, W)
    errs = []
    if not res["status"] & 1:
        errs.append(f"overflow not flagged (status {res['status']})")
    if res["tokens"].shape[0] != 17 or int(res["tpe"].sum()) > 17:
        errs.append("budget not respected")
    if not (torch.isfinite(res["tokens"]).all() and torch.isfinite(res["y"]).all()
            and torch.isfinite(res["gx"]).all() and torch.isfinite(res["gp"]).all()):
        errs.append("non-finite values after overflow")
    # The shared symmetric buffers must be intact: a normal dispatch right after.
    case2, pad2, _ = _case("masked_slots", R)
    ok = _run(_backend("nvshmem", case2.num_experts, None), case2, rank, dtype, case2.W.to(DEV))
    errs += [f"after overflow: {e}" for e in _compare_ref(ok, case2, rank, None, 1e-5)]
    return errs


def check_cuda_graph():
    """Capture dispatch -> experts -> combine (static budget), replay with new inputs,
    compare with the eager default mode on the same inputs."""
    rank, R = dist.get_rank(), dist.get_world_size()
    E, K, H, T = 8 * R, 4, 64, 96
    L = E // R
    B = T * R * K  # the most rows a rank can receive: never overflows
    dev = torch.device("cuda")
    be = _backend("nvshmem", E, None, budget=B)
    eager = _backend("nvshmem", E, None)
    g = torch.Generator(device="cuda").manual_seed(_shared_seed() + rank)
    scale_L = torch.rand(L, device=dev, generator=g) + 0.5

    def inputs():
        x = torch.randn(T, H, device=dev, generator=g)
        idx = torch.rand(T, E, device=dev, generator=g).argsort(1)[:, :K]
        idx = idx.masked_fill(torch.rand(T, K, device=dev, generator=g) < 0.1, -1)
        p = torch.rand(T, K, device=dev, generator=g) * (idx >= 0)
        return x, idx, p

    def layer(b, x, idx, p):
        res = b.dispatch(x, idx, p, PendingCheck(None, None))
        y = _graph_experts(scale_L, res.tokens_NH, res.tokens_per_expert_L.to(dev), res.probs_N)
        return b.combine(y, res.handle), res.handle.status

    sx, sidx, sp = inputs()
    with torch.no_grad():
        layer(be, sx, sidx, sp)  # eager warm-up: sizes buffers, compiles kernels
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(be, sx, sidx, sp)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, status = layer(be, sx, sidx, sp)
        torch.cuda.synchronize()
        dist.barrier()
        errs = []
        for it in range(3):
            x, idx, p = inputs()
            sx.copy_(x), sidx.copy_(idx), sp.copy_(p)
            graph.replay()
            got = out.clone()
            st = int(status.item())
            want, _ = layer(eager, x, idx, p)
            e = rel_err(got, want)
            if not e < 1e-6:
                errs.append(f"replay {it}: rel. error {e:.2e} vs eager")
            if st != 0:
                errs.append(f"replay {it}: status {st}")
    return errs


def check_barrier_torch():
    """The same parity with the symmetric-memory handle's own barrier (a fresh group, so a
    fresh transport). Only meaningful on torch's CUDA symmetric-memory backend."""
    rank, R = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(R)))
    case, pad, dtype = _case("masked_slots", R)
    W = case.W.to(DEV)
    ours = _run(_backend("nvshmem", case.num_experts, None, {"barrier": "torch"}, group=group),
                case, rank, dtype, W)
    return _compare_ref(ours, case, rank, None, 1e-5)


def check_errors_are_clear():
    rank, R = dist.get_rank(), dist.get_world_size()
    errs = []
    be = _backend("nvshmem", 4 * R)
    try:
        be.dispatch(torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                    PendingCheck(None, None))
        errs.append("CPU tensors accepted")
    except ValueError as exc:
        if "CUDA" not in str(exc):
            errs.append(f"unclear error: {exc}")
    # bad expert id on the last rank: every rank raises
    case, pad, dtype = _case("uniform", R)
    x = case.xs[rank].cuda()
    idx = case.idxs[rank].cuda()
    bad = torch.tensor(1 if rank == R - 1 else 0, device="cuda")
    try:
        be.dispatch(x, idx, case.probs[rank].cuda(), PendingCheck(None, bad, "bad expert id"))
        errs.append("bad input on one rank did not raise here")
    except Exception as exc:
        if type(exc).__name__ != "DispatchInputError":
            errs.append(f"{type(exc).__name__}: {exc}")
    return errs


def check_static_bad_input():
    """Static budget: bad ids on the last rank raise nothing in dispatch, combine or the
    backward; every rank's status has STATUS_BAD_INPUT, the bad rank's ``check``
    names its error, and the next call is right again."""
    from moe_dispatch.protocol import STATUS_BAD_INPUT
    rank, R = dist.get_rank(), dist.get_world_size()
    case, pad, dtype = _case("uniform", R)
    W = case.W.to(DEV)
    be = _backend("nvshmem", case.num_experts, None, budget=4 * 96 * R)  # every row fits
    _run(be, case, rank, dtype, W)  # the first call agrees shapes
    x = case.xs[rank].to(DEV, dtype).clone().requires_grad_(True)
    bad = torch.tensor(1 if rank == R - 1 else 0, device=DEV)
    errs = []
    try:
        res = be.dispatch(x, case.idxs[rank].to(DEV), case.probs[rank].to(DEV),
                          PendingCheck(None, bad, "bad expert id"))
        be.combine(res.tokens_NH * 2, res.handle).float().sum().backward()
        _sync()
        if not int(res.status.item()) & STATUS_BAD_INPUT:
            errs.append(f"status {int(res.status.item())} lacks STATUS_BAD_INPUT")
        mine = res.check.mine()
        if (mine == "bad expert id") != (rank == R - 1):
            errs.append(f"budget_check says {mine!r}")
    except Exception as exc:  # noqa: BLE001 - nothing may raise in the budget mode
        errs.append(f"raised {type(exc).__name__}: {exc}")
    ok = _run(be, case, rank, dtype, W)
    errs += [f"after bad input: {e}" for e in _compare_ref(ok, case, rank, None, 1e-5,
                                                           budget=ok["tokens"].shape[0])]
    return errs


def _checks():
    out = [(f"parity_{n}", (lambda n=n: check_parity(n))) for n in CASES]
    out += [("parity_masked_slots_torch_impl", lambda: check_parity("masked_slots", "torch")),
            ("parity_pad_multiple_torch_impl", lambda: check_parity("pad_multiple", "torch")),
            ("narrow_k_rank", check_narrow_k_rank),
            ("back_to_back_dispatch", check_back_to_back_dispatch),
            ("repeat_large_bf16", check_repeat_large),
            ("static_budget", check_static_budget),
            ("static_overflow", check_static_overflow),
            ("static_bad_input", check_static_bad_input)]
    if not CPU_MODE:
        out += [("host_graph", check_host_graph),
                ("graph_buffers_live", check_graph_buffers_live),
                ("cuda_graph", check_cuda_graph),
                ("errors", check_errors_are_clear),
                ("barrier_torch", check_barrier_torch)]
    return out


def run_checks(only=None) -> dict:
    rank, R = _init()
    results = {}
    for name, fn in _checks():
        if only and name not in only:
            continue
        t0 = time.time()
        try:
            errs = fn()
        except Exception as exc:  # noqa: BLE001 - reported and agreed on
            errs = [f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"]
        _sync()
        ok = _agree(not errs)
        if errs:
            print(f"[rank {rank}] {name}: " + " | ".join(errs), flush=True)
        results[name] = "pass" if ok else "FAIL"
        _log(f"CHECK {name:36s} {'pass' if ok else 'FAIL'}  ({time.time() - t0:.1f} s, EP{R})")
    return results


def test_nvshmem_gpu_checks():
    results = run_checks()
    assert all(v == "pass" for v in results.values()), results


# ===================================================================== bench


def _time(fn, setup=None, iters=20, warmup=5):
    """Median microseconds over ``iters`` calls (CUDA events), ranks aligned and L2
    overwritten before each call; the max over ranks of each rank's median."""
    flush = None if CPU_MODE else torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    for i in range(warmup):
        fn(setup(i) if setup else None)
    ts = []
    for i in range(iters):
        s = setup(warmup + i) if setup else None
        _sync()
        dist.barrier()
        if CPU_MODE:  # harness dry run only: the numbers mean nothing
            t0 = time.perf_counter()
            fn(s)
            ts.append((time.perf_counter() - t0) * 1e6)
            continue
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(s)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    med = torch.tensor([statistics.median(ts)], device=DEV)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def run_bench(T=4096, H=7168, K=8, E=256, iters=20, json_path=None):
    rank, R = _init()
    if os.environ.get("NVSHMEM_BENCH_SHAPE"):  # "T,H,K,E"
        T, H, K, E = (int(v) for v in os.environ["NVSHMEM_BENCH_SHAPE"].split(","))
    L = E // R
    dev = DEV
    torch.manual_seed(_shared_seed() + rank)
    sets = []
    for _ in range(2):
        scores = torch.randn(T, E, device=dev).abs() + 1
        idx = torch.topk(scores, K, dim=-1).indices
        p = torch.rand(T, K, device=dev)
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16 if not CPU_MODE else torch.float32)
        sets.append((x, idx, p))
    # Rows received by this rank, DeepEP's way: one per (token, destination rank).
    hit = torch.zeros(T, R, dtype=torch.bool, device=dev)
    hit.scatter_(1, sets[0][1] // L, True)
    sent_R = hit.sum(0)
    dist.all_reduce(sent_R)  # column r summed over sources = rows received by r
    recv_rows = int(sent_R[rank].item())
    expert_rows = torch.zeros(E, dtype=torch.long, device=dev)
    expert_rows.scatter_add_(0, sets[0][1].reshape(-1), torch.ones(T * K, dtype=torch.long, device=dev))
    dist.all_reduce(expert_rows)
    max_rows = int(expert_rows.view(R, L).sum(1).max().item())
    budget = int(max_rows * 1.1) + 256
    nbytes = recv_rows * H * 2
    out = {"T": T, "H": H, "K": K, "E": E, "R": R, "recv_rows": recv_rows,
           "expert_rows_max": max_rows, "budget": budget,
           "device": "cpu" if CPU_MODE else torch.cuda.get_device_name(),
           "torch": torch.__version__, "rows": {}}

    def disp_fn(be):
        return lambda i: be.dispatch(sets[i % 2][0], sets[i % 2][1], sets[i % 2][2],
                                     PendingCheck(None, None))

    def row(name, be):
        try:
            d = disp_fn(be)
            with torch.no_grad():
                t_d = _time(d, setup=lambda i: i, iters=iters)
                t_c = _time(lambda r: be.combine(r.tokens_NH, r.handle), setup=d, iters=iters)
            out["rows"][name] = dict(dispatch_us=t_d, combine_us=t_c,
                                     dispatch_GBps=nbytes / t_d / 1e3,
                                     combine_GBps=nbytes / t_c / 1e3)
            _log(f"BENCH {name:24s} dispatch {t_d:8.1f} us ({nbytes / t_d / 1e3:6.1f} GB/s)   "
                 f"combine {t_c:8.1f} us ({nbytes / t_c / 1e3:6.1f} GB/s)")
        except Exception as exc:  # noqa: BLE001
            out["rows"][name] = dict(error=f"{type(exc).__name__}: {exc}")
            _log(f"BENCH {name}: ERROR {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    row("nvshmem", _backend("nvshmem", E))
    row("nvshmem-budget", _backend("nvshmem", E, None, budget=budget))
    row("alltoall", _backend("alltoall", E))

    # Where the nvshmem dispatch/combine time goes (rank 0's events, one call each).
    try:
        be = _backend("nvshmem", E)
        eng = be.engine
        with torch.no_grad():
            # Calls 1-4 compile and capture (two staging sets); the last one is recorded.
            for _ in range(6):
                eng.profile = []
                r = disp_fn(be)(0)
                be.combine(r.tokens_NH, r.handle)
                _sync()
        marks = eng.profile
        eng.profile = None
        phases = [(marks[i + 1][0], marks[i][1].elapsed_time(marks[i + 1][1]) * 1e3)
                  for i in range(len(marks) - 1) if marks[i + 1][0] not in ("dispatch", "combine")]
        # Host side: when each mark was reached, from the start of its op (launch-bound
        # phases show up as host time the GPU waits for).
        host, t0 = [], None
        for name, _, t in marks:
            t0 = t if name in ("dispatch", "combine") else t0
            host.append((name, (t - t0) * 1e6))
        out["nvshmem_phases_us_rank0"] = phases
        out["nvshmem_host_marks_us_rank0"] = host
        _log("PHASES nvshmem (rank 0, us): " + ", ".join(f"{n} {t:.1f}" for n, t in phases))
        _log("HOST nvshmem (rank 0, us since op start): " +
             ", ".join(f"{n} {t:.1f}" for n, t in host))
    except Exception as exc:  # noqa: BLE001
        _log(f"PHASES: ERROR {type(exc).__name__}: {exc}")

    # DeepEP Buffer directly, plus the separate permute into expert-grouped rows.
    try:
        import deep_ep
        from moe_dispatch.permute import group_plan, permute, unpermute
        deep_ep.Buffer.set_num_sms(24)
        buf = deep_ep.Buffer(dist.group.WORLD, int(1e9), 0)

        def dd(i):
            x, idx, p = sets[i % 2]
            ntr, _, nte, itir, _ = buf.get_dispatch_layout(idx, E)
            rx, ridx, rw, cnt, h, _ = buf.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itir,
                                                   num_tokens_per_expert=nte, topk_idx=idx,
                                                   topk_weights=p)
            return rx, ridx, rw, cnt, h

        def ddp(i):
            rx, ridx, rw, cnt, h = dd(i)
            plan = group_plan(ridx.long(), L, tokens_per_expert=cnt)
            tok, pr = permute(rx, rw, plan)
            return tok, plan, h

        with torch.no_grad():
            t_d = _time(dd, setup=lambda i: i, iters=iters)
            t_dp = _time(ddp, setup=lambda i: i, iters=iters)
            t_c = _time(lambda o: buf.combine(o[0], o[4]), setup=dd, iters=iters)
            t_cp = _time(lambda o: buf.combine(unpermute(o[0], o[1]), o[2]), setup=ddp, iters=iters)
        for name, a, b in (("deepep", t_d, t_c), ("deepep+permute", t_dp, t_cp)):
            out["rows"][name] = dict(dispatch_us=a, combine_us=b, dispatch_GBps=nbytes / a / 1e3,
                                     combine_GBps=nbytes / b / 1e3)
            _log(f"BENCH {name:24s} dispatch {a:8.1f} us ({nbytes / a / 1e3:6.1f} GB/s)   "
                 f"combine {b:8.1f} us ({nbytes / b / 1e3:6.1f} GB/s)")
    except Exception as exc:  # noqa: BLE001
        out["rows"]["deepep"] = dict(error=f"{type(exc).__name__}: {exc}")
        _log(f"BENCH deepep: not run ({type(exc).__name__}: {exc})")

    rows = out["rows"]
    if "nvshmem" in rows and "dispatch_us" in rows["nvshmem"]:
        ours = rows["nvshmem"]
        for ref in ("deepep+permute", "deepep", "alltoall"):
            if ref in rows and "dispatch_us" in rows[ref]:
                _log(f"RATIO nvshmem vs {ref:16s}: dispatch {rows[ref]['dispatch_us'] / ours['dispatch_us']:.2f}x  "
                     f"combine {rows[ref]['combine_us'] / ours['combine_us']:.2f}x  "
                     f"both {(rows[ref]['dispatch_us'] + rows[ref]['combine_us']) / (ours['dispatch_us'] + ours['combine_us']):.2f}x")
    if rank == 0:
        line = json.dumps(out)
        print("BENCH_JSON " + line, flush=True)
        if json_path:
            with open(json_path, "w") as f:
                f.write(line + "\n")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    code = 0
    if "--bench" in args:
        run_bench(json_path=os.environ.get("NVSHMEM_BENCH_JSON"))
    else:
        res = run_checks(set(a for a in args if not a.startswith("-")) or None)
        _log("SUMMARY " + json.dumps(res))
        code = 0 if all(v == "pass" for v in res.values()) else 1
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(code)
