"""Single-process unit tests of routing formats, capacity and permutation."""
import pytest
import torch

from moe_dispatch import (apply_capacity, dense_to_topk, group_plan, permute, topk_to_dense,
                          unpermute)
from moe_dispatch.testing import capacity_mask_reference, make_case
from token_dispatcher import MoETokenDispatcher


def test_topk_dense_roundtrip():
    case = make_case(1, [40], hidden=4, num_experts=10, topk=3, mask_frac=0.3)
    idx, p = case.idxs[0], case.probs[0]
    rm, pd = topk_to_dense(idx, p, 10)
    assert rm.sum().item() == (idx >= 0).sum().item()
    for t in range(40):
        for k in range(3):
            if idx[t, k] >= 0:
                assert rm[t, idx[t, k]] and pd[t, idx[t, k]] == p[t, k]
    idx2, p2 = dense_to_topk(rm, pd, topk=3)
    # same set of (expert, prob) per token, experts ascending
    for t in range(40):
        a = sorted((int(e), float(q)) for e, q in zip(idx[t], p[t]) if e >= 0)
        b = [(int(e), float(q)) for e, q in zip(idx2[t], p2[t]) if e >= 0]
        assert a == b
    idx3, _ = dense_to_topk(rm, pd)  # K read from the map
    assert idx3.shape[1] == int(rm.sum(1).max())


def test_dense_to_topk_grad_flows_only_to_routed():
    rm = torch.tensor([[True, False, True], [False, False, False]])
    pd = torch.rand(2, 3, requires_grad=True)
    idx, p = dense_to_topk(rm, pd, topk=2)
    p.sum().backward()
    assert pd.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("cf", [0.3, 0.75, 1.0, 2.0])
def test_capacity_matches_loop_reference(policy, cf):
    for skew in (None, "zipf", "one_expert"):
        case = make_case(1, [30], hidden=2, num_experts=6, topk=2, skew=skew, mask_frac=0.1)
        idx, p = case.idxs[0], case.probs[0]
        got, gp = apply_capacity(idx, p, 6, cf, policy)
        keep = capacity_mask_reference(idx, p, 6, cf, policy)
        assert torch.equal(got, torch.where(keep, idx, -1))
        assert torch.equal(gp, p * keep)


def test_capacity_ties_prefer_earlier_tokens():
    idx = torch.zeros(4, 1, dtype=torch.long)
    p = torch.full((4, 1), 0.5)
    got, _ = apply_capacity(idx, p, 2, 1.0)  # capacity ceil(4*1/2*1) = 2
    assert got.squeeze(1).tolist() == [0, 0, -1, -1]


def test_permute_padding_and_unpermute():
    lid = torch.tensor([[1, -1], [0, 1], [-1, -1], [2, 0]])
    x = torch.arange(8, dtype=torch.float32).view(4, 2)
    pk = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    plan = group_plan(lid, 3, pad_multiple=4)
    assert plan.tokens_per_expert == (4, 4, 4)
    tok, pr = permute(x, pk, plan)
    # expert 0: rows 1, 3; expert 1: rows 0, 1; expert 2: row 3 — then zero padding
    exp_rows = [1, 3, None, None, 0, 1, None, None, 3, None, None, None]
    exp_p = [0.3, 0.8, 0, 0, 0.1, 0.4, 0, 0, 0.7, 0, 0, 0]
    for i, r in enumerate(exp_rows):
        assert torch.equal(tok[i], x[r] if r is not None else torch.zeros(2))
    assert torch.allclose(pr, torch.tensor(exp_p))
    y = unpermute(tok, plan)
    assert torch.equal(y, x * torch.tensor([[1.0], [2.0], [0.0], [2.0]]))
    unpadded = group_plan(lid, 3, tokens_per_expert=[2, 2, 1])
    assert unpadded.tokens_per_expert == (2, 2, 1) and unpadded.dest_M is None


def test_unpermute_bf16_accumulates_in_fp32():
    lid = torch.zeros(1, 3, dtype=torch.long)
    lid[0, 1:] = torch.tensor([1, 2])
    plan = group_plan(lid, 3)
    y = torch.tensor([[1.0], [2.0 ** -8], [2.0 ** -8]], dtype=torch.bfloat16)
    # summed in bf16 each 2^-8 rounds away (spacing at 1 is 2^-7); fp32 keeps both
    assert unpermute(y, plan).item() == 1.0 + 2.0 ** -7


def test_single_process_forward_matches_dense():
    case = make_case(1, [20], hidden=6, num_experts=5, topk=2, mask_frac=0.2)
    from moe_dispatch.testing import local_experts, reference_moe, rel_err
    d = MoETokenDispatcher(5)
    y = d(case.xs[0], local_experts(case.W, 0), topk_idx=case.idxs[0], topk_probs=case.probs[0])
    assert rel_err(y, reference_moe(case)[0][0]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1e-6])
def test_value_checks_flag_every_bad_prob(dtype, bad):
    from moe_dispatch.routing import canonicalize
    idx = torch.tensor([[0, 1], [2, -1]])
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=dtype)
    _, _, _, ok = canonicalize(torch.zeros(2, 4), 3, topk_idx=idx, topk_probs=p)
    assert not bool(ok.device_bad)
    p[1, 0] = bad
    _, _, _, check = canonicalize(torch.zeros(2, 4), 3, topk_idx=idx, topk_probs=p)
    assert bool(check.device_bad)
    for bad_id in (3, -2):
        idx2 = idx.clone()
        idx2[0, 1] = bad_id
        _, _, _, check = canonicalize(torch.zeros(2, 4), 3, topk_idx=idx2,
                                      topk_probs=torch.ones(2, 2))
        assert bool(check.device_bad)
