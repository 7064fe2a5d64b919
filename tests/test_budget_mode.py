"""The sync-free budget mode (``max_rows_per_rank``) of the torch-collective backends.

Real gloo ranks (2 and 4). Against the single-process dense reference when the budget is
large enough, against the exact mode with the dropped rows' outputs zeroed when it is not:
forward, combine and both backwards. Overflow is flagged on the rank that overflowed; bad
input raises on every rank where the status is read.
"""
import pytest
import torch

from moe_dispatch.protocol import STATUS_BAD_INPUT, STATUS_ROWS_DROPPED, STATUS_TOKENS_DROPPED
from moe_dispatch.testing import make_case, reference_dispatch, reference_moe, rel_err
from token_dispatcher import MoETokenDispatcher

BACKENDS = ["alltoall", "allgather"]

SCENARIOS = {
    "uniform_uneven": (lambda R: [6 + 5 * r for r in range(R)], dict(), {}),
    "masked_slots": (lambda R: [12] * R, dict(mask_frac=0.3, masked_prob=0.7), {}),
    "zero_token_rank": (lambda R: [0] + [9] * (R - 1), dict(mask_frac=0.1), {}),
    "hot_expert": (lambda R: [10] * R, dict(skew="one_expert"), {}),
    "zipf": (lambda R: [16] * R, dict(skew="zipf"), {}),
    "pad_multiple": (lambda R: [5 + 3 * r for r in range(R)], dict(mask_frac=0.2),
                     {"pad_multiple": 4}),
    "dense_form": (lambda R: [7 + r for r in range(R)], dict(topk=3),
                   {"form": "dense", "topk": 3}),
    "all_ranks_empty": (lambda R: [0] * R, dict(), {}),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_budget_large_enough_equals_reference(gloo_pool, world, backend, scenario):
    tokens_fn, case_kw, opts = SCENARIOS[scenario]
    kw = dict(hidden=8, num_experts=4 * world, topk=3)
    kw.update(case_kw)
    case = make_case(world, tokens_fn(world), **kw)
    budget = 3 * max(max(tokens_fn(world)), 1) * world + 16  # every row fits
    opts = dict(opts, max_rows_per_rank=budget)
    results = gloo_pool(world).run("dist_workers", "run_parity", case, backend, opts)
    ys, gxs, gps = reference_moe(case, case.idxs)
    for r, res in enumerate(results):
        tok, tpe, pr = reference_dispatch(case, r, opts.get("pad_multiple"), case.idxs)
        n = tok.shape[0]
        assert res["status"] == 0
        assert res["tokens"].shape[0] == budget
        assert torch.equal(res["tpe"], tpe)
        assert torch.equal(res["tokens"][:n], tok) and torch.equal(res["probs"][:n], pr)
        assert not res["tokens"][n:].any() and not res["probs"][n:].any(), "unused rows"
        assert rel_err(res["y"].reshape(ys[r].shape), ys[r]) < 1e-5
        assert rel_err(res["gx"], gxs[r]) < 1e-5
        if opts.get("form") != "dense":
            assert rel_err(res["gp"], gps[r]) < 1e-5


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [None, 4])
def test_budget_overflow_flagged_and_kept_rows_exact(gloo_pool, world, backend, pad):
    # One hot expert on rank 0: rank 0 overflows a budget the others fit in.
    case = make_case(world, [12] * world, hidden=8, num_experts=4 * world, topk=2,
                     skew="one_expert", mask_frac=0.1)
    budget = 8
    results = gloo_pool(world).run("dist_workers", "run_budget_vs_exact", case, backend,
                                   budget, pad)
    for r, res in enumerate(results):
        assert res["rows"] == budget
        overflowed = res["exact_rows"] > budget
        assert bool(res["status"] & STATUS_ROWS_DROPPED) == overflowed, (r, res)
        assert res["check"] == res["status"]
        assert res["tpe_equal"] and res["rows_equal"] and res["probs_equal"]
        assert res["tail_zero"]
        assert res["y_err"] < 1e-5 and res["gx_err"] < 1e-5 and res["gp_err"] < 1e-5, res
    assert any(res["status"] & STATUS_ROWS_DROPPED for res in results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_cap_clips_and_flags(gloo_pool, backend):
    # Rank 1 sends more tokens than the agreed cap: its tail tokens are not sent, come back
    # as zeros, and every rank it sends to sees STATUS_TOKENS_DROPPED.
    case = make_case(2, [6, 10], hidden=8, num_experts=8, topk=2)
    results = gloo_pool(2).run("dist_workers", "run_budget_vs_exact", case, backend, 64, None,
                               {"max_tokens_per_rank": 8})
    assert all(res["status"] & STATUS_TOKENS_DROPPED for res in results)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["expert_too_big", "nan_prob", "idx_shape", "hidden_size"])
def test_bad_input_raises_on_every_rank_at_check(gloo_pool, world, backend, which):
    case = make_case(world, [6] * world, hidden=8, num_experts=4 * world, topk=2)
    bad = world - 1
    results = gloo_pool(world).run("dist_workers", "run_budget_bad_input", case, backend,
                                   which, bad, 64)
    for r, res in enumerate(results):
        assert res["raised"], f"rank {r} did not raise"
        assert res["y_rows"] == 6 or r == bad
        if r == bad:
            assert "another EP rank" not in res["raised"]
        else:
            assert "another EP rank" in res["raised"]


def test_budget_arguments_checked():
    with pytest.raises(ValueError, match="multiple of pad_multiple"):
        MoETokenDispatcher(8, max_rows_per_rank=10, pad_multiple=4)
    with pytest.raises(ValueError, match="positive int"):
        MoETokenDispatcher(8, max_rows_per_rank=0)
    with pytest.raises(ValueError, match="constructor|MoETokenDispatcher argument"):
        MoETokenDispatcher(8, backend_options={"max_rows_per_rank": 8})


def test_status_bits_fold_and_describe():
    from moe_dispatch.protocol import describe_status
    from token_dispatcher.dispatcher import read_status
    s = [torch.tensor([STATUS_ROWS_DROPPED], dtype=torch.int32),
         torch.tensor([STATUS_BAD_INPUT], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)]
    assert read_status(s) == STATUS_ROWS_DROPPED | STATUS_BAD_INPUT
    assert read_status(s[2:]) == 0
    assert "rows dropped" in describe_status(STATUS_ROWS_DROPPED)


def test_layer_capture_refuses_what_cannot_be_captured():
    """What a CUDA graph cannot hold is refused before capture, with the reason (the
    capture itself is checked on GPUs: BENCHMARKS.md, session 5)."""
    from token_dispatcher.layer import MoELayer, capture_layers
    exact = MoELayer(16, 16, 4, 2, dispatcher=MoETokenDispatcher(4))
    with pytest.raises(RuntimeError, match="budget mode"):
        capture_layers([exact], [torch.zeros(4, 16)])
    ckpt = MoELayer(16, 16, 4, 2, dispatcher=MoETokenDispatcher(4, max_rows_per_rank=64),
                    activation_checkpointing=True)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        capture_layers([ckpt], [torch.zeros(4, 16)])
    loop = MoELayer(16, 16, 4, 2, dispatcher=MoETokenDispatcher(4, max_rows_per_rank=64))
    with pytest.raises(RuntimeError, match="grouped_mm"):
        capture_layers([loop], [torch.zeros(4, 16)])  # fp32 CPU rows: the per-expert loop
    # Without captured graphs a layer runs eagerly, whatever the switch says.
    loop.enable_cuda_graph(True)
    assert loop(torch.randn(4, 16)).status is not None
