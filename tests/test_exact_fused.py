"""The exact mode's fused path (after the host sync) against its torch reference, bit for bit.

On CPU the kernels run under TRITON_INTERPRET=1 (for real on a GPU machine), on fresh random
routing each run (the seed is in every failure message):

* the send side, ``exact.pack_rows(fused=True)`` == its torch reference: the packed metadata
  rows (every block at its all-to-all offset), the send plan's maps, the probs' gradient;
  through small tiles too, at R = E / L of 1, 2, 4, 8, with no tokens, skew, -1 slots;
* the receive side, ``exact.receive_plan(fused=True)`` == its torch reference on the rows R
  simulated ranks exchange: the plan's maps, padding mask, row count and the probs;
* whole dispatches + combine + backward with the fused path forced on against the torch
  path, in one process and on real gloo ranks (R = 2, 4; both collective backends): tokens,
  probs, tokens_per_expert, the combine, both gradients, with padding, FP8 wire, a
  zero-token rank, a rank with a narrower K, skewed routing.
"""
import functools

import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402,F401

from moe_dispatch import kernels  # noqa: E402
from moe_dispatch.backends import exact  # noqa: E402
from moe_dispatch.permute import BudgetPlan, GroupPlan  # noqa: E402
from moe_dispatch.routing import rank_mask  # noqa: E402
from moe_dispatch.testing import make_case  # noqa: E402
from test_budget_kernels import _ids, _seed, force_paths  # noqa: E402


def _same_maps(fused, ref, what):
    """A fused ``BudgetPlan`` maps the same rows as the torch ``GroupPlan``."""
    assert isinstance(fused, BudgetPlan) and isinstance(ref, GroupPlan), what
    assert (fused.num_out_rows, fused.num_in_rows, fused.topk) == \
        (ref.num_out_rows, ref.num_in_rows, ref.topk), what
    (pos, filled), (ref_pos, ref_filled) = kernels.plan_maps(fused), kernels.plan_maps(ref)
    assert torch.equal(pos.cpu(), ref_pos.cpu()), (what, pos, ref_pos)
    assert (filled is None) == (ref_filled is None), what
    if filled is not None:
        assert torch.equal(filled.cpu(), ref_filled.cpu()), (what, filled, ref_filled)


# ------------------------------------------------------------------ send side


@needs_triton
@pytest.mark.parametrize("R,T,K,L,kw,tiles", [
    (1, 20, 3, 7, dict(mask=0.2), (16, 16)),     # one rank, tile boundaries
    (2, 37, 2, 3, dict(skew=True), (16, 16)),    # skewed
    (4, 37, 3, 4, dict(mask=0.2), (16, 32)),     # counting tile != row tile
    (8, 50, 4, 2, dict(mask=0.1), (16, 16)),     # 8 blocks
    (8, 9, 2, 1, dict(mask=1.0), None),          # every slot masked: nothing sent
    (4, 0, 2, 2, dict(), None),                  # no tokens
    (2, 130, 8, 4, dict(top=True), None),        # ids near E, default tiles
])
def test_pack_rows_fused_matches_torch(R, T, K, L, kw, tiles):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    E = R * L
    idx = _ids(T, K, E, g, **kw).to(DEV)
    probs = torch.rand(T, K, generator=g).to(DEV).requires_grad_(True)
    splits = rank_mask(idx, E, L).sum(0).tolist()
    ref_plan, ref = exact.pack_rows(idx, probs, E, L, splits, fused=False)
    plan, meta = exact.pack_rows(idx, probs, E, L, splits, fused=True)
    assert meta.shape == (sum(splits), 2 * K)
    assert meta.dtype == ref.dtype and torch.equal(meta, ref), (seed, meta, ref)
    _same_maps(plan, ref_plan, seed)
    assert plan.tokens_per_expert_L.tolist() == splits and not bool(plan.dropped), seed
    gm = torch.randn(meta.shape, generator=g).to(DEV)
    g_fused, = torch.autograd.grad((meta * gm).sum(), probs)
    g_ref, = torch.autograd.grad((ref * gm).sum(), probs)
    assert torch.equal(g_fused, g_ref), seed
    if tiles:  # the same through small tiles (kernels.pack_rows directly)
        tiled, maps = kernels.pack_rows(idx, probs, E, L, sum(splits), *tiles)
        assert torch.equal(tiled, ref), (seed, tiles)
        assert torch.equal(maps[0], plan.pos_NK) and maps[2].tolist() == splits, (seed, tiles)


