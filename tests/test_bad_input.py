"""Invalid input raises a clear ValueError on every rank, and no rank hangs."""
import pytest
import torch

from moe_dispatch.testing import make_case
from token_dispatcher import MoETokenDispatcher

KINDS = ["expert_too_big", "expert_below_minus_one", "nan_prob", "inf_prob", "negative_prob",
         "idx_shape", "probs_shape", "both_forms", "neither_form", "int_hidden", "float_idx",
         "dense_map_shape", "dense_nan", "dense_too_many_for_topk", "hidden_size"]

MESSAGES = {
    "expert_too_big": "expert id", "expert_below_minus_one": "expert id",
    "nan_prob": "NaN", "inf_prob": "inf", "negative_prob": "negative",
    "idx_shape": "topk_idx must be [T, K]", "probs_shape": "topk_probs shape",
    "both_forms": "not both", "neither_form": "give (topk_idx", "int_hidden": "floating",
    "float_idx": "integer", "dense_map_shape": "routing_map must be [T, E]",
    "dense_nan": "NaN", "dense_too_many_for_topk": "more than topk=1",
    "hidden_size": "hidden size",
}


@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("which", KINDS)
def test_bad_input_raises_on_every_rank(gloo_pool, backend, which):
    pool = gloo_pool(2)
    case = make_case(2, [5, 6], hidden=4, num_experts=4, topk=2)
    res = pool.run_raw("dist_workers", "run_bad_input", case, backend, which, 1, timeout=60)
    for rank, r in enumerate(res):
        assert r[0] == "err", f"rank {rank} did not raise for {which}"
        assert r[1] == "DispatchInputError" and issubclass(
            __import__("moe_dispatch").DispatchInputError, ValueError)
    assert MESSAGES[which] in res[1][2], res[1][2]
    # the rank with good input names the rank that failed (a mismatch names both sizes)
    assert ("EP rank(s) [1]" in res[0][2]) or (which == "hidden_size" and MESSAGES[which] in res[0][2])
    # the group is still usable: a valid dispatch runs on both ranks
    ok = pool.run("dist_workers", "run_parity", case, backend, {})
    assert len(ok) == 2


@pytest.mark.parametrize("experts,backends,match", [
    ([8, 12], ["alltoall", "alltoall"], "num_experts"),
    ([8, 8], ["alltoall", "allgather"], "backend"),
    ([5, 5], ["alltoall", "alltoall"], "not divisible"),
])
def test_construction_mismatch_raises_everywhere(gloo_pool, experts, backends, match):
    res = gloo_pool(2).run_raw("dist_workers", "construct", experts, backends, timeout=60)
    for r in res:
        assert r[0] == "err" and r[1] == "ValueError" and match in r[2], r


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(num_experts=4, backend="nope"), ValueError, "unknown backend"),
    (dict(num_experts=4, backend=3), TypeError, "backend"),
    (dict(num_experts=4, capacity_factor=0), ValueError, "capacity_factor"),
    (dict(num_experts=4, pad_multiple=0), ValueError, "pad_multiple"),
    (dict(num_experts=4, capacity_policy="random"), ValueError, "capacity_policy"),
])
def test_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MoETokenDispatcher(**kwargs)


def test_single_process_errors_and_empty_input():
    d = MoETokenDispatcher(4)
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="expert id"):
        d.dispatch(x, topk_idx=torch.tensor([[0], [4], [1]]), topk_probs=torch.ones(3, 1))
    out = d.dispatch(torch.zeros(0, 5), topk_idx=torch.zeros(0, 2, dtype=torch.long),
                     topk_probs=torch.zeros(0, 2))
    assert out.tokens.shape == (0, 5) and out.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert d.combine(out.tokens, out.handle).shape == (0, 5)
    with pytest.raises(ValueError, match="rows"):
        d.combine(torch.zeros(3, 5), out.handle)
    with pytest.raises(TypeError, match="handle"):
        d.combine(out.tokens, object())
