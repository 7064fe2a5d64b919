"""The budget mode's fused kernels against their torch references, bit for bit.

On CPU the kernels run under TRITON_INTERPRET=1 (for real on a GPU machine), on fresh random
routing each run (the seed is in every failure message):

* ``triton_budget_plan`` == ``budget_plan`` (the counting sort over a plain id matrix);
* the send side, ``budget.pack_meta(fused=True)`` == its torch reference: the metadata
  blocks (rows, zeros past the tokens, header rows), the send plan, the probs' gradient;
* the receive side, ``budget.receive_plan(fused=True)`` == its torch reference on the
  blocks R simulated ranks exchange: the plan, the probs, the status word (headers with bad
  input / clipped tokens, rows dropped over the budget);
* one whole single-process dispatch + combine + backward with the fused path forced on.

Small tiles are forced where a kernel has them, so chunk and tile boundaries are crossed.
"""
import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402,F401

from moe_dispatch import kernels  # noqa: E402
from moe_dispatch.backends import budget  # noqa: E402
from moe_dispatch.backends.budget import LocalInput  # noqa: E402
from moe_dispatch.permute import budget_plan, triton_budget_plan  # noqa: E402
from moe_dispatch.protocol import (STATUS_BAD_INPUT, STATUS_ROWS_DROPPED,  # noqa: E402
                                   STATUS_TOKENS_DROPPED, BudgetCheck)

PLAN_FIELDS = ("pos_NK", "filled_M", "tokens_per_expert_L", "dropped")


def _seed():
    return int(torch.randint(0, 2 ** 31 - 1, (1,)))


def _ids(T, K, E, g, mask=0.2, skew=False, top=False):
    """[T, K] int64 global ids: uniform, skewed (most slots on two experts), or near E."""
    if skew:
        w = torch.ones(E)
        w[0], w[E - 1] = 60.0, 25.0
        ids = torch.multinomial(w, max(T * K, 1), replacement=True, generator=g)[:T * K]
    elif top:
        ids = torch.randint(max(E - 3, 0), E, (T * K,), generator=g)
    else:
        ids = torch.randint(0, E, (T * K,), generator=g)
    ids[torch.rand(T * K, generator=g) < mask] = -1
    return ids.view(T, K)


def _same_plan(a, b, what):
    for f in PLAN_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), (what, f, x, y)
    assert (a.num_out_rows, a.num_in_rows, a.topk) == (b.num_out_rows, b.num_in_rows, b.topk)


# ------------------------------------------------------------------ budget_plan


@needs_triton
@pytest.mark.parametrize("N,K,L,B,pad,mask,skew,tiles,form", [
    (37, 3, 5, 64, None, 0.2, False, (16, 3), "int64"),   # chunk + block boundaries
    (40, 2, 4, 24, 4, 0.1, True, (16, 2), "int64"),       # skewed: overflow, padding
    (64, 8, 16, 96, 8, 0.05, True, None, "int32"),        # default tiling, drops
    (21, 4, 3, 200, None, 0.3, False, (16, 4), "strided"),  # a non-contiguous view
    (9, 2, 4, 8, 2, 1.0, False, None, "int64"),           # every slot masked
    (0, 3, 4, 8, 2, 0.0, False, None, "int64"),           # no rows
])
def test_budget_plan_fused_matches_torch(N, K, L, B, pad, mask, skew, tiles, form):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    lid = _ids(N, K, L, g, mask, skew)
    ref = budget_plan(lid, L, B, pad)
    dev_lid = lid.to(DEV)
    if form == "int32":
        dev_lid = dev_lid.to(torch.int32)
    elif form == "strided":
        dev_lid = dev_lid.t().contiguous().t()
    block, chunks = tiles or (None, None)
    got = triton_budget_plan(dev_lid, L, B, pad, block=block, chunks=chunks)
    _same_plan(got, ref, seed)


# ------------------------------------------------------------------ send side


