"""Fused Triton permute kernels and the ``nvshmem`` backend's algorithm, on CPU.

* The Triton kernels run under TRITON_INTERPRET=1 on CPU (on a GPU machine they run for
  real) and must match the plain torch path of ``moe_dispatch.permute`` exactly: forward,
  backward, padding, masked slots, empty inputs, every output row written.
* The ``nvshmem`` engine runs with R simulated ranks as threads of this process sharing
  "symmetric" CPU buffers (the peer-pointer kernels read and write them through real
  addresses) and must match the single-process dense reference forward and backward.
  Its plain-torch implementation runs without triton, so that part also runs in CI.
"""
import threading
import time

import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402,F401

from moe_dispatch import kernels  # noqa: E402
from moe_dispatch.backends.nvshmem import graph as symm_graph, symm_memory  # noqa: E402
from moe_dispatch.backends.nvshmem import engine as nvshmem  # noqa: E402
from moe_dispatch.permute import group_plan, permute, triton_group_plan, unpermute  # noqa: E402
from moe_dispatch.protocol import DispatchInputError, PendingCheck  # noqa: E402
from moe_dispatch.testing import (local_experts, make_case, reference_dispatch,  # noqa: E402
                                  reference_moe, rel_err)



def _torch_path(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_TRITON", "0")


def _random_lid(N, K, L, mask_frac, g):
    lid = torch.randint(0, L, (N, K), generator=g)
    lid[torch.rand(N, K, generator=g) < mask_frac] = -1
    return lid


# ===================================================================== local kernels


def test_use_triton_rules(monkeypatch):
    assert not kernels.use_triton(torch.zeros(2))  # CPU tensors never
    if torch.cuda.is_available() and HAS_TRITON:
        assert kernels.use_triton(torch.zeros(2, device="cuda"))
        monkeypatch.setenv("MOE_DISPATCH_TRITON", "0")
        assert not kernels.use_triton(torch.zeros(2, device="cuda"))


@needs_triton
@pytest.mark.parametrize("N,K,L,pad,mask,dtype", [
    (9, 3, 4, None, 0.2, torch.float32),
    (13, 2, 3, 4, 0.3, torch.float32),
    (11, 4, 5, None, 0.0, torch.bfloat16),
    (6, 1, 2, 3, 0.5, torch.bfloat16),
    (5, 3, 2, None, 1.0, torch.float32),   # every slot masked: M = 0
    (0, 2, 3, 2, 0.0, torch.float32),      # no input rows
])
def test_permute_unpermute_match_torch(monkeypatch, N, K, L, pad, mask, dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,))))
    H = 40
    lid = _random_lid(N, K, L, mask, g).to(DEV)
    plan = group_plan(lid, L, pad_multiple=pad)
    x = torch.randn(N, H, generator=g).to(DEV, dtype).requires_grad_(True)
    p = torch.rand(N, K, generator=g).to(DEV).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    p_ref = p.detach().clone().requires_grad_(True)

    tok, pr = kernels.permute(x, p, plan)
    with monkeypatch.context() as m:
        _torch_path(m)
        tok_ref, pr_ref = permute(x_ref, p_ref, plan)
    assert tok.shape == tok_ref.shape and tok.dtype == tok_ref.dtype
    assert torch.equal(tok, tok_ref)      # a copy: bit-exact
    assert torch.equal(pr, pr_ref)

    gt = torch.randn(tok.shape, generator=g).to(DEV, dtype)
    gp = torch.randn(pr.shape, generator=g).to(DEV)
    ((tok.float() * gt.float()).sum() + (pr * gp).sum()).backward()
    ((tok_ref.float() * gt.float()).sum() + (pr_ref * gp).sum()).backward()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert rel_err(x.grad, x_ref.grad) <= tol
    assert torch.equal(p.grad, p_ref.grad)

    y = torch.randn(tok.shape, generator=g).to(DEV, dtype).requires_grad_(True)
    y_ref = y.detach().clone().requires_grad_(True)
    u = kernels.unpermute(y, plan)
    with monkeypatch.context() as m:
        _torch_path(m)
        u_ref = unpermute(y_ref, plan)
    assert u.shape == u_ref.shape and u.dtype == u_ref.dtype
    assert rel_err(u, u_ref) <= tol
    go = torch.randn(u.shape, generator=g).to(DEV, dtype)
    (u.float() * go.float()).sum().backward()
    (u_ref.float() * go.float()).sum().backward()
    assert torch.equal(y.grad, y_ref.grad)  # padding rows get zero, real rows a copy


@needs_triton
def test_permute_without_probs(monkeypatch):
    """Rows only (the send side of an all-to-all): same rows, no probs, grads still flow."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,))))
    N, R, H = 12, 3, 24
    lid = _random_lid(N, R, R, 0.4, g).to(DEV)
    plan = group_plan(lid, R, pad_multiple=2)
    x = torch.randn(N, H, generator=g).to(DEV).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    tok, pr = kernels.permute(x, None, plan)
    with monkeypatch.context() as m:
        _torch_path(m)
        tok_ref, pr_ref = permute(x_ref, None, plan)
    assert pr is None and pr_ref is None and torch.equal(tok, tok_ref)
    gt = torch.randn(tok.shape, generator=g).to(DEV)
    (tok * gt).sum().backward()
    (tok_ref * gt).sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= 1e-6


@needs_triton
@pytest.mark.parametrize("pad", [None, 4])
def test_every_output_row_written(pad):
    """Outputs start as NaN: every row (padding included) must be overwritten."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,))))
    N, K, L, H = 10, 3, 4, 24
    lid = _random_lid(N, K, L, 0.3, g).to(DEV)
    plan = group_plan(lid, L, pad_multiple=pad)
    pos, filled = kernels.plan_maps(plan)
    x = torch.randn(N, H, generator=g).to(DEV)
    probs = torch.rand(N, K, generator=g).to(DEV)
    out = torch.full((plan.num_out_rows, H), float("nan"), device=DEV)
    pout = torch.full((plan.num_out_rows,), float("nan"), device=DEV)
    kernels.permute_rows(x, pos, plan.num_out_rows, filled, probs, out, pout)
    assert not out.isnan().any() and not pout.isnan().any()
    red = torch.full((N, H), float("nan"), device=DEV)
    kernels.reduce_rows(out, pos, red)
    assert not red.isnan().any()
    # rows of a fully masked input row are zeros
    empty = (pos < 0).all(1)
    assert (red[empty] == 0).all()


