"""The sync-free budget mode (``max_rows_per_rank``) of the library backends: ``deepep`` /
``uccl`` (DeepEP V1's ``num_worst_tokens`` dispatch) and ``hybridep`` (its
``num_permuted_tokens`` dispatch), on real gloo ranks (2 and 4) with the CPU stand-ins of
the libraries (tests/fake_ep.py), which imitate what the libraries do in these modes
(uninitialised rows past the received ones, -1 top-k ids there, no per-expert host counts;
HybridEP's overflow guard only in its fused non-blocking permute).

Checked as for the collective backends (tests/test_budget_mode.py): against the dense
reference when every row fits (forward, combine, both backwards), against the exact mode
with the dropped rows' outputs zeroed when the budget overflows (flagged on the rank that
overflowed), tokens over the token cap clipped and flagged, bad input raised on every
rank by ``check_status`` (never inside dispatch or combine), zero-token ranks, -1 slots,
and no shape agreement after the first call. Rows travel as BF16: the cases are BF16.
"""
import pytest
import torch

from moe_dispatch.protocol import STATUS_ROWS_DROPPED, STATUS_TOKENS_DROPPED, BackendConfig
from moe_dispatch.testing import make_case, reference_dispatch, reference_moe, rel_err

BACKENDS = ["deepep", "uccl", "hybridep"]
TOL = 3e-2  # BF16 rows on the wire

SCENARIOS = {
    # name: (tokens per rank as a function of world, case kwargs, dispatcher opts)
    "uneven": (lambda R: [6 + 5 * r for r in range(R)], dict(mask_frac=0.2), {}),
    "masked_garbage_probs": (lambda R: [9] * R, dict(mask_frac=0.3, masked_prob=0.7), {}),
    "zero_token_rank": (lambda R: [0] + [9] * (R - 1), dict(mask_frac=0.1), {}),
    "zipf_pad": (lambda R: [12] * R, dict(skew="zipf"), {"pad_multiple": 4}),
    "dense_form": (lambda R: [7] * R, dict(topk=3), {"form": "dense", "topk": 3}),
    "all_empty": (lambda R: [0] * R, dict(), {}),
}


def _case(R, tokens, seed, topk=3, **kw):
    return make_case(R, tokens, 16, 4 * R, topk, seed=seed, dtype=torch.bfloat16, **kw)


def _seed():
    return int(torch.randint(0, 2 ** 31 - 1, (1,)))


def _check_against_reference(res, case, pad=None, dense=False):
    """Budget-mode results of every rank against the dense reference (all rows fit)."""
    ys, gxs, gps = reference_moe(case, case.idxs)
    for r, out in enumerate(res):
        tok, tpe, pr = reference_dispatch(case, r, pad, case.idxs)
        n = tok.shape[0]
        assert out["status"] == 0, (r, out["status"])
        assert torch.equal(out["tpe"], tpe), (r, out["tpe"], tpe)
        assert torch.equal(out["tokens"][:n], tok), f"rank {r}: rows differ"
        assert torch.equal(out["probs"][:n], pr), f"rank {r}: probs differ"
        assert not out["tokens"][n:].any() and not out["probs"][n:].any(), "unused rows"
        y = out["y"].reshape(ys[r].shape)
        assert rel_err(y, ys[r]) < TOL and rel_err(out["gx"], gxs[r]) < TOL, r
        if not dense:
            assert rel_err(out["gp"], gps[r]) < TOL, r


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_budget_large_enough_equals_reference(gloo_pool, world, backend, scenario):
    if world == 4 and scenario in ("dense_form", "all_empty", "masked_garbage_probs"):
        pytest.skip("covered at world 2")
    tokens_fn, kw, opts = SCENARIOS[scenario]
    kw = dict(kw)
    case = _case(world, tokens_fn(world), _seed(), topk=kw.pop("topk", 3), **kw)
    budget = 3 * max(max(tokens_fn(world)), 1) * world + 16  # every row fits
    opts = dict(opts, max_rows_per_rank=budget)
    res = gloo_pool(world).run("ep_workers", "fake_parity", case, backend, opts)
    for out in res:
        assert out["tokens"].shape[0] == budget and out["tpe"].dtype == torch.int64
    _check_against_reference(res, case, opts.get("pad_multiple"), opts.get("form") == "dense")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [None, 4])