# ------------------------------------------------------------------ receive side


def _exchange(R, T_r, K, L, g, **kw):
    """What each of R simulated ranks receives from the others' torch ``pack_rows`` (block
    me of every sender, in sender order), and its unpadded rows per local expert."""
    E = R * L
    sent, counts_E = [], torch.zeros(E, dtype=torch.long)
    for s in range(R):
        idx = _ids(T_r[s], K, E, g, **kw)
        probs = torch.rand(T_r[s], K, generator=g)
        splits = rank_mask(idx, E, L).sum(0).tolist()
        _, meta = exact.pack_rows(idx, probs, E, L, splits, fused=False)
        offsets = [sum(splits[:r]) for r in range(R + 1)]
        sent.append([meta.detach()[offsets[r]:offsets[r + 1]] for r in range(R)])
        counts_E += torch.bincount(idx[idx >= 0], minlength=E)
    return [(torch.cat([sent[s][me] for s in range(R)]),
             counts_E[me * L:(me + 1) * L].tolist()) for me in range(R)]


@needs_triton
@pytest.mark.parametrize("R,T_r,K,L,pad,kw,tiles", [
    (1, [30], 3, 5, None, dict(mask=0.2), (16, 3)),        # one rank, chunk boundaries
    (2, [25, 0], 2, 3, 4, dict(skew=True), (16, 2)),        # a zero-token sender, padding
    (4, [12, 30, 7, 19], 3, 4, 8, dict(mask=0.3), None),   # default tiling, padding
    (8, [9, 4, 0, 11, 6, 13, 2, 8], 4, 2, None, dict(mask=0.1), (16, 4)),
    (2, [6, 5], 2, 2, 2, dict(mask=1.0), None),             # every slot masked
])
def test_receive_plan_fused_matches_torch(monkeypatch, R, T_r, K, L, pad, kw, tiles):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    if tiles:
        monkeypatch.setattr(kernels, "budget_arrays", functools.partial(
            kernels.budget_arrays, block=tiles[0], chunks=tiles[1]))
    for me, (rows, tpe) in enumerate(_exchange(R, T_r, K, L, g, **kw)):
        rows = rows.to(DEV).requires_grad_(True)
        ref_plan, ref_probs = exact.receive_plan(rows, K, me * L, L, tpe, pad, fused=False)
        plan, probs = exact.receive_plan(rows, K, me * L, L, tpe, pad, fused=True)
        _same_maps(plan, ref_plan, (seed, me))
        assert plan.tokens_per_expert_L.tolist() == list(ref_plan.tokens_per_expert), seed
        assert not bool(plan.dropped) and torch.equal(probs, ref_probs), (seed, me)


# ------------------------------------------------------------------ a whole dispatch


def exact_step(backend, seed, T=20, H=32, K=3, E=8, pad=None, wire=None, mask=0.2):
    """One single-process exact-mode dispatch + combine + backward; every output."""
    from token_dispatcher import MoETokenDispatcher
    g = torch.Generator().manual_seed(seed)
    d = MoETokenDispatcher(E, backend=backend, pad_multiple=pad, wire_dtype=wire)
    x = torch.randn(T, H, generator=g).to(DEV, torch.bfloat16).requires_grad_(True)
    p, idx = torch.topk(torch.rand(T, E, generator=g), K, 1)
    idx[torch.rand(T, K, generator=g) < mask] = -1
    p = p.softmax(-1).to(DEV).requires_grad_(True)
    out = d.dispatch(x, topk_idx=idx.to(DEV), topk_probs=p)
    y = d.combine((out.tokens.float() * out.probs[:, None]).to(x.dtype), out.handle)
    gy = torch.randn(y.shape, generator=g).to(DEV, y.dtype)
    (y.float() * gy.float()).sum().backward()
    return dict(tokens=out.tokens, probs=out.probs, tpe=out.tokens_per_expert, y=y,
                gx=x.grad if x.grad is not None else torch.zeros_like(x),
                gp=p.grad if p.grad is not None else torch.zeros_like(p),
                plan=type(out.handle.backend_handle.plan).__name__)


def both_paths(monkeypatch, step, *args, **kw):
    """``step`` through the torch reference and through the fused kernels: {fused: outs}."""
    outs = {}
    for fused in (False, True):
        with monkeypatch.context() as mp:
            force_paths(mp, fused)
            outs[fused] = step(*args, **kw)
    return outs