# ===================================================================== counting-sort plan


def _plan_lid(kind, N, K, L, g):
    """[N, K] local ids of one test kind (torch reference decides what is right)."""
    lid = _random_lid(N, K, L, 0.3, g)
    if kind == "zero_rows":  # whole rows with no slot here, incl. the first and last
        lid[torch.rand(N, generator=g) < 0.4] = -1
        lid[0] = -1
        lid[-1] = -1
    elif kind == "one_expert":  # every slot on the last expert
        lid.fill_(L - 1)
    elif kind == "no_slots":
        lid.fill_(-1)
    return lid


def _check_plan(monkeypatch, lid, L, pad, host_counts, tiles, g, dtype=torch.float32):
    ref = group_plan(lid, L, pad_multiple=pad)  # CPU tensors: the torch argsort path
    counts = None
    if host_counts:
        counts = torch.bincount(lid[lid >= 0].reshape(-1), minlength=L).tolist()
    block, chunks = tiles or (None, None)
    plan = triton_group_plan(lid.to(DEV), L, counts, pad, block=block, chunks=chunks)
    pos_ref, filled_ref = kernels.plan_maps(ref)
    assert plan.tokens_per_expert == ref.tokens_per_expert
    assert plan.num_out_rows == ref.num_out_rows
    assert plan.pos_NK.dtype == torch.long and plan.pos_NK.shape == lid.shape
    assert torch.equal(plan.pos_NK.cpu(), pos_ref), (plan.pos_NK, pos_ref)
    assert (plan.filled_M is None) == (filled_ref is None)
    if filled_ref is not None:
        assert torch.equal(plan.filled_M.cpu(), filled_ref)
    # maps derived lazily for the torch path
    assert torch.equal(plan.slot_M.cpu(), ref.slot_M)
    assert torch.equal(plan.row_M.cpu(), ref.row_M)
    assert (plan.dest_M is None) == (ref.dest_M is None)
    if ref.dest_M is not None:
        assert torch.equal(plan.dest_M.cpu(), ref.dest_M)

    N, K = lid.shape
    H = 20
    x = torch.randn(N, H, generator=g).to(dtype)
    p = torch.rand(N, K, generator=g)
    tok_ref, pr_ref = permute(x, p, ref)
    # poisoned outputs: every row and prob (padding included) must be written
    out = torch.full((plan.num_out_rows, H), float("nan"), dtype=dtype, device=DEV)
    pout = torch.full((plan.num_out_rows,), float("nan"), device=DEV)
    tok, pr = kernels.permute_rows(x.to(DEV), plan.pos_NK, plan.num_out_rows, plan.filled_M,
                                   p.to(DEV), out, pout)
    assert torch.equal(tok.cpu(), tok_ref) and torch.equal(pr.cpu(), pr_ref)
    tok2, pr2 = kernels.permute(x.to(DEV), p.to(DEV), plan)
    assert torch.equal(tok2.cpu(), tok_ref) and torch.equal(pr2.cpu(), pr_ref)
    y = torch.randn(tok_ref.shape, generator=g).to(dtype)
    u_ref = unpermute(y, ref)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # fp32 sums in another order
    assert rel_err(kernels.unpermute(y.to(DEV), plan).cpu(), u_ref) <= tol
    with monkeypatch.context() as m:  # the torch path on the kernel's plan (lazy maps)
        _torch_path(m)
        tok3, pr3 = permute(x.to(DEV), p.to(DEV), plan)
        assert torch.equal(tok3.cpu(), tok_ref) and torch.equal(pr3.cpu(), pr_ref)
        # CUDA's index_add sums a row's >= 3 slots in any order: equal up to rounding.
        assert rel_err(unpermute(y.to(DEV), plan).cpu(), u_ref) <= tol
    return plan


@needs_triton
@pytest.mark.parametrize("host_counts", [True, False])
@pytest.mark.parametrize("N,K,L,pad,kind,tiles", [
    (9, 3, 4, None, "random", None),            # one chunk: a single launch
    (13, 2, 3, 3, "random", None),
    (40, 3, 5, 3, "random", (16, None)),        # 8 chunks of 16 slots
    (40, 3, 5, 16, "zero_rows", (16, 3)),       # chunks of 48 slots: 3 blocks each
    (37, 2, 4, 1, "zero_rows", (16, 2)),
    (30, 4, 6, 16, "one_expert", (16, 4)),
    (12, 2, 3, None, "one_expert", None),
    (1, 1, 1, None, "random", None),
    (1, 4, 3, 3, "random", None),
    (1, 2, 4, 16, "no_slots", None),
    (50, 2, 64, 3, "random", None),             # many experts, one chunk
    (50, 3, 64, None, "random", (16, 5)),       # many experts, several chunks
    (70, 1, 64, 16, "zero_rows", (16, None)),   # K = 1, 5 chunks
    (6, 16, 8, None, "random", (32, None)),     # K = 16
    (0, 2, 3, 4, "random", None),               # no rows: nothing launched
])
def test_triton_plan_matches_torch(monkeypatch, host_counts, N, K, L, pad, kind, tiles):
    g = torch.Generator().manual_seed(N * 1009 + K * 31 + L)
    lid = _plan_lid(kind, N, K, L, g) if N else torch.zeros(0, K, dtype=torch.long)
    _check_plan(monkeypatch, lid, L, pad, host_counts, tiles, g)


@needs_triton
def test_triton_plan_default_tiling_several_chunks(monkeypatch):
    """Default tiling past the one-launch size (L=64: blocks of 128 slots, > 4 blocks)."""
    g = torch.Generator().manual_seed(7)
    lid = _random_lid(90, 8, 64, 0.2, g)
    _check_plan(monkeypatch, lid, 64, 3, True, None, g, dtype=torch.bfloat16)