def _inp(T, K, E, g, code=0, clipped=False, **kw):
    idx = _ids(T, K, E, g, **kw).to(DEV)
    probs = torch.rand(T, K, generator=g).to(DEV).requires_grad_(True)
    x = torch.zeros(T, 4, device=DEV)
    return LocalInput(x, idx, probs, torch.tensor(code, device=DEV), T, clipped,
                      BudgetCheck(None))


def _grad(meta, probs, g):
    gm = torch.randn(meta.shape, generator=g).to(meta.device)
    return torch.autograd.grad((meta * gm).sum(), probs)[0]


@needs_triton
@pytest.mark.parametrize("R,T,C,K,L,kw,code,clipped,tiles", [
    (4, 37, 40, 3, 4, dict(mask=0.2), 0, False, (16, 16)),     # tile boundaries, 4 blocks
    (3, 30, 32, 2, 3, dict(skew=True), 1, True, (16, 32)),     # skewed, header bits
    (2, 24, 24, 4, 5, dict(top=True), 2, False, None),         # ids near E, T == C
    (1, 20, 33, 3, 7, dict(mask=0.5), 0, True, (16, 64)),      # one rank
    (4, 0, 8, 2, 2, dict(), 0, False, None),                   # no tokens
    (2, 0, 0, 2, 2, dict(), 1, True, None),                    # no rows: headers only
])
@pytest.mark.parametrize("per_rank", [True, False], ids=["alltoall", "allgather"])
def test_pack_meta_fused_matches_torch(R, T, C, K, L, kw, code, clipped, tiles, per_rank):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    E = R * L
    inp = _inp(T, K, E, g, code, clipped, **kw)
    ranks = (E, L) if per_rank else (None, None)
    ref_plan, ref = budget.pack_meta(inp, C, *ranks, fused=False)
    plan, meta = budget.pack_meta(inp, C, *ranks, fused=True)
    assert meta.dtype == ref.dtype and torch.equal(meta, ref), (seed, meta, ref)
    if per_rank:
        _same_plan(plan, ref_plan, seed)
        assert plan.num_out_rows == R * C
    else:
        assert plan is None and ref_plan is None
    gseed = _seed()
    assert torch.equal(_grad(meta, inp.probs_TK, torch.Generator().manual_seed(gseed)),
                       _grad(ref, inp.probs_TK, torch.Generator().manual_seed(gseed))), seed
    if tiles:  # the same through small tiles (kernels.pack_meta directly)
        blocks = R if per_rank else 1
        tiled, maps = kernels.pack_meta(inp.idx_TK, inp.probs_TK, inp.code, clipped, E, L,
                                        blocks, C, per_rank, *tiles)
        assert torch.equal(tiled, ref), (seed, tiles)
        if per_rank:
            assert torch.equal(maps[0], ref_plan.pos_NK), (seed, tiles)


# ------------------------------------------------------------------ receive side


def _exchange(R, T_r, C, K, L, g, per_rank, codes, clips, **kw):
    """What each of R simulated ranks receives: [R, C + 1, 2K] blocks (torch pack)."""
    E = R * L
    metas = []
    for s in range(R):
        inp = _inp(T_r[s], K, E, g, codes[s], clips[s], **kw)
        metas.append(budget.pack_meta(inp, C, *((E, L) if per_rank else (None, None)),
                                      fused=False)[1].detach())
    if per_rank:  # all-to-all: rank me gets block me of every sender
        return [torch.stack([m[me] for m in metas]) for me in range(R)]
    gathered = torch.stack([m[0] for m in metas])  # all-gather: everyone gets every block
    return [gathered] * R


