"""The one-launch value check (``moe_dispatch.kernels._check``) against the torch path of
``routing.canonicalize``, on CPU under TRITON_INTERPRET=1 (for real on a GPU machine).

Both must flag exactly the same inputs (ids outside [-1, E); probs NaN, +-inf or negative
as float32, masked slots included; -0.0 is fine), return the same ids (bad ones -> -1, as
int64) and leave nothing behind between calls (the multi-program ticket resets itself).
"""
import os

import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402,F401

from moe_dispatch import kernels, routing  # noqa: E402
from moe_dispatch.protocol import PendingCheck  # noqa: E402


NAN, INF = float("nan"), float("inf")
E = 6

# (name, slot (t, k) to poison, id or None, prob or None, flagged?)
POISON = [
    ("ok", None, None, None, False),
    ("id_minus_two", (1, 0), -2, None, True),
    ("id_E", (2, 1), E, None, True),
    ("id_E_plus_5", (0, 2), E + 5, None, True),
    ("id_huge", (3, 0), 2 ** 40, None, True),
    ("nan", (1, 1), None, NAN, True),
    ("pos_inf", (2, 2), None, INF, True),
    ("neg_inf", (0, 0), None, -INF, True),
    ("neg_zero", (3, 1), None, -0.0, False),
    ("negative", (1, 2), None, -1e-3, True),
    ("masked_garbage", (2, 0), -1, 0.7, False),
    ("masked_nan", (2, 0), -1, NAN, True),  # masked slots are checked like any other
    ("masked_negative", (0, 1), -1, -2.0, True),
]


def _case(name, idx_dtype, p_dtype, T=4, K=3, seed=0):
    _, slot, bad_id, bad_p, flagged = next(c for c in POISON if c[0] == name)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, E, (T, K), generator=g)
    p = torch.rand(T, K, generator=g)
    if slot is not None:
        if bad_id is not None:
            idx[slot] = bad_id
        if bad_p is not None:
            p[slot] = bad_p
    if idx_dtype != torch.int64 and name == "id_huge":
        idx[slot] = torch.iinfo(idx_dtype).max  # still >= E
    return idx.to(idx_dtype), p.to(p_dtype), flagged


def _torch_check(idx, p):
    return routing._check_topk(idx, p, p.float(), E)


def _fused_check(idx, p, block):
    from moe_dispatch.kernels import _check
    return _check.check_values(idx.to(DEV), p.to(DEV), E, block=block)


@needs_triton
@pytest.mark.parametrize("block", [2048, 4])  # one program; several (the ticket path)
@pytest.mark.parametrize("idx_dtype,p_dtype", [
    (torch.int64, torch.float32), (torch.int32, torch.bfloat16), (torch.int32, torch.float16),
    (torch.int16, torch.float64)])
@pytest.mark.parametrize("name", [c[0] for c in POISON])
def test_fused_check_matches_torch(block, idx_dtype, p_dtype, name):
    idx, p, flagged = _case(name, idx_dtype, p_dtype)
    want_idx, want_bad = _torch_check(idx, p)
    got_idx, got_bad = _fused_check(idx, p, block)
    assert want_bad.dtype == got_bad.dtype == torch.int64 and got_bad.dim() == 0
    assert int(want_bad) == int(got_bad) == int(flagged), name
    assert got_idx.dtype == torch.int64 and torch.equal(got_idx.cpu(), want_idx)
    if name.startswith("id_"):
        assert (got_idx >= -1).all() and (got_idx < E).all()


@needs_triton
def test_fused_check_leaves_no_state_between_calls():
    # Alternate bad and good inputs over many programs: a stale verdict or ticket would
    # flag a good call or miss a bad one.
    from moe_dispatch.kernels import _check
    for i in range(6):
        idx, p, _ = _case("ok", torch.int64, torch.float32, T=9, K=5, seed=i)
        if i % 2:
            p[8, 4] = NAN
        _, bad = _fused_check(idx, p, 4)  # 12 programs
        assert int(bad) == i % 2
        assert all(s.tolist() == [0, 0] for s in _check._scratch.values())


@needs_triton
def test_fused_check_probs_only_and_non_contiguous():
    from moe_dispatch.kernels import _check
    p = torch.rand(5, 8)
    assert _check.check_values(None, p.to(DEV), 0, block=8)[0] is None
    assert int(_check.check_values(None, p.to(DEV), 0, block=8)[1]) == 0
    p[4, 7] = -INF
    assert int(_check.check_values(None, p.to(DEV), 0, block=8)[1]) == 1
    # a transposed (non-contiguous) view is read in its logical order
    idx, q, _ = _case("id_E", torch.int64, torch.float32, T=4, K=3)
    got_idx, bad = _check.check_values(idx.t().to(DEV), q.t().to(DEV), E, block=4)
    want_idx, want_bad = _torch_check(idx.t(), q.t())
    assert int(bad) == int(want_bad) == 1 and torch.equal(got_idx.cpu(), want_idx)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="forces the kernel onto CPU tensors: interpreter only")