def assert_same(outs, what):
    for k, ref in outs[False].items():
        got = outs[True][k]
        if isinstance(ref, torch.Tensor):
            assert got.dtype == ref.dtype and got.device == ref.device, (what, k)
            assert torch.equal(got, ref), (what, k, got, ref)


@needs_triton
@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("T,pad,wire,mask", [
    (20, None, None, 0.2), (37, 4, None, 0.3), (0, 8, None, 0.0), (9, None, None, 1.0),
    (20, 8, torch.float8_e4m3fn, 0.2),
], ids=["plain", "pad", "no_tokens", "all_masked", "fp8_pad"])
def test_fused_exact_step_matches_reference(monkeypatch, backend, T, pad, wire, mask):
    seed = _seed()
    outs = both_paths(monkeypatch, exact_step, backend, seed, T=T, pad=pad, wire=wire,
                      mask=mask, H=128 if wire else 32)
    assert outs[True]["plan"] == "BudgetPlan" and outs[False]["plan"] == "GroupPlan"
    assert outs[True]["tpe"].device.type == "cpu"  # host ints, as before
    assert_same(outs, seed)


_R2 = (2, [13, 9], 8, 3, dict(), dict(mask_frac=0.2))
_R2_EMPTY_PAD = (2, [11, 0], 8, 2, dict(pad_multiple=4), dict())  # a zero-token rank
_R4_NARROW = (4, [6, 12, 0, 5], 16, 4, dict(narrow_rank=1), dict(mask_frac=0.3, skew="zipf"))
_R4_FP8 = (4, [5, 9, 7, 3], 8, 2, dict(wire=True, pad_multiple=8), dict(skew="one_expert"))


@needs_triton
@pytest.mark.skipif(DEV.type == "cuda", reason="the gloo ranks run the kernels on the CPU, "
                    "interpreted: on a GPU machine the GPU tests cover the fused path")
@pytest.mark.parametrize("backend,world,tokens,E,K,opts,kw", [
    ("alltoall", *_R2), ("alltoall", *_R2_EMPTY_PAD), ("alltoall", *_R4_NARROW),
    ("alltoall", *_R4_FP8), ("allgather", *_R2_EMPTY_PAD), ("allgather", *_R4_NARROW),
], ids=["alltoall_r2", "alltoall_r2_empty_pad", "alltoall_r4_narrow_k_zipf",
        "alltoall_r4_fp8_pad_hot", "allgather_r2_empty_pad", "allgather_r4_narrow_k_zipf"])
def test_fused_exact_paths_match_on_gloo_ranks(gloo_pool, backend, world, tokens, E, K, opts,
                                               kw):
    H = 128 if opts.get("wire") else 32
    case = make_case(world, tokens, H, E, K, dtype=torch.bfloat16, **kw)
    res = gloo_pool(world).run("dist_workers", "run_exact_paths", case, backend, opts,
                               timeout=600)
    for rank, outs in enumerate(res):
        assert outs[True]["plan"] == "BudgetPlan", rank
        assert_same(outs, (rank, opts, kw))


# ------------------------------------------------------------------ the input check


def _count_launches(mp):
    """Names of the Triton kernels launched (every module's ``launch`` wrapped)."""
    import sys
    from moe_dispatch.kernels import _check, _launch, _pack, _route, _triton  # noqa: F401
    names, real = [], _launch.launch

    def counting(kernel, grid, *args, **kw):
        names.append(kernel.fn.__name__)
        return real(kernel, grid, *args, **kw)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("moe_dispatch.kernels.") and \
                getattr(mod, "launch", None) is real and mod is not _launch:
            mp.setattr(mod, "launch", counting)
    return names


@needs_triton
@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
def test_exact_dispatch_checks_input_in_its_message(monkeypatch, backend):
    """The exact mode's routing-message launch makes the input check (no check launch);
    bad ids and probs still raise; with capacity clipping (which reads the ids first) the
    check launch stays."""
    from moe_dispatch import DispatchInputError
    from token_dispatcher import MoETokenDispatcher
    force_paths(monkeypatch, True)
    names = _count_launches(monkeypatch)
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    T, H, K, E = 12, 32, 2, 8
    x = torch.randn(T, H, generator=g).to(DEV, torch.bfloat16)
    p, idx = torch.topk(torch.rand(T, E, generator=g), K, 1)
    d = MoETokenDispatcher(E, backend=backend)
    d.dispatch(x, topk_idx=idx.to(DEV), topk_probs=p.to(DEV))
    assert "_route_counts_kernel" in names and "_check_kernel" not in names, (seed, names)
    for bad_idx, bad_p, what in [(E, 0.5, "expert id"), (0, float("nan"), "NaN")]:
        i2, p2 = idx.clone(), p.clone()
        i2[3, 1], p2[3, 1] = bad_idx, bad_p
        with pytest.raises(DispatchInputError, match=what):
            d.dispatch(x, topk_idx=i2.to(DEV), topk_probs=p2.to(DEV))
    names.clear()
    clipped = MoETokenDispatcher(E, backend=backend, capacity_factor=1.0)
    clipped.dispatch(x, topk_idx=idx.to(DEV), topk_probs=p.to(DEV))
    assert "_check_kernel" in names, (seed, names)


