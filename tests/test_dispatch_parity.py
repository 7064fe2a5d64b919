"""Every CPU backend against the single-process dense reference, with real gloo ranks."""
import pytest
import torch

from moe_dispatch.routing import topk_to_dense
from moe_dispatch.testing import (capacity_mask_reference, make_case, reference_dispatch,
                                  reference_moe, rel_err)

BACKENDS = ["alltoall", "allgather"]

# name -> (tokens per rank as a function of world, case kwargs, dispatcher opts)
SCENARIOS = {
    "uniform_uneven": (lambda R: [6 + 5 * r for r in range(R)], dict(), {}),
    "masked_slots": (lambda R: [12] * R, dict(mask_frac=0.3), {}),
    # Probs of masked slots are ignored (no weight, zero gradient) whatever they hold.
    "masked_garbage_probs": (lambda R: [12] * R, dict(mask_frac=0.3, masked_prob=0.7), {}),
    "zero_token_rank": (lambda R: [0] + [9] * (R - 1), dict(mask_frac=0.1), {}),
    "all_to_one_expert": (lambda R: [8] * R, dict(skew="one_expert", topk=1), {}),
    "hot_expert_topk": (lambda R: [10] * R, dict(skew="one_expert"), {}),
    "zipf": (lambda R: [16] * R, dict(skew="zipf"), {}),
    "dense_form": (lambda R: [7 + r for r in range(R)], dict(mask_frac=0.2), {"form": "dense"}),
    "dense_zero_token_rank": (lambda R: [0] + [7] * (R - 1), dict(mask_frac=0.2),
                              {"form": "dense"}),
    "dense_form_topk_hint": (lambda R: [6] * R, dict(topk=3), {"form": "dense", "topk": 3}),
    "shape_SBH": (lambda R: [8] * R, dict(mask_frac=0.1), {"shape3d": True}),
    "capacity_probs": (lambda R: [16] * R, dict(skew="zipf"), {"capacity_factor": 0.6}),
    "capacity_position": (lambda R: [12] * R, dict(skew="one_expert"),
                          {"capacity_factor": 1.0, "capacity_policy": "position"}),
    "pad_multiple": (lambda R: [5 + 3 * r for r in range(R)], dict(mask_frac=0.2),
                     {"pad_multiple": 4}),
    "all_ranks_empty": (lambda R: [0] * R, dict(), {}),
}


def _check(results, case, opts, ranks=None, tol=1e-5, exact_rows=True):
    """Compare each rank's results (``ranks``: which entries of ``results`` to check).
    ``exact_rows=False`` for backends whose wire format rounds rows (BF16)."""
    idxs = case.idxs
    if opts.get("capacity_factor"):
        idxs = [torch.where(capacity_mask_reference(i, p, case.num_experts,
                                                    opts["capacity_factor"],
                                                    opts.get("capacity_policy", "probs")), i, -1)
                for i, p in zip(case.idxs, case.probs)]
    ys, gxs, gps = reference_moe(case, idxs)
    for r in (range(len(results)) if ranks is None else ranks):
        res = results[r]
        tok, tpe, pr = reference_dispatch(case, r, opts.get("pad_multiple"), idxs)
        assert torch.equal(res["tpe"], tpe), f"rank {r}: tokens_per_expert {res['tpe']} != {tpe}"
        if exact_rows:
            assert torch.equal(res["tokens"], tok), f"rank {r}: dispatched rows differ"
        else:
            assert res["tokens"].shape == tok.shape and rel_err(res["tokens"], tok) < 1e-2, \
                f"rank {r}: dispatched rows differ"
        assert torch.equal(res["probs"], pr), f"rank {r}: dispatched probs differ"
        T = case.xs[r].shape[0]
        assert res["y"].reshape(T, case.xs[r].shape[1]).shape == ys[r].shape
        if opts.get("shape3d"):
            assert res["y_shape"] == (T // 2, 2, case.xs[r].shape[1])
        assert rel_err(res["y"].reshape(T, case.xs[r].shape[1]), ys[r]) < tol, f"rank {r}: output"
        assert rel_err(res["gx"], gxs[r]) < tol, f"rank {r}: grad hidden"
        gp_ref = gps[r]
        if opts.get("form") == "dense":
            gp_ref = topk_to_dense(idxs[r], gps[r], case.num_experts)[1]
        assert rel_err(res["gp"], gp_ref) < tol, f"rank {r}: grad probs"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_parity_vs_dense_reference(gloo_pool, world, backend, scenario):
    tokens_fn, case_kw, opts = SCENARIOS[scenario]
    kw = dict(hidden=8, num_experts=4 * world, topk=3)
    kw.update(case_kw)
    case = make_case(world, tokens_fn(world), **kw)
    results = gloo_pool(world).run("dist_workers", "run_parity", case, backend, opts)
    _check(results, case, opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_routing_forms_identical(gloo_pool, backend):
    case = make_case(2, [9, 4], hidden=6, num_experts=8, topk=2, mask_frac=0.25)
    a = gloo_pool(2).run("dist_workers", "run_parity", case, backend, {"form": "topk"})
    b = gloo_pool(2).run("dist_workers", "run_parity", case, backend, {"form": "dense"})
    for ra, rb in zip(a, b):
        for key in ("tokens", "tpe", "probs", "y", "gx"):
            assert torch.equal(ra[key], rb[key]), key


def test_backends_agree(gloo_pool):
    case = make_case(4, [11, 0, 7, 13], hidden=8, num_experts=16, topk=4, skew="zipf",
                     mask_frac=0.1)
    a = gloo_pool(4).run("dist_workers", "run_parity", case, "alltoall", {})
    b = gloo_pool(4).run("dist_workers", "run_parity", case, "allgather", {})
    for ra, rb in zip(a, b):
        assert torch.equal(ra["tokens"], rb["tokens"]) and torch.equal(ra["tpe"], rb["tpe"])
        assert rel_err(ra["y"], rb["y"]) < 1e-6