@pytest.mark.parametrize("form", ["topk", "dense"])
def test_canonicalize_fused_path_equals_torch_path(monkeypatch, form):
    """canonicalize through the kernel (forced on CPU tensors) == the torch path."""
    results = []
    for fused in (False, True):
        if fused:
            monkeypatch.setattr(kernels, "use_triton", lambda t: True)
        out = []
        for name in [c[0] for c in POISON]:
            idx, p, flagged = _case(name, torch.int32, torch.bfloat16)
            x = torch.randn(4, 8)
            if form == "topk":
                got = routing.canonicalize(x, E, topk_idx=idx, topk_probs=p)
            else:
                if name.startswith("id_") or name.startswith("masked"):
                    continue
                rm, pd = routing.topk_to_dense(idx.long().clamp(min=-1), p.float(), E)
                pd = torch.where(rm, pd, 0.0)
                if name in ("nan", "pos_inf", "neg_inf", "negative"):
                    pd[0, 0] = p.float()[next(c for c in POISON if c[0] == name)[1]]
                got = routing.canonicalize(x, E, routing_map=rm, probs=pd, topk=3)
            x_TH, idx_TK, probs_TK, check = got
            assert check.device_bad.dtype == torch.int64
            assert int(check.device_bad) == int(flagged), (fused, name)
            out.append((idx_TK, probs_TK, int(check.device_bad)))
        results.append(out)
    for (i0, p0, b0), (i1, p1, b1) in zip(*results):
        assert b0 == b1 and torch.equal(i0, i1) and i1.dtype == torch.int64
        assert torch.allclose(p0, p1, rtol=0, atol=0, equal_nan=True)
        assert p1.dtype == torch.float32


def test_canonicalize_passes_canonical_inputs_through():
    x = torch.randn(5, 4)
    idx = torch.tensor([[0, -1], [1, 2], [-1, -1], [3, 0], [2, 1]])
    p = torch.rand(5, 2)  # garbage in masked slots is kept (backends ignore it)
    x_TH, idx_TK, probs_TK, check = routing.canonicalize(x, 4, topk_idx=idx, topk_probs=p,
                                                         check_values=False)
    assert x_TH is x and idx_TK is idx and probs_TK is p and check.device_bad is None
    _, idx_TK, probs_TK, check = routing.canonicalize(x, 4, topk_idx=idx, topk_probs=p)
    assert probs_TK is p and torch.equal(idx_TK, idx) and int(check.device_bad) == 0
    # zero tokens: nothing to check, no tensor made
    _, idx0, _, check0 = routing.canonicalize(torch.zeros(0, 4), 4,
                                              topk_idx=torch.zeros(0, 2, dtype=torch.int32),
                                              topk_probs=torch.zeros(0, 2))
    assert check0.device_bad is None and idx0.dtype == torch.int64 and idx0.shape == (0, 2)


def test_code_reuses_the_flag():
    bad = torch.tensor(1)
    check = PendingCheck(None, bad, "x")
    assert check.code(bad.device) is bad  # no new tensor, no launch
    assert int(PendingCheck(None, torch.tensor(True)).code(torch.device("cpu"))) == 1
    assert int(PendingCheck(None, torch.tensor(3, dtype=torch.int32)).code(
        torch.device("cpu"))) == 1
    z = PendingCheck(None, None).code(torch.device("cpu"))
    assert int(z) == 0 and PendingCheck(None, None).code(torch.device("cpu")) is z
    assert int(PendingCheck("shape", None).code(torch.device("cpu"))) == 2


def test_single_process_masked_garbage_probs_get_no_weight_nor_grad():
    from moe_dispatch.testing import local_experts, make_case, reference_moe, rel_err
    from token_dispatcher import MoETokenDispatcher
    case = make_case(1, [20], hidden=6, num_experts=5, topk=3, mask_frac=0.4, masked_prob=0.7)
    assert (case.probs[0][case.idxs[0] < 0] == 0.7).all()
    x = case.xs[0].clone().requires_grad_(True)
    p = case.probs[0].clone().requires_grad_(True)
    y = MoETokenDispatcher(5)(x, local_experts(case.W, 0), topk_idx=case.idxs[0], topk_probs=p)
    (y * case.gouts[0]).sum().backward()
    ys, gx, gp = reference_moe(case)
    assert rel_err(y, ys[0]) < 1e-6 and rel_err(x.grad, gx[0]) < 1e-6
    assert rel_err(p.grad, gp[0]) < 1e-6 and (p.grad[case.idxs[0] < 0] == 0).all()


needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                reason="needs a CUDA GPU and triton")


@needs_cuda
def test_fused_check_two_streams_and_graph_replay():
    """Per-stream scratch: concurrent streams never mix verdicts; a captured check takes
    its own scratch and gives the right flag on every replay."""
    from moe_dispatch.kernels import _check
    dev = torch.device("cuda")
    idx = torch.randint(-1, 256, (20000, 8), device=dev)
    good = torch.rand(20000, 8, device=dev)
    bad = good.clone()
    bad[-1, -1] = NAN
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    outs = []
    torch.cuda.synchronize()
    for _ in range(100):
        with torch.cuda.stream(s1):
            outs.append((0, _check.check_values(idx, good, 256, block=256)[1]))
        with torch.cuda.stream(s2):
            outs.append((1, _check.check_values(idx, bad, 256, block=256)[1]))
    torch.cuda.synchronize()
    assert all(int(b) == want for want, b in outs)
    static_p = good.clone()
    with torch.cuda.stream(s1):
        _check.check_values(idx, static_p, 256, block=256)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, flag = _check.check_values(idx, static_p, 256, block=256)
    for it in range(6):
        static_p.copy_(bad if it % 2 else good)
        graph.replay()
        torch.cuda.synchronize()
        assert int(flag) == it % 2
    assert int(_check.check_values(idx, good, 256, block=256)[1]) == 0