@needs_triton
@pytest.mark.parametrize("T,rows,K", [(9, 9, 3), (9, 14, 2), (0, 5, 4), (130, 131, 8)])
def test_gather_meta_fused_matches_torch(T, rows, K):
    """``allgather``'s metadata rows: the pack kernel (header row left off) == the torch
    rows, zero rows past T, and the probs' gradient through them."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    E = 16
    idx = torch.randint(0, E, (T, K), generator=g)
    idx[torch.rand(T, K, generator=g) < 0.25] = -1
    probs = torch.rand(T, K, generator=g)
    code = torch.zeros((), dtype=torch.int64, device=DEV)
    gm = torch.randn(rows, 2 * K, generator=g).to(DEV)
    outs = []
    for fused in (True, False):
        p = probs.to(DEV).requires_grad_(True)
        meta = exact.gather_meta(idx.to(DEV), p, code, rows, fused=fused)
        assert meta.shape == (rows, 2 * K) and meta.is_contiguous(), seed
        (meta * gm).sum().backward()
        outs.append((meta.detach().cpu(), p.grad.cpu()))
    assert torch.equal(outs[0][0], outs[1][0]), (seed, outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1]), seed
    assert not outs[0][0][T:].any(), seed


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("masked_token", [False, True], ids=["every_token_sent", "one_unsent"])
def test_group_of_one_sends_the_tokens_themselves(monkeypatch, fused, masked_token):
    """``alltoall`` in a group of one that sends every token uses the tokens as its send
    buffer and skips combine's final sum (both identities there); with a token that goes
    nowhere the send permute runs. Either way: the dense reference, forward and backward."""
    from moe_dispatch.testing import local_experts, reference_dispatch, reference_moe, rel_err
    from token_dispatcher import MoETokenDispatcher
    seed = _seed()
    case = make_case(1, [23], 32, 8, 3, seed=seed)
    # -1 slots, but never a whole token (slot 0 kept) unless ``masked_token`` says so.
    g = torch.Generator().manual_seed(seed)
    case.idxs[0][:, 1:][torch.rand(23, 2, generator=g) < 0.3] = -1
    if masked_token:
        case.idxs[0][5] = -1
    with monkeypatch.context() as mp:
        force_paths(mp, fused)
        d = MoETokenDispatcher(8, backend="alltoall")
        x = case.xs[0].to(DEV).clone().requires_grad_(True)
        p = case.probs[0].to(DEV).clone().requires_grad_(True)
        out = d.dispatch(x, topk_idx=case.idxs[0].to(DEV), topk_probs=p)
        y = d.combine(local_experts(case.W.to(DEV), 0)(out.tokens, out.tokens_per_expert,
                                                       out.probs), out.handle)
        (y * case.gouts[0].to(DEV)).sum().backward()
    assert out.handle.backend_handle.send_identity is not masked_token, seed
    tokens, tpe, probs = reference_dispatch(case, 0)
    assert torch.equal(out.tokens.detach().cpu(), tokens), seed
    assert torch.equal(out.tokens_per_expert.cpu(), tpe), seed
    assert torch.equal(out.probs.detach().cpu(), probs), seed
    ys, gxs, gps = reference_moe(case)
    assert rel_err(y.detach(), ys[0]) < 1e-5, seed
    assert rel_err(x.grad, gxs[0]) < 1e-5, seed
    gp_ref = torch.where(case.idxs[0] >= 0, gps[0], torch.zeros_like(gps[0]))
    assert rel_err(torch.where(case.idxs[0].to(DEV) >= 0, p.grad, 0), gp_ref) < 1e-5, seed
    if masked_token:
        assert torch.all(y.detach()[5] == 0) and torch.all(x.grad[5] == 0), seed