@needs_triton
@pytest.mark.parametrize("R,T_r,C,K,L,B,pad,kw,codes,clips,tiles", [
    (4, [37, 0, 12, 40], 40, 3, 4, 200, None, dict(mask=0.2), [0] * 4, [0] * 4, (16, 3)),
    (3, [20, 24, 9], 24, 2, 3, 16, 4, dict(skew=True), [0, 1, 0], [0, 0, 1], (32, 2)),
    (2, [16, 16], 16, 4, 5, 40, 2, dict(top=True), [2, 0], [1, 0], None),
    (1, [33], 33, 3, 7, 24, None, dict(mask=0.1), [0], [1], (16, 4)),
    (2, [0, 0], 0, 2, 2, 8, None, dict(), [0, 1], [0, 0], None),   # no rows: headers only
])
@pytest.mark.parametrize("per_rank", [True, False], ids=["alltoall", "allgather"])
def test_receive_plan_fused_matches_torch(R, T_r, C, K, L, B, pad, kw, codes, clips, tiles,
                                          per_rank):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    received = _exchange(R, T_r, C, K, L, g, per_rank, codes, clips, **kw)
    for me in sorted({0, R - 1}):  # the first rank and one with an expert offset
        meta = received[me]
        ref, ref_probs, ref_status = budget.receive_plan(meta, K, me * L, L, B, pad,
                                                         fused=False)
        plan, probs, status = budget.receive_plan(meta, K, me * L, L, B, pad, fused=True)
        what = (seed, me)
        _same_plan(plan, ref, what)
        assert torch.equal(probs, ref_probs), what
        assert status.dtype == torch.int32 and torch.equal(status, ref_status), \
            (what, status, ref_status)
        bits = int(status)
        assert bool(bits & STATUS_BAD_INPUT) == any(codes), what
        assert bool(bits & STATUS_TOKENS_DROPPED) == any(clips), what
        assert bool(bits & STATUS_ROWS_DROPPED) == bool(ref.dropped), what
        if tiles:
            pos, filled, tpe, dropped, st = kernels.budget_arrays(
                meta, K, C, L, B, pad or 1, shift=me * L + 1, header=True,
                block=tiles[0], chunks=tiles[1])
            assert torch.equal(pos, ref.pos_NK) and torch.equal(filled, ref.filled_M), what
            assert torch.equal(tpe, ref.tokens_per_expert_L), what
            assert torch.equal(st, ref_status), what


@needs_triton
@pytest.mark.parametrize("wire", [False, True], ids=["plain", "fp8"])
def test_scatter_reads_strided_probs(wire):
    """The received probs are a strided view of the metadata rows: the scatter kernels read
    them in place (no copy launch), with the results of a contiguous copy."""
    from moe_dispatch.kernels import _fp8, fp8
    g = torch.Generator().manual_seed(_seed())
    N, K, H = 11, 3, 128
    meta = torch.rand(N, 2 * K + 1, generator=g).to(DEV)
    probs = meta[:, K:2 * K]  # row stride 2K + 1
    plan = triton_budget_plan(_ids(N, K, 4, g).to(DEV), 4, 24, 2)
    outs = []
    for p in (probs, probs.contiguous()):
        if wire:
            packed = fp8.pack(*fp8.quantize_reference(torch.randn(N, H, generator=g)))
            tok = torch.empty(24, H, device=DEV)
            pr = torch.full((24,), float("nan"), device=DEV)
            _fp8.scatter(packed.to(DEV), H, plan.pos_NK, out_MH=tok, probs_NK=p, probs_M=pr,
                         filled_M=plan.filled_M)
        else:
            pr = kernels.permute(torch.zeros(N, H, device=DEV), p, plan)[1]
        outs.append(pr)
    assert probs.stride(0) == 2 * K + 1 and torch.equal(outs[0], outs[1])


def test_fused_budget_decides_by_device(monkeypatch):
    """Both backends take the fused path exactly where the permute kernels run."""
    assert not budget.fused_budget(torch.zeros(2))
    if torch.cuda.is_available() and HAS_TRITON:
        assert budget.fused_budget(torch.zeros(2, device="cuda"))
        monkeypatch.setenv("MOE_DISPATCH_TRITON", "0")
        assert not budget.fused_budget(torch.zeros(2, device="cuda"))


# ------------------------------------------------------------------ a whole dispatch