@needs_triton
def test_group_plan_uses_counting_sort_when_triton_is_on(monkeypatch):
    """``group_plan`` + ``permute`` take the kernel path (no argsort, no index_copy) when
    ``use_triton`` says so (here forced on CPU tensors), with the torch path's results."""
    g = torch.Generator().manual_seed(11)
    N, K, L, H = 21, 2, 4, 8
    lid = _random_lid(N, K, L, 0.3, g)
    x = torch.randn(N, H, generator=g)
    p = torch.rand(N, K, generator=g)
    ref = group_plan(lid, L, pad_multiple=4)
    tok_ref, pr_ref = permute(x, p, ref)
    with monkeypatch.context() as m:
        m.setattr(kernels, "use_triton", lambda t: isinstance(t, torch.Tensor))

        def boom(*a, **k):
            raise AssertionError("torch index op on the kernel path")
        m.setattr(torch, "argsort", boom)
        m.setattr(torch.Tensor, "index_copy_", boom)
        m.setattr(torch.Tensor, "index_fill_", boom)
        plan = group_plan(lid.to(DEV), L, pad_multiple=4)
        assert plan.pos_NK is not None and plan.filled_M is not None
        tok, pr = permute(x.to(DEV), p.to(DEV), plan)
        u = unpermute(tok, plan)
    assert torch.equal(tok.cpu(), tok_ref) and torch.equal(pr.cpu(), pr_ref)
    assert rel_err(u.cpu(), unpermute(tok_ref, ref)) <= 1e-6


# ===================================================================== simulated ranks


class _SimWorld:
    def __init__(self, R):
        self.R = R
        self.bar = threading.Barrier(R, timeout=300)
        self.lock = threading.Lock()
        self.allocs = {}
        self.vals = [None] * R


class _SimTransport(symm_memory.Transport):
    """R threads of one process as an EP group: shared CPU buffers, a thread barrier."""

    def __init__(self, world: _SimWorld, rank: int):
        super().__init__()
        self.w, self.rank, self.world = world, rank, world.R
        self.device = DEV
        self.status = torch.zeros(1, dtype=torch.int32, device=DEV)
        self.n_alloc = 0

    def alloc(self, nbytes):
        key = self.n_alloc
        self.n_alloc += 1
        with self.w.lock:
            # 0xFF bytes: NaN floats, so reading memory nobody wrote shows up.
            bufs = self.w.allocs.setdefault(
                key, [torch.full((nbytes,), 255, dtype=torch.uint8, device=DEV)
                      for _ in range(self.world)])
        self.w.bar.wait()
        return symm_memory.Window(bufs[self.rank], [b.data_ptr() for b in bufs],
                               lambda s: bufs[s])

    def barrier(self, channel):
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        self.w.bar.wait()

    def host_max(self, vals):
        self.w.vals[self.rank] = list(vals)
        self.w.bar.wait()
        out = [max(c) for c in zip(*self.w.vals)]
        self.w.bar.wait()
        return out


def _run_ranks(R, fn):
    world = _SimWorld(R)
    results, errors = [None] * R, [None] * R

    def body(r):
        try:
            results[r] = fn(r, _SimTransport(world, r))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[r] = exc
            world.bar.abort()

    if R == 1:
        body(0)
    else:
        threads = [threading.Thread(target=body, args=(r,)) for r in range(R)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    if any(errors):
        raise errors[0]
    return results


def _experts(W, offset, tokens, tpe, probs):
    return local_experts(W, offset)(tokens, tpe, probs)


def _rank_fn(case, options, pad):
    E = case.num_experts

    def fn(r, tr):
        eng = nvshmem._Engine(tr, E, pad, options)
        x = case.xs[r].to(DEV).clone().requires_grad_(True)
        idx = case.idxs[r].to(DEV)
        p = case.probs[r].to(DEV).clone().requires_grad_(True)
        res = eng.dispatch(x, idx, p, PendingCheck(None, None))
        L = E // tr.world
        y = eng.combine(_experts(case.W.to(DEV), r * L, res.tokens_NH, res.tokens_per_expert_L,
                                 res.probs_N), res.handle)
        (y * case.gouts[r].to(DEV)).sum().backward()
        # a second dispatch/combine on the same buffers must give the same answer
        res2 = eng.dispatch(x.detach(), idx, p.detach(), PendingCheck(None, None))
        return dict(tokens=res.tokens_NH.detach().cpu(), tpe=res.tokens_per_expert_L.cpu(),
                    probs=res.probs_N.detach().cpu(), y=y.detach().cpu(),
                    gx=x.grad.cpu(), gp=p.grad.cpu(), tokens2=res2.tokens_NH.cpu(),
                    status=None if res.handle.status is None else int(res.handle.status.item()))
    return fn


def _check(results, case, pad, budget=None):
    ys, gxs, gps = reference_moe(case)
    for r, res in enumerate(results):
        tok_ref, tpe_ref, p_ref = reference_dispatch(case, r, pad)
        n = tok_ref.shape[0]
        assert torch.equal(res["tpe"], tpe_ref), (r, res["tpe"], tpe_ref)
        if budget is None:
            assert res["tokens"].shape == tok_ref.shape
        else:
            assert res["tokens"].shape[0] == budget and res["status"] == 0
            assert (res["tokens"][n:] == 0).all() and (res["probs"][n:] == 0).all()
        assert torch.equal(res["tokens"][:n], tok_ref), r
        assert torch.equal(res["probs"][:n], p_ref), r
        assert torch.equal(res["tokens2"], res["tokens"]), r
        assert rel_err(res["y"], ys[r]) < 1e-5, r
        assert rel_err(res["gx"], gxs[r]) < 1e-5, r
        assert rel_err(res["gp"], gps[r]) < 1e-5, r


SIM_CASES = {
    # name: (R, tokens per rank, case kwargs, pad_multiple)
    "uniform_r2": (2, [7, 5], dict(mask_frac=0.2), None),
    "zero_token_rank_r3": (3, [6, 0, 4], dict(mask_frac=0.1), 4),
    "zipf_r4": (4, [5, 3, 6, 2], dict(skew="zipf", mask_frac=0.1), None),
    "single_rank": (1, [9], dict(mask_frac=0.3), 2),
    "masked_garbage_probs_r2": (2, [6, 7], dict(mask_frac=0.3, masked_prob=0.7), None),
}


@pytest.fixture(autouse=True)
def _small_round(monkeypatch):
    # Keep simulated buffers tiny: interpreted kernels visit every buffer row.
    monkeypatch.setattr(nvshmem, "_T_ROUND", 8, raising=False)


sim_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="simulated ranks are threads spinning on one device: CPU only (the real "
           "multi-GPU path is tests/test_gpu_nvshmem.py under torchrun)")


