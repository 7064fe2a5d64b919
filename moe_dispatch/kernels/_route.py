"""The exact mode's routing message in one launch.

Before its one host sync, an exact-mode dispatch needs, per destination: how many tokens it
sends there, how many slots go to each expert, and its validation code, H and K, all in
the small int64 table the ranks exchange. In torch that is ~12 launches (a remainder, a
division, a mask scatter, a bincount, sums, a cat, a host-to-device copy of H and K); here
it is one program that reads the ids once.

Message rows (``ROW = 4 + L`` int64 each, one row per destination rank ``r``):
    [a, code, H, K, count of expert r*L + 0, ..., count of expert r*L + L - 1]
``a`` is the number of tokens with at least one expert on rank r (``PER_RANK``, the
all-to-all's send sizes), or T (one row for all E experts, the all-gather's form, L = E).

With the probs given (``CHECK``), the same walk also makes the input check of
``kernels._check`` (an id outside [-1, E), a NaN, infinite or negative prob) and folds it
into the code it writes: the exact mode then needs no check launch of its own. Bad ids are
not rewritten: they count nowhere here, and every rank raises at the sync that reads this
message, before anything else uses them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, next_power_of_2
from ._triton import _launch_lock


_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # kernels may read constexpr globals only


@triton.jit(do_not_specialize=["T", "H"])
def _route_counts_kernel(idx_ptr, probs_ptr, code_ptr, msg_ptr, T, H, E: tl.constexpr,
                         L: tl.constexpr, K: tl.constexpr, NUM_ROWS: tl.constexpr,
                         E_P2: tl.constexpr, R_P2: tl.constexpr, PER_RANK: tl.constexpr,
                         CHECK: tl.constexpr, BLOCK_T: tl.constexpr):
    ROW: tl.constexpr = L + 4
    experts = tl.arange(0, E_P2)
    ranks = tl.arange(0, R_P2)
    hist = tl.zeros([E_P2], dtype=tl.int32)
    per_rank = tl.zeros([R_P2], dtype=tl.int32)
    bad = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < T
        present = tl.zeros([BLOCK_T, R_P2], dtype=tl.int32)
        for k in tl.static_range(K):
            e = tl.load(idx_ptr + t.to(tl.int64) * K + k, mask=tmask, other=-1)
            ok = (e >= 0) & (e < E)
            if CHECK:
                # kernels._check's test: NaN fails both comparisons, +inf the second.
                p = tl.load(probs_ptr + t.to(tl.int64) * K + k, mask=tmask, other=0.0)
                p = p.to(tl.float32)
                bad_k = (e < -1) | (e >= E) | ~((p >= 0.0) & (p <= _FLT_MAX))
                bad = bad | (bad_k & tmask).to(tl.int32)
            # Invalid and masked slots count in the spare bin E (E_P2 > E), never read.
            hist += tl.histogram(tl.where(ok, e, E).to(tl.int32), E_P2)
            if PER_RANK:
                r = tl.where(ok, e // L, -1).to(tl.int32)
                present = present | (r[:, None] == ranks[None, :]).to(tl.int32)
        per_rank += tl.sum(present, axis=0)
    code = tl.load(code_ptr)
    if CHECK:
        # 0 fine, 1 a value error, 2 a host error (whose placeholder input has no slots).
        code = tl.maximum(code, tl.max(bad, axis=0).to(tl.int64))
    rows = tl.arange(0, R_P2)
    rmask = rows < NUM_ROWS
    base = rows.to(tl.int64) * ROW
    first = per_rank.to(tl.int64) if PER_RANK else tl.zeros([R_P2], dtype=tl.int64) + T
    tl.store(msg_ptr + base, first, mask=rmask)
    tl.store(msg_ptr + base + 1, tl.zeros([R_P2], dtype=tl.int64) + code, mask=rmask)
    tl.store(msg_ptr + base + 2, tl.zeros([R_P2], dtype=tl.int64) + H, mask=rmask)
    tl.store(msg_ptr + base + 3, tl.zeros([R_P2], dtype=tl.int64) + K, mask=rmask)
    tl.store(msg_ptr + (experts // L) * ROW + 4 + experts % L, hist.to(tl.int64),
             mask=experts < E)


def route_counts(idx_TK: torch.Tensor, code: torch.Tensor, msg: torch.Tensor, *,
                 num_experts: int, num_local: int, hidden: int, per_rank: bool,
                 probs_TK: "torch.Tensor | None" = None) -> None:
    """Write the routing message (module doc) into ``msg`` in one launch.

    idx_TK:      [T, K] int64 global expert ids (-1 masked; out-of-range ids count nowhere:
                 the validation code reports them), contiguous.
    code:        0-dim int64 device tensor, this rank's validation code.
    probs_TK:    [T, K] float32 probs, contiguous, to check with the ids (module doc): the
                 code written is then max(code, 1 if any id or prob is bad); None: ``code``
                 as given.
    msg:         int64 [R, L + 4] (``per_rank``, R = E / L) or [E + 4] (all-gather form,
                 ``num_local`` = E), contiguous; fully written.
    num_experts: E.  num_local: L.  hidden: H (written into the header).
    per_rank:    count tokens per destination rank (all-to-all) or write T (all-gather).
    """
    T, K = idx_TK.shape
    E, L = num_experts, num_local
    rows = E // L if per_rank else 1
    e_p2 = next_power_of_2(E + 1)
    r_p2 = next_power_of_2(max(rows, 1))
    # One program: T * K ids is at most a few hundred thousand; the histogram instruction
    # keeps the tile small ([BLOCK_T] ids per step, not [BLOCK_T, E]).
    block = max(16, min(256, 8192 // max(r_p2, 1)))
    with _launch_lock:
        launch(_route_counts_kernel, (1,), idx_TK, idx_TK if probs_TK is None else probs_TK,
               code, msg, T, hidden, E=E, L=L, K=K, NUM_ROWS=rows, E_P2=e_p2, R_P2=r_p2,
               PER_RANK=per_rank, CHECK=probs_TK is not None, BLOCK_T=block, num_warps=4)
