"""The exact mode's routing message in one launch (``moe_dispatch.kernels._route``) against
the torch reference (``backends.exact.route_message`` on CPU), under TRITON_INTERPRET=1 on
CPU (for real on a GPU machine): masked slots, out-of-range ids, no tokens, one and many
destination ranks, token blocks crossed, odd K; and the input check the message makes
itself when given the probs (the exact mode's dispatch has no check launch of its own)."""
import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402

from moe_dispatch.backends.exact import (expert_counts, read_messages, read_tables,  # noqa: E402
                                        route_message)

pytestmark = needs_triton

CASES = [  # (T, K, E, L, per_rank)
    (37, 8, 16, 4, True),
    (600, 2, 64, 8, True),    # crosses token blocks
    (5, 3, 6, 6, True),       # one rank
    (0, 4, 8, 2, True),       # no tokens
    (50, 6, 32, 32, False),   # the all-gather form
    (300, 1, 10, 10, False),
]


def _routing(T, K, E, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, K), generator=g)
    drop = torch.rand(T, K, generator=g)
    idx[drop < 0.15] = -1
    idx[(drop > 0.15) & (drop < 0.18)] = E + 3     # invalid: counted nowhere
    idx[(drop > 0.18) & (drop < 0.20)] = -7
    return idx


@pytest.mark.parametrize("T,K,E,L,per_rank", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_route_message_matches_reference(T, K, E, L, per_rank, seed):
    from moe_dispatch.kernels import _route
    idx = _routing(T, K, E, seed)
    code = torch.tensor(seed, dtype=torch.int64)
    ref = route_message(idx, code, E, L, 96, per_rank)
    rows = E // L if per_rank else 1
    msg = torch.full((rows, 4 + L), -99, dtype=torch.int64, device=DEV)  # poisoned
    _route.route_counts(idx.to(DEV), code.to(DEV), msg, num_experts=E, num_local=L,
                        hidden=96, per_rank=per_rank)
    assert torch.equal(msg.cpu().view(ref.shape), ref)
    # the reference itself, column by column
    if per_rank:
        rank_TK = torch.where((idx >= 0) & (idx < E), idx // L, -1)
        for r in range(rows):
            assert ref[r, 0] == int((rank_TK == r).any(1).sum())
    else:
        assert int(ref[0]) == T
    counts = torch.bincount(idx[(idx >= 0) & (idx < E)], minlength=E)
    assert torch.equal(ref.view(rows, 4 + L)[:, 4:].reshape(-1), counts)


BAD_KINDS = ["none", "id_E", "id_minus_2", "nan", "inf", "negative", "minus_zero",
             "masked_bad_prob", "last_token"]


def _bad_input(T, K, E, seed, kind):
    """Valid routing (ids in [-1, E), probs in [0, 1)) with one defect of ``kind``, and
    whether the check must flag it."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, K), generator=g)
    idx[torch.rand(T, K, generator=g) < 0.2] = -1
    probs = torch.rand(T, K, generator=g)
    t, k = (T - 1, K - 1) if kind == "last_token" else (T // 2, K // 2)
    flagged = kind not in ("none", "minus_zero")
    if kind == "id_E":
        idx[t, k] = E
    elif kind == "id_minus_2":
        idx[t, k] = -2
    elif kind in ("nan", "masked_bad_prob"):
        probs[t, k] = float("nan")
        if kind == "masked_bad_prob":  # masked slots are checked like any other
            idx[t, k] = -1
    elif kind == "inf":
        probs[t, k] = float("inf")
    elif kind in ("negative", "last_token"):
        probs[t, k] = -1e-30
    elif kind == "minus_zero":
        probs[t, k] = -0.0  # fine, as in the check kernel
    return idx, probs, flagged


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("T,K,E,L,per_rank", [(37, 8, 16, 4, True), (600, 2, 64, 8, True),
                                              (50, 6, 32, 32, False)])
@pytest.mark.parametrize("code_in", [0, 2])
def test_message_checks_ids_and_probs(T, K, E, L, per_rank, kind, code_in):
    from moe_dispatch.kernels import _route
    idx, probs, flagged = _bad_input(T, K, E, T + K, kind)
    code = torch.tensor(code_in, dtype=torch.int64)
    want = max(code_in, int(flagged))
    ref = route_message(idx, code, E, L, 96, per_rank, probs_TK=probs)
    rows = E // L if per_rank else 1
    assert (ref.view(rows, 4 + L)[:, 1] == want).all(), (kind, ref)
    msg = torch.full((rows, 4 + L), -99, dtype=torch.int64, device=DEV)
    _route.route_counts(idx.to(DEV), code.to(DEV), msg, num_experts=E, num_local=L,
                        hidden=96, per_rank=per_rank, probs_TK=probs.to(DEV))
    assert torch.equal(msg.cpu().view(ref.shape), ref), kind
    # the counts are those of the message without the check (bad ids count nowhere)
    plain = route_message(idx, code, E, L, 96, per_rank)
    assert torch.equal(ref.view(rows, -1)[:, 4:], plain.view(rows, -1)[:, 4:])


def test_read_messages_one_copy_and_aliases():
    a = torch.arange(12).view(3, 4)
    b = torch.arange(5)
    ra, rb, ra2 = read_messages(a, b, a)
    assert ra == a.tolist() and ra2 == ra and rb == b.tolist()
    (la, lb, la2), (ta, tb, ta2) = read_tables(a, b, a)
    assert la == ra and lb == rb and la2 == ra
    assert torch.equal(ta, a) and torch.equal(tb, b) and ta2 is ta and ta.device.type == "cpu"
    if DEV.type == "cuda":  # a device table comes back to the CPU in the same copy
        (lc, ld), (tc, td) = read_tables(a.to(DEV), b)
        assert lc == ra and torch.equal(tc, a) and tc.device.type == "cpu"


@pytest.mark.parametrize("R,L,pad", [(1, 256, None), (3, 4, 1), (4, 6, 4), (2, 5, 128)])
def test_expert_counts_match_the_python_sums(R, L, pad):
    from moe_dispatch.permute import pad_counts
    g = torch.Generator().manual_seed(R * L)
    table = torch.randint(0, 300, (R, 4 + 3 * L), generator=g)
    first = 4 + L  # e.g. this rank's columns in the all-gather form
    rows = table.tolist()
    want = [sum(c) for c in zip(*(row[first:first + L] for row in rows))]
    counts, padded = expert_counts(table, first, L, pad)
    assert counts == want and all(type(c) is int for c in counts)
    assert padded.dtype == torch.int64 and padded.device.type == "cpu"
    assert padded.tolist() == pad_counts(want, pad)