@sim_only
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("name", list(SIM_CASES))
def test_sim_engine_matches_dense_reference(impl, name):
    R, tokens, kw, pad = SIM_CASES[name]
    case = make_case(R, tokens, hidden=16, num_experts=4 * R, topk=3, **kw)
    results = _run_ranks(R, _rank_fn(case, {"impl": impl}, pad))
    _check(results, case, pad)


@sim_only
@needs_triton
@pytest.mark.parametrize("pad", [None, 2])
def test_sim_static_budget(pad):
    R = 2
    case = make_case(R, [6, 4], hidden=16, num_experts=4 * R, topk=3, mask_frac=0.1)
    need = max(int(reference_dispatch(case, r, pad)[1].sum()) for r in range(R))
    budget = need + 5
    results = _run_ranks(R, _rank_fn(case, {"max_rows_per_rank": budget}, pad))
    _check(results, case, pad, budget=budget)


@sim_only
@needs_triton
def test_sim_static_budget_overflow_is_flagged_and_bounded():
    R = 2
    case = make_case(R, [8, 8], hidden=8, num_experts=2 * R, topk=2)
    budget = 3

    def fn(r, tr):
        eng = nvshmem._Engine(tr, case.num_experts, None, {"max_rows_per_rank": budget})
        res = eng.dispatch(case.xs[r].to(DEV), case.idxs[r].to(DEV), case.probs[r].to(DEV),
                           PendingCheck(None, None))
        y = eng.combine(res.tokens_NH * 2, res.handle)
        return res, y

    for res, y in _run_ranks(R, fn):
        assert res.tokens_NH.shape[0] == budget
        assert int(res.tokens_per_expert_L.sum()) <= budget
        assert int(res.handle.status.item()) & nvshmem.STATUS_ROWS_DROPPED
        assert torch.isfinite(res.tokens_NH).all() and torch.isfinite(y).all()


def _bad_static_input(which, x, idx, p):
    """(x, idx, p, check) of a bad static-budget call of kind ``which``, as
    ``routing.canonicalize`` hands them over (a host error comes with empty placeholders)."""
    if which == "value":  # e.g. an expert id out of range, already masked by the check
        return x, idx, p, PendingCheck(None, torch.tensor(1, device=DEV), "bad ids")
    if which == "host":
        return (x[:0], idx[:0, :1], p[:0, :1], PendingCheck("bad shape", None))
    wide = torch.randn(x.shape[0], 2 * x.shape[1], device=DEV).requires_grad_(True)
    return wide, idx, p, PendingCheck(None, None)  # "hidden": another hidden size


@sim_only
@needs_triton
@pytest.mark.parametrize("which", ["value", "host", "hidden"])
def test_sim_static_bad_input_is_flagged_not_raised(which):
    """Static budget: one rank's bad input raises nothing in dispatch or combine (or the
    backward, which every rank runs); every rank's status says bad input, the bad rank's
    ``check`` names its error, and the next call is exact again."""
    from moe_dispatch.protocol import STATUS_BAD_INPUT, raise_on_status
    R, budget, bad_rank = 2, 24, 1
    case = make_case(R, [6, 5], hidden=8, num_experts=2 * R, topk=2, seed=11)

    def fn(r, tr):
        eng = nvshmem._Engine(tr, case.num_experts, None, {"max_rows_per_rank": budget})
        x = case.xs[r].to(DEV).clone().requires_grad_(True)
        idx, p = case.idxs[r].to(DEV), case.probs[r].to(DEV)
        first = eng.dispatch(x, idx, p, PendingCheck(None, None))
        args = _bad_static_input(which, x, idx, p) if r == bad_rank else \
            (x, idx, p, PendingCheck(None, None))
        res = eng.dispatch(*args)
        eng.combine(res.tokens_NH * 2, res.handle).sum().backward()
        try:
            raise_on_status(int(res.status.item()), [res.check])
            raised = None
        except DispatchInputError as exc:
            raised = str(exc)
        again = eng.dispatch(x.detach(), idx, p, PendingCheck(None, None))
        return dict(first=int(first.status.item()), status=int(res.status.item()),
                    raised=raised, rows=tuple(res.tokens_NH.shape),
                    again=again.tokens_NH.cpu(), again_status=int(again.status.item()))

    want = {"value": "bad ids", "host": "bad shape", "hidden": "does not fit"}[which]
    for r, res in enumerate(_run_ranks(R, fn)):
        assert res["first"] == 0 and res["status"] & STATUS_BAD_INPUT, (r, res)
        assert res["rows"] == (budget, 8), r  # the agreed shape, also on the bad rank
        assert res["raised"] and ((want in res["raised"]) == (r == bad_rank)), (r, res)
        tok_ref = reference_dispatch(case, r, None)[0]
        assert res["again_status"] == 0
        assert torch.equal(res["again"][:tok_ref.shape[0]], tok_ref), r


@sim_only
@needs_triton
def test_sim_static_first_call_agrees_and_raises_everywhere():
    """The static mode's first call agrees the hidden size: bad input then raises on every
    rank (as the default mode does), naming the error on the rank that had it."""
    R = 2
    case = make_case(R, [4, 4], hidden=8, num_experts=2 * R, topk=2)

    def fn(r, tr):
        eng = nvshmem._Engine(tr, case.num_experts, None, {"max_rows_per_rank": 16})
        bad = torch.tensor(1 if r == 0 else 0, device=DEV)
        try:
            eng.dispatch(case.xs[r].to(DEV), case.idxs[r].to(DEV), case.probs[r].to(DEV),
                         PendingCheck(None, bad, "bad ids"))
        except DispatchInputError as exc:
            return str(exc)
        return "no error"

    msgs = _run_ranks(R, fn)
    assert msgs[0] == "bad ids" and "another EP rank" in msgs[1], msgs