def force_paths(mp, fused):
    """Route one dispatch through the fused budget kernels (``fused``) or through the torch
    reference for the metadata and plans. The permute kernels run on both paths (on CPU
    interpreted), so the combine's float32 sums are taken in the same order and every
    output, gradients included, must be equal bit for bit."""
    on_device = kernels.use_triton if DEV.type == "cuda" else \
        (lambda t: isinstance(t, torch.Tensor))
    if fused:
        mp.setattr(kernels, "use_triton", on_device)
    else:
        mp.setattr(kernels, "use_triton", lambda t: on_device(t) and (
            t.is_floating_point() or t.dtype == torch.uint8))
        mp.setattr(budget, "fused_budget", lambda t: False)


def budget_step(backend, seed, T=20, H=32, K=3, E=8, B=32, pad=None, wire=None):
    """One single-process budget dispatch + combine + backward; every output."""
    from token_dispatcher import MoETokenDispatcher
    g = torch.Generator().manual_seed(seed)
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=B, pad_multiple=pad,
                           wire_dtype=wire)
    x = torch.randn(T, H, generator=g).to(DEV, torch.bfloat16).requires_grad_(True)
    p, idx = torch.topk(torch.rand(T, E, generator=g), K, 1)
    idx[torch.rand(T, K, generator=g) < 0.2] = -1
    p = p.softmax(-1).to(DEV).requires_grad_(True)
    out = d.dispatch(x, topk_idx=idx.to(DEV), topk_probs=p)
    y = d.combine((out.tokens.float() * out.probs[:, None]).to(x.dtype), out.handle)
    gy = torch.randn(y.shape, generator=g).to(DEV, y.dtype)
    (y.float() * gy.float()).sum().backward()
    return dict(tokens=out.tokens, probs=out.probs, tpe=out.tokens_per_expert,
                status=out.status, y=y, gx=x.grad, gp=p.grad)


@needs_triton
@pytest.mark.parametrize("backend,B,pad,wire", [
    ("alltoall", 64, None, None), ("alltoall", 16, 4, None), ("allgather", 16, 4, None),
    ("alltoall", 64, None, torch.float8_e4m3fn), ("allgather", 64, None, torch.float8_e4m3fn),
], ids=["alltoall", "alltoall_drops_pad", "allgather_drops_pad", "alltoall_fp8",
        "allgather_fp8"])
def test_fused_dispatch_step_matches_reference(monkeypatch, backend, B, pad, wire):
    seed = _seed()
    kw = dict(B=B, pad=pad, wire=wire, H=128 if wire else 32)
    outs = {}
    for fused in (False, True):
        with monkeypatch.context() as mp:
            force_paths(mp, fused)
            outs[fused] = budget_step(backend, seed, **kw)
    for k, ref in outs[False].items():
        got = outs[True][k]
        assert got.dtype == ref.dtype and torch.equal(got, ref), (seed, k, got, ref)
    assert bool(int(outs[True]["status"]) & STATUS_ROWS_DROPPED) == (B == 16), seed


# ------------------------------------------------------------------ shapes of larger groups


@needs_triton
@pytest.mark.parametrize("R", [2, 4, 8, 16, 64])
def test_pack_meta_default_tiles_every_group_size(R):
    """The default tiles at the EP sizes a multi-GPU run uses (on a GPU: they compile;
    Triton 3.6 once failed to lower a 2-D scan of [64, 2] at R = 2)."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    L, K, T, C = 2, 4, 100, 128
    inp = _inp(T, K, R * L, g, 0, False, mask=0.1)
    ref_plan, ref = budget.pack_meta(inp, C, R * L, L, fused=False)
    plan, meta = budget.pack_meta(inp, C, R * L, L, fused=True)
    assert torch.equal(meta.detach().cpu(), ref.detach().cpu()), seed
    _same_plan(plan, ref_plan, seed)


@needs_triton
@pytest.mark.parametrize("L", [1, 2, 8, 32, 256])
def test_budget_plan_default_tiles_every_width(L):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    lid = _ids(300, 4, L, g, 0.1, False)
    ref = budget_plan(lid, L, 1024, 8)
    _same_plan(triton_budget_plan(lid.to(DEV), L, 1024, 8), ref, seed)