def test_budget_overflow_flagged_and_kept_rows_exact(gloo_pool, world, backend, pad):
    """One hot expert: its rank overflows a budget the others fit in; its kept rows, combine
    and both backwards equal the exact mode's with the dropped rows zeroed."""
    if world == 4 and pad:
        pytest.skip("covered at world 2")
    case = _case(world, [12] * world, _seed(), topk=2, skew="one_expert", mask_frac=0.1)
    budget = 8
    res = gloo_pool(world).run("ep_workers", "fake_budget_vs_exact", case, backend, budget, pad)
    for r, out in enumerate(res):
        assert out["rows"] == budget
        overflowed = out["exact_rows"] > budget
        assert bool(out["status"] & STATUS_ROWS_DROPPED) == overflowed, (r, out)
        assert out["status"] & ~STATUS_ROWS_DROPPED == 0 and out["check"] == out["status"]
        assert out["tpe_equal"] and out["rows_equal"] and out["probs_equal"], (r, out)
        assert out["tail_zero"], r
        assert out["y_err"] < TOL and out["gx_err"] < TOL and out["gp_err"] < TOL, (r, out)
    assert any(out["status"] & STATUS_ROWS_DROPPED for out in res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_cap_clips_and_flags(gloo_pool, backend):
    """Rank 1 sends more tokens than the cap: its tail tokens are not sent and come back as
    zeros; every rank sees STATUS_TOKENS_DROPPED."""
    case = _case(2, [6, 10], _seed(), topk=2)
    res = gloo_pool(2).run("ep_workers", "fake_budget_vs_exact", case, backend, 64, None,
                           {"max_tokens_per_rank": 8})
    for out in res:
        assert out["status"] == STATUS_TOKENS_DROPPED, out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["expert_too_big", "nan_prob", "idx_shape", "hidden_size"])
def test_bad_input_raises_on_every_rank_at_check(gloo_pool, world, backend, which):
    """After a good first call, one rank's bad input raises nothing in dispatch or combine;
    ``check_status`` raises on every rank, the bad rank naming its own error."""
    if world == 4 and which in ("nan_prob", "idx_shape"):
        pytest.skip("covered at world 2")
    case = _case(world, [6] * world, _seed(), topk=2)
    bad = world - 1
    res = gloo_pool(world).run("ep_workers", "fake_budget_bad_input", case, backend, which, bad,
                               64)
    for r, out in enumerate(res):
        assert out["raised"], f"rank {r} did not raise"
        assert out["y_rows"] == 6, (r, out)
        assert ("another EP rank" in out["raised"]) == (r != bad), (r, out["raised"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["idx_shape", "hidden_size"])
def test_bad_rank_takes_part_in_the_backward(gloo_pool, backend, which):
    """A rank that sent nothing (host error, or another hidden size) still runs the
    library's backward collectives with the others: no hang, then every rank raises."""
    case = _case(2, [6, 6], _seed(), topk=2)
    res = gloo_pool(2).run("ep_workers", "fake_budget_bad_backward", case, backend, which, 1,
                           64, timeout=60)
    assert all(res) and "another EP rank" in res[0] and "another EP rank" not in res[1], res


@pytest.mark.parametrize("backend", BACKENDS)
def test_later_calls_agree_nothing(gloo_pool, backend):
    """One dispatcher, several calls: the first agrees the shapes (one host exchange), the
    others none, whatever their token counts (a zero-token rank, fewer tokens, all slots
    masked on a rank), and each equals the reference."""
    R, s = 2, _seed()
    cases = [_case(R, [9, 7], s), _case(R, [0, 9], s + 1, mask_frac=0.3),
             _case(R, [4, 2], s + 2, skew="zipf"), _case(R, [9, 9], s + 3)]
    cases[3].idxs[0][:] = -1  # rank 0 routes nothing
    res = gloo_pool(R).run("ep_workers", "fake_budget_steps", backend, cases, 64)
    for i, case in enumerate(cases):
        step = [r[i] for r in res]
        assert [o["agreements"] for o in step] == ([1] * R if i == 0 else [0] * R), i
        _check_against_reference(step, case)


def test_construction_rules(gloo_pool):
    """The old hybrid-ep API cannot run the budget mode (refused at construction, on every
    rank); max_tokens_per_rank is a budget-mode option; num_permuted_tokens is the budget."""
    res = gloo_pool(2).run_raw("ep_workers", "fake_construct", "hybridep", 32, "2eec484", {})
    assert all(r[0] == "err" and "use_host_meta" in r[2] for r in res), res
    res = gloo_pool(2).run_raw("ep_workers", "fake_construct", "hybridep", 32, "current",
                               {"num_permuted_tokens": 32})
    assert all(r[0] == "err" and "num_permuted_tokens" in r[2] for r in res), res
    res = gloo_pool(2).run_raw("ep_workers", "fake_construct", "deepep", None, "current",
                               {"max_tokens_per_rank": 8})
    assert all(r[0] == "err" and "budget mode only" in r[2] for r in res), res
    res = gloo_pool(2).run("ep_workers", "fake_construct", "uccl", 32, "current",
                           {"max_tokens_per_rank": 8})
    assert res == ["constructed"] * 2


@pytest.mark.parametrize("name", BACKENDS)
def test_single_rank_budget(name):
    """One rank: no library, the budget plan on the local rows (status, zero tail, combine
    and both backwards equal the reference)."""
    from moe_dispatch.registry import _load
    from moe_dispatch.routing import canonicalize
    from moe_dispatch.testing import local_experts
    case = make_case(1, [13], 16, 6, 2, mask_frac=0.2)
    be = _load(name)(BackendConfig(group=None, num_experts=6, pad_multiple=4,
                                   max_rows_per_rank=40))
    x = case.xs[0].clone().requires_grad_(True)
    p = case.probs[0].clone().requires_grad_(True)
    res = be.dispatch(*canonicalize(x, 6, topk_idx=case.idxs[0], topk_probs=p))
    tok, tpe, pr = reference_dispatch(case, 0, 4)
    n = tok.shape[0]
    assert int(res.status.item()) == 0 and res.tokens_NH.shape[0] == 40
    assert torch.equal(res.tokens_per_expert_L, tpe)
    assert torch.equal(res.tokens_NH[:n], tok) and torch.equal(res.probs_N[:n], pr)
    assert not res.tokens_NH[n:].any() and not res.probs_N[n:].any()
    y = be.combine(local_experts(case.W, 0)(res.tokens_NH, res.tokens_per_expert_L,
                                            res.probs_N), res.handle)
    (y * case.gouts[0]).sum().backward()
    ys, gx, gp = reference_moe(case)
    assert rel_err(y, ys[0]) < 1e-5 and rel_err(x.grad, gx[0]) < 1e-5
    assert rel_err(p.grad, gp[0]) < 1e-5
    small = _load(name)(BackendConfig(group=None, num_experts=6, max_rows_per_rank=4))
    res = small.dispatch(*canonicalize(case.xs[0], 6, topk_idx=case.idxs[0],
                                       topk_probs=case.probs[0]))
    assert int(res.status.item()) == STATUS_ROWS_DROPPED
    assert int(res.tokens_per_expert_L.sum()) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["nvshmem"] + BACKENDS)