@sim_only
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_sim_back_to_back_dispatch_with_a_late_reader(impl):
    """Dispatches in a row with no barrier between them while one rank reads late: the next
    dispatch must stage into the other buffer set, not over rows a peer still reads."""
    R = 2
    cases = [make_case(R, [24 + 8 * ((r + it) % R) for r in range(R)], hidden=16,
                       num_experts=4 * R, topk=2, seed=100 + it, mask_frac=0.1)
             for it in range(3)]

    def fn(r, tr):
        eng = nvshmem._Engine(tr, 4 * R, None, {"impl": impl})
        outs = []
        for it, case in enumerate(cases):
            eng.before_pull = (lambda: time.sleep(0.3)) if r == it % R else None
            res = eng.dispatch(case.xs[r].to(DEV), case.idxs[r].to(DEV),
                               case.probs[r].to(DEV), PendingCheck(None, None))
            outs.append((res.tokens_NH.cpu(), res.probs_N.cpu()))
        return outs

    results = _run_ranks(R, fn)
    for it, case in enumerate(cases):
        for r in range(R):
            tok_ref, _, p_ref = reference_dispatch(case, r, None)
            assert torch.equal(results[r][it][0], tok_ref), (it, r)
            assert torch.equal(results[r][it][1], p_ref), (it, r)


_GRAPH_MODES = [("torch", False), pytest.param("triton", False, marks=needs_triton),
                pytest.param("triton", True, marks=needs_triton)]

# ``graph`` runs of the tests below trace the launches of every CPU "graph" replay (the
# stand-in reruns its body) and then require every tensor those launches name to be owned
# by the graph object, its arena or its transport. A real CUDA graph keeps raw addresses
# only: a buffer that lives just in a closure is freed after capture and overwritten by
# every replay (a bug that reached GPUs once).
_trace = threading.local()


class _TracedRerun(symm_graph.RerunBody):
    def __init__(self, body):
        super().__init__(body)
        self.named = set()

        def traced():
            _trace.named = self.named
            try:
                body()
            finally:
                _trace.named = None
        self.replay = traced


@pytest.fixture
def traced_graphs(monkeypatch):
    import triton.runtime.interpreter as interp_mod
    cls = interp_mod.InterpretedFunction
    run = cls.run

    def traced_run(self, *args, **kwargs):
        named = getattr(_trace, "named", None)
        if named is not None:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    named.add(a.untyped_storage().data_ptr())
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", traced_run)
    monkeypatch.setattr(symm_graph, "RerunBody", _TracedRerun)


def _unowned_graph_buffers(eng) -> list:
    """Storages named by the engine's graph replays that neither the graph object, its
    arena nor its transport holds."""
    def storages(obj, out):
        if isinstance(obj, torch.Tensor):
            out.add(obj.untyped_storage().data_ptr())
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                storages(o, out)
        elif isinstance(obj, dict):
            for o in obj.values():
                storages(o, out)
        return out

    bad = []
    for g in eng._graphs.values():
        if not g:
            continue
        a, tr = g.arena, eng.tr
        owned = storages([list(vars(g).values()), a.win.local, a.tables, a._views,
                          a._scratch, tr.status], set())
        named = set().union(*(getattr(x, "named", set()) for x in (g.graph, g.after)))
        bad += sorted(named - owned)
    return bad


@sim_only
@pytest.mark.parametrize("impl,graph", _GRAPH_MODES)
@pytest.mark.parametrize("pad", [None, 2])
def test_sim_speculative_pull_and_its_overflow(impl, graph, pad, traced_graphs):
    """Default mode, same shapes and row counts every call (one routing multiset, rows
    shuffled), new data: call 0 sizes the speculative buffer, calls 1-3 pull into it before
    the host knows the row count, calls 4-5 find it too small (forced to one row) and must
    fall back to an exact plan and pull. With ``graph`` the GPU's graph path runs (its
    "replays" rerun the captured body here): calls 2-3 replay the speculative graph, call 5
    the one-row graph, overflow included. Forward and backward of every call against the
    dense reference."""
    R = 2
    base = make_case(R, [9, 6], hidden=16, num_experts=4 * R, topk=3, seed=40, mask_frac=0.15)
    cases = []
    for it in range(6):
        case = make_case(R, [9, 6], hidden=16, num_experts=4 * R, topk=3, seed=41 + it)
        g = torch.Generator().manual_seed(it)
        case.idxs = [b[torch.randperm(b.shape[0], generator=g)] for b in base.idxs]
        cases.append(case)

    def fn(r, tr):
        eng = nvshmem._Engine(tr, 4 * R, pad, {"impl": impl})
        eng.host_graph = graph
        outs = []
        for it, case in enumerate(cases):
            if it >= 4:  # every rank's buffer one row: more rows than it holds
                eng._spec_rows = {k: 1 for k in eng._spec_rows}
            x = case.xs[r].to(DEV).clone().requires_grad_(True)
            p = case.probs[r].to(DEV).clone().requires_grad_(True)
            res = eng.dispatch(x, case.idxs[r].to(DEV), p, PendingCheck(None, None))
            y = eng.combine(_experts(case.W.to(DEV), r * 4, res.tokens_NH,
                                     res.tokens_per_expert_L, res.probs_N), res.handle)
            (y * case.gouts[r].to(DEV)).sum().backward()
            spare = res.tokens_NH.untyped_storage().nbytes() - \
                res.tokens_NH.numel() * res.tokens_NH.element_size()
            outs.append(dict(tokens=res.tokens_NH.detach().cpu(),
                             tpe=res.tokens_per_expert_L.cpu(), probs=res.probs_N.detach().cpu(),
                             y=y.detach().cpu(), gx=x.grad.cpu(), gp=p.grad.cpu(), spare=spare))
        assert not _unowned_graph_buffers(eng), "a graph names memory it does not own"
        if graph:  # every "before" graph replayed at least once; some "after" graph too
            gs = [g for g in eng._graphs.values() if g]
            assert all(g.graph.named for g in gs) and any(g.after.named for g in gs), \
                "nothing traced"
        return outs, sum(1 for v in eng._graphs.values() if v)

    results = _run_ranks(R, fn)
    for it, case in enumerate(cases):
        ys, gxs, gps = reference_moe(case)
        for r in range(R):
            res = results[r][0][it]
            tok_ref, tpe_ref, p_ref = reference_dispatch(case, r, pad)
            assert torch.equal(res["tpe"], tpe_ref), (it, r)
            assert torch.equal(res["tokens"], tok_ref), (it, r)
            assert torch.equal(res["probs"], p_ref), (it, r)
            assert rel_err(res["y"], ys[r]) < 1e-5, (it, r)
            assert rel_err(res["gx"], gxs[r]) < 1e-5, (it, r)
            assert rel_err(res["gp"], gps[r]) < 1e-5, (it, r)
            # speculative calls hand out the head of a larger buffer; the others are exact
            assert (res["spare"] > 0) == (it in (1, 2, 3)), (it, r, res["spare"])
    for r in range(R):
        assert results[r][1] == (2 if graph else 0), results[r][1]


@sim_only
@pytest.mark.parametrize("impl,graph", _GRAPH_MODES)
def test_sim_bad_input_during_a_speculative_pull(impl, graph):
    """A shape's second call pulls before the host sync; bad input on one rank must still
    raise on every rank, and the next call must be right."""
    R = 2
    cases = [make_case(R, [6, 5], hidden=8, num_experts=2 * R, topk=2, seed=70 + it)
             for it in range(3)]

    def fn(r, tr):
        eng = nvshmem._Engine(tr, 2 * R, None, {"impl": impl})
        eng.host_graph = graph
        out = []
        for it, case in enumerate(cases):
            bad = torch.tensor(1 if (it == 1 and r == 0) else 0)
            try:
                res = eng.dispatch(case.xs[r], case.idxs[r], case.probs[r],
                                   PendingCheck(None, bad, "bad ids"))
                out.append(res.tokens_NH.clone())
            except DispatchInputError as exc:
                out.append(str(exc))
        return out

    results = _run_ranks(R, fn)
    assert results[0][1] == "bad ids" and "rank(s) [0]" in results[1][1]
    for r in range(R):
        for it in (0, 2):
            assert torch.equal(results[r][it], reference_dispatch(cases[it], r, None)[0]), (r, it)


@sim_only
def test_sim_bad_input_raises_on_every_rank():
    R = 2
    case = make_case(R, [4, 4], hidden=8, num_experts=2 * R, topk=2)

    def fn(r, tr):
        eng = nvshmem._Engine(tr, case.num_experts, None, {"impl": "torch"})
        bad = torch.tensor(1 if r == 1 else 0)
        try:
            eng.dispatch(case.xs[r], case.idxs[r], case.probs[r], PendingCheck(None, bad, "bad ids"))
        except DispatchInputError as exc:
            return str(exc)
        return "no error"

    msgs = _run_ranks(R, fn)
    assert msgs[1] == "bad ids"
    assert "rank(s) [1]" in msgs[0]


def test_device_plan_orders_pads_and_drops():
    lid = torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0]])
    pos, tpe, dropped = nvshmem.device_plan(lid, 2, 4, budget=10)
    # expert 0: slots (1,0), (3,1) -> rows 0, 1 (+2 padding); expert 1: (0,0), (1,1), (3,0) -> 4, 5, 6
    assert pos.tolist() == [[4, -1], [0, 5], [-1, -1], [6, 1]]
    assert tpe.tolist() == [4, 4] and not bool(dropped)
    assert nvshmem.filled_rows(pos, 10).tolist() == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    pos, tpe, dropped = nvshmem.device_plan(lid, 2, 4, budget=5)
    assert pos.tolist() == [[4, -1], [0, -2], [-1, -1], [-2, 1]]
    assert tpe.tolist() == [4, 1] and bool(dropped)
    assert nvshmem.filled_rows(pos, 5).tolist() == [1, 1, 0, 0, 1]



def test_backend_reports_why_it_is_unavailable():
    import moe_dispatch
    from moe_dispatch.protocol import BackendConfig
    reason = nvshmem.NVSHMEMBackend.availability()
    listed = moe_dispatch.available_backends()["nvshmem"]
    if torch.cuda.is_available() and HAS_TRITON:
        assert reason is None and listed == "available"
        return
    assert isinstance(reason, str) and reason and listed == reason
    with pytest.raises(RuntimeError, match="nvshmem backend"):
        nvshmem.NVSHMEMBackend(BackendConfig(None, 8))


# ===================================================================== fused layout / stage