def test_single_gpu_budget_is_sync_free(name):
    """One GPU, one rank (no library needed but nvshmem's own kernels): after the first
    call, input check -> dispatch -> experts -> combine -> backward of the budget mode run
    under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), and equal the
    exact mode on the same input."""
    from moe_dispatch.registry import _load
    from moe_dispatch.routing import canonicalize
    E, B, dev = 8, 512, torch.device("cuda")
    case = make_case(1, [96], 64, E, 4, mask_frac=0.1)
    x0, idx, p0 = case.xs[0].to(dev), case.idxs[0].to(dev), case.probs[0].to(dev)

    def step(be):
        x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        res = be.dispatch(*canonicalize(x, E, topk_idx=idx, topk_probs=p))
        y = be.combine(res.tokens_NH * res.probs_N.unsqueeze(1), res.handle)
        (y * y).sum().backward()  # an expert and a loss with no host sync of their own
        return res, y, x.grad, p.grad

    exact = step(_load(name)(BackendConfig(group=None, num_experts=E, pad_multiple=8)))
    be = _load(name)(BackendConfig(group=None, num_experts=E, pad_multiple=8,
                                   max_rows_per_rank=B))
    step(be)  # the first call agrees shapes (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res, y, gx, gp = step(be)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    n = int(exact[0].tokens_per_expert_L.sum())
    assert int(res.status.item()) == 0 and res.tokens_NH.shape[0] == B
    assert torch.equal(res.tokens_per_expert_L.cpu(), exact[0].tokens_per_expert_L.cpu())
    assert torch.equal(res.tokens_NH[:n], exact[0].tokens_NH) and not res.tokens_NH[n:].any()
    assert rel_err(y, exact[1]) < 1e-5 and rel_err(gx, exact[2]) < 1e-5
    assert rel_err(gp, exact[3]) < 1e-5