def _layout_case(R, T_cap, K, E, rank, g, skew=False, empty_rank=None, mask_frac=0.2):
    """Every rank's staged ids [T_cap * K] int32 (global expert ids, -1 masked/padding)."""
    idx = []
    for s in range(R):
        if skew:  # most slots on two experts of this rank
            w = torch.ones(E)
            w[rank * (E // R)] = 50.0
            w[(rank + 1) * (E // R) - 1] = 20.0
            ids = torch.multinomial(w, T_cap * K, replacement=True, generator=g)
        else:
            ids = torch.randint(0, E, (T_cap * K,), generator=g)
        ids[torch.rand(T_cap * K, generator=g) < mask_frac] = -1
        n_tok = int(torch.randint(0, T_cap + 1, (1,), generator=g))  # padding rows after T
        ids.view(T_cap, K)[n_tok:] = -1
        if s == empty_rank:
            ids.fill_(-1)
        idx.append(ids.to(torch.int32).to(DEV))
    return idx


@needs_triton
@pytest.mark.parametrize("R,T_cap,K,E,pad,budget,skew,empty,tiles", [
    (4, 40, 3, 16, None, None, False, None, (16, 3)),   # several chunks and blocks per rank
    (3, 24, 2, 9, 4, None, True, 1, (16, 2)),           # L=3 (not a power of 2), zero-token rank
    (2, 32, 4, 8, 2, 20, False, None, (32, 1)),          # budget drops rows
    (1, 20, 3, 5, 3, 7, True, None, None),               # one rank, default tiling, drops
    (4, 16, 2, 8, None, 1 << 62, False, 0, (16, 1)),
])
def test_fused_layout_matches_device_plan(R, T_cap, K, E, pad, budget, skew, empty, tiles):
    from moe_dispatch.kernels import _triton
    g = torch.Generator().manual_seed(1234 + R * 7 + T_cap)
    L = E // R
    for rank in range(R):
        idx = _layout_case(R, T_cap, K, E, rank, g, skew=skew, empty_rank=empty)
        metas = [torch.randint(-5, 1000, (16,), generator=g).to(DEV) for _ in range(R)]
        status = torch.tensor([8], dtype=torch.int32, device=DEV)
        b = (1 << 62) if budget is None else budget
        # reference: the torch layout + device_plan
        ids = torch.stack(idx).view(R * T_cap, K).long()
        e0 = rank * L
        lid = torch.where((ids >= e0) & (ids < e0 + L), ids - e0, -1)
        pos_ref, tpe_ref, dropped_ref = nvshmem.device_plan(lid, L, pad, b)
        # fused kernels, poisoned outputs
        pos = torch.full((R * T_cap * K,), 777, dtype=torch.int64, device=DEV)
        host = torch.full((R * 16 + L + 2,), 777, dtype=torch.int64, device=DEV)
        itab = torch.tensor([t.data_ptr() for t in idx], dtype=torch.int64, device=DEV)
        mtab = torch.tensor([t.data_ptr() for t in metas], dtype=torch.int64, device=DEV)
        block, ncp = tiles if tiles else (None, None)
        _triton.layout_plan(itab, mtab, status, T_cap * K, e0, L, pad or 1, b, pos, host,
                            block=block, chunks_per_src=ncp)
        assert torch.equal(pos.view(R * T_cap, K), pos_ref), (rank, pos.view(-1, K), pos_ref)
        assert torch.equal(host[:R * 16].view(R, 16), torch.stack(metas)), rank
        assert torch.equal(host[R * 16:R * 16 + L], tpe_ref), (rank, host, tpe_ref)
        assert int(host[R * 16 + L]) == int(dropped_ref), rank
        assert int(host[-1]) == 8


@needs_triton
@pytest.mark.parametrize("R,T_cap,K,E,pad,budget,tiles,metas_kind", [
    (4, 40, 3, 16, None, 200, (16, 3), "fine"),      # nothing dropped, several chunks
    (2, 32, 4, 8, 2, 20, (32, 1), "fine"),           # rows dropped over the budget
    (3, 24, 2, 9, 4, 64, (16, 2), "clipped"),        # a rank had more tokens than T_cap
    (1, 20, 3, 5, 3, 7, None, "bad"),                # bad input, drops, default tiling
])
def test_fused_layout_static_filled_and_status(R, T_cap, K, E, pad, budget, tiles,
                                               metas_kind):
    """The static budget's row mask and status word come out of the layout launches equal
    to ``filled_rows`` and ``nvshmem.static_status`` on the same plan."""
    from moe_dispatch.kernels import _triton
    from moe_dispatch.permute import filled_rows
    g = torch.Generator().manual_seed(99 + R * 5 + T_cap)
    L = E // R
    for rank in range(R):
        idx = _layout_case(R, T_cap, K, E, rank, g, skew=True)
        metas = [torch.zeros(16, dtype=torch.int64) for _ in range(R)]
        for s, m in enumerate(metas):
            m[0] = T_cap + (3 if metas_kind == "clipped" and s == R - 1 else -s)
            m[1] = 2 if metas_kind == "bad" and s == 0 else 0
        metas = [m.to(DEV) for m in metas]
        own = torch.tensor([8 if rank == 0 else 0], dtype=torch.int32, device=DEV)
        pos = torch.full((R * T_cap * K,), 777, dtype=torch.int64, device=DEV)
        host = torch.full((R * 16 + L + 2,), 777, dtype=torch.int64, device=DEV)
        filled = torch.full((budget,), 7, dtype=torch.uint8, device=DEV)
        status = torch.full((1,), -1, dtype=torch.int32, device=DEV)
        itab = torch.tensor([t.data_ptr() for t in idx], dtype=torch.int64, device=DEV)
        mtab = torch.tensor([t.data_ptr() for t in metas], dtype=torch.int64, device=DEV)
        block, ncp = tiles if tiles else (None, None)
        _triton.layout_plan(itab, mtab, own, T_cap * K, rank * L, L, pad or 1, budget, pos,
                            host, block=block, chunks_per_src=ncp, filled_out=filled,
                            status_out=status, token_cap=T_cap)
        dropped = host[R * 16 + L].bool()
        assert torch.equal(filled, filled_rows(pos.view(R * T_cap, K), budget)), rank
        ref = nvshmem.static_status(torch.stack(metas), dropped, own, T_cap)
        assert torch.equal(status, ref), (rank, status, ref)
        assert int(host[-1]) == int(own[0])  # the host buffer still gets the own word


@needs_triton
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("T,T_cap,K,H,dtype", [
    (5, 8, 3, 24, torch.float32), (0, 8, 2, 16, torch.float16), (8, 8, 1, 40, torch.float32)])
def test_fused_stage_matches_torch(T, T_cap, K, H, dtype, indirect):
    from moe_dispatch.kernels import _triton
    g = torch.Generator().manual_seed(T * 31 + H)
    x = torch.randn(T, H, generator=g).to(dtype).to(DEV)
    idx = torch.randint(-1, 9, (T, K), generator=g).to(DEV)
    probs = torch.rand(T, K, generator=g).to(DEV)
    x_out = torch.full((T_cap, H), float("nan"), dtype=dtype, device=DEV)
    idx_out = torch.full((T_cap, K), 99, dtype=torch.int32, device=DEV)
    p_out = torch.full((T_cap, K), float("nan"), device=DEV)
    meta = torch.full((16,), 55, dtype=torch.int64, device=DEV)
    code = torch.tensor(1, dtype=torch.int64, device=DEV)
    if indirect:
        # Inputs reached through the address table; the tensors passed are decoys of the
        # same dtypes, filled with values that must not show up in the output.
        table = torch.tensor([t.data_ptr() for t in (x, idx, probs, code)], dtype=torch.int64,
                             device=DEV)
        decoys = (torch.full_like(x, 7), torch.full_like(idx, 5), torch.full_like(probs, 9),
                  torch.zeros_like(code))
        _triton.stage(*decoys[:3], T, x_out, idx_out, p_out, meta, decoys[3], T,
                      H * x.element_size(), src_table=table)
    else:
        _triton.stage(x, idx, probs, T, x_out, idx_out, p_out, meta, code, T,
                      H * x.element_size())
    assert torch.equal(x_out[:T], x)
    assert x_out[T:].isnan().all()  # rows past the tokens are never written
    assert torch.equal(idx_out[:T], idx.to(torch.int32)) and (idx_out[T:] == -1).all()
    # rows past the tokens get prob 0 with their -1 ids (rows are staged K_cap wide)
    assert torch.equal(p_out[:T], probs) and (p_out[T:] == 0).all()
    assert meta[:5].tolist() == [T, 1, H * x.element_size(), K, 1] and (meta[5:] == 55).all()


@needs_triton
@pytest.mark.parametrize("T,T_cap,K,R,E", [(37, 40, 3, 4, 16), (20, 16, 2, 3, 9), (9, 16, 8, 1, 5),
                                           (0, 8, 2, 2, 4)])
def test_fused_token_maps_match_torch(T, T_cap, K, R, E):
    g = torch.Generator().manual_seed(T * 13 + K)
    idx = torch.randint(-1, E + 2, (T, K), generator=g).to(DEV)  # -1 and out-of-range ids
    out = {}
    for impl in ("torch", "triton"):
        eng = nvshmem._Engine.__new__(nvshmem._Engine)
        eng.R, eng.L, eng.E, eng.impl = R, E // R, E, impl
        out[impl] = eng._token_maps(idx, min(T, T_cap), T_cap)
    assert torch.equal(out["triton"][0], out["torch"][0])
    assert torch.equal(out["triton"][1], out["torch"][1])


@needs_triton
@pytest.mark.parametrize("T,T_cap,K,R,E", [(37, 40, 3, 4, 16), (0, 8, 2, 2, 4)])
def test_token_maps_through_an_address_table(T, T_cap, K, R, E):
    """The graph-replay form reads idx and writes both maps through a table; the tensors
    passed as arguments are decoys that must stay untouched."""
    from moe_dispatch.kernels import _triton
    g = torch.Generator().manual_seed(T + 5)
    idx = torch.randint(-1, E + 2, (T, K), generator=g).to(DEV)
    ref_v = torch.empty(T, K, dtype=torch.bool, device=DEV)
    ref_p = torch.empty(T, R, dtype=torch.int64, device=DEV)
    _triton.token_maps(idx, min(T, T_cap), E, E // R, T_cap, R, ref_v, ref_p)
    valid = torch.zeros(T, K, dtype=torch.bool, device=DEV)
    pos = torch.full((T, R), 99, dtype=torch.int64, device=DEV)
    table = torch.tensor([idx.data_ptr(), valid.data_ptr(), pos.data_ptr()], dtype=torch.int64,
                         device=DEV)
    d_idx, d_v, d_p = torch.zeros_like(idx), torch.zeros_like(valid), torch.full_like(pos, 7)
    _triton.token_maps(d_idx, min(T, T_cap), E, E // R, T_cap, R, d_v, d_p, io_table=table)
    assert torch.equal(valid, ref_v) and torch.equal(pos, ref_p)
    assert not d_v.any() and (d_p == 7).all()


@needs_triton
@pytest.mark.parametrize("R,T_cap,K,H,dtype", [(3, 8, 3, 24, torch.float32),
                                               (2, 16, 4, 40, torch.float16)])
def test_pull_through_an_address_table(R, T_cap, K, H, dtype):
    """The pull's graph-replay form writes rows, probs and a copy of the plan through an
    address table, exactly what the direct launch writes (decoy outputs untouched)."""
    from moe_dispatch.kernels import _triton
    g = torch.Generator().manual_seed(R * 7 + H)
    xs = [torch.randn(T_cap, H, generator=g).to(dtype).to(DEV) for _ in range(R)]
    ps = [torch.rand(T_cap, K, generator=g).to(DEV) for _ in range(R)]
    V = R * T_cap
    # Each slot lands on its own output row or nowhere (-1): a random injective plan.
    slots = torch.randperm(V * K, generator=g)
    M = V * K // 2
    pos = torch.where(slots < M, slots, -1).view(V, K).to(DEV)
    src = torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64, device=DEV)
    pin = torch.tensor([p.data_ptr() for p in ps], dtype=torch.int64, device=DEV)
    ref = torch.zeros(M, H, dtype=dtype, device=DEV)
    ref_p = torch.zeros(M, device=DEV)
    _triton.peer_scatter_rows(src, T_cap, 1, pos, ref, pin, ref_p)
    out = torch.zeros(M, H, dtype=dtype, device=DEV)
    out_p = torch.zeros(M, device=DEV)
    pos_copy = torch.full_like(pos, 5)
    table = torch.tensor([out.data_ptr(), out_p.data_ptr(), pos_copy.data_ptr()],
                         dtype=torch.int64, device=DEV)
    d_out, d_p = torch.zeros(1, H, dtype=dtype, device=DEV), torch.zeros(1, device=DEV)
    _triton.peer_scatter_rows(src, T_cap, 1, pos, d_out, pin, d_p, dst_table=table)
    assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
    assert torch.equal(pos_copy, pos)
    assert not d_out.any() and not d_p.any()
    with pytest.raises(ValueError, match="needs probs"):
        _triton.peer_scatter_rows(src, T_cap, 1, pos, d_out, dst_table=table)
