"""Triton kernel of the collective backends' send side (``alltoall`` / ``allgather``).

Two wire forms of the same metadata rows. Row c of block r is a token's
``[id + 1 (K, as float32; 0 = masked), probs (K)]`` -- for ``alltoall`` the c-th token (in
token order) with an expert on rank r, for ``allgather`` (one block) token c:

* budget form (``moe_dispatch.backends.budget``): R blocks of C rows plus one header row
  each, ``[R, C + 1, 2K]`` float32, zeros past each block's tokens; the header row is
  ``[code, clipped, 0, ...]``.
* packed form (``PACKED``, the exact mode of ``alltoall``: ``moe_dispatch.backends.exact``):
  the blocks back to back with no header and no unused rows, ``[S, 2K]`` float32 (S = the
  tokens sent, summed over ranks); block r starts at the tokens of the blocks before it.
  This is exactly the send buffer ``all_to_all_single`` wants with host-known splits.

``_pack_meta_kernel`` writes all of it in one launch (the torch references take ~25 ops:
a scatter of rank masks, a cumsum, a permute of the rows, the header's stack / pad / cat).
Program j owns rows [j * BLOCK_T, (j + 1) * BLOCK_T) of every block and the tokens of the
same index range (T <= C; C = T in the packed form). It first counts, per rank, the tokens
going there in all and before its tile (re-reading the ids from L2: one launch instead of a
histogram pass), then gives each of its tokens its row in each destination block (the
stable order, as a cumsum over the tile) and writes the rows, for the budget form the zeros
past each block's tokens and, for ``alltoall``, the send plan (``pos_TR``, the counts and,
budget form, the row mask).

Imported only when a kernel is launched (triton is optional).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch, next_power_of_2

from ._triton import _launch_lock


@triton.jit
def _dest_ranks(idx_ptr, t, T, E, L, K: tl.constexpr, R_P2: tl.constexpr,
                BLOCK: tl.constexpr):
    """[BLOCK, R_P2] int32: 1 where token t (< T) has an expert on rank r (0 <= id < E)."""
    rs = tl.arange(0, R_P2)
    tm = t < T
    has = tl.zeros([BLOCK, R_P2], dtype=tl.int32)
    for k in tl.static_range(K):
        ids = tl.load(idx_ptr + t * K + k, mask=tm, other=-1)
        # int32 division (valid ids are < E < 2**31): int64 division is emulated, ~5x slower.
        rank = tl.where((ids >= 0) & (ids < E), ids.to(tl.int32) // L, -1)
        has = tl.maximum(has, (rank[:, None] == rs[None, :]).to(tl.int32))
    return has


@triton.jit(do_not_specialize=["T", "C", "E", "L", "clipped"])
def _pack_meta_kernel(idx_ptr, probs_ptr, code_ptr, meta_ptr, pos_ptr, filled_ptr,
                      counts_ptr, drop_ptr, T, C, E, L, clipped, R: tl.constexpr,
                      R_P2: tl.constexpr, K: tl.constexpr, W_P2: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EVERY: tl.constexpr,
                      PACKED: tl.constexpr):
    j = tl.program_id(0)
    rs = tl.arange(0, R_P2)
    t0 = j.to(tl.int64) * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    if EVERY:  # allgather: one block, token t on row t
        counts = tl.where(rs == 0, T, 0)
        before = tl.zeros([R_P2], dtype=tl.int32)
        has = ((t[:, None] < T) & (rs[None, :] == 0)).to(tl.int32)
    else:
        counts = tl.zeros([R_P2], dtype=tl.int32)
        before = tl.zeros([R_P2], dtype=tl.int32)
        for c0 in range(0, T, BLOCK_C):
            tc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            hc = _dest_ranks(idx_ptr, tc, T, E, L, K, R_P2, BLOCK_C)
            counts += tl.sum(hc, axis=0)
            before += tl.sum(tl.where(tc[:, None] < t0, hc, 0), axis=0)
        has = _dest_ranks(idx_ptr, t, T, E, L, K, R_P2, BLOCK_T)
    # This tile's metadata rows: [id + 1 as float32 (0 = masked) | probs].
    cols = tl.arange(0, W_P2)
    tm = t < T
    ids = tl.load(idx_ptr + t[:, None] * K + cols[None, :],
                  mask=tm[:, None] & (cols[None, :] < K), other=-1)
    probs = tl.load(probs_ptr + t[:, None] * K + (cols[None, :] - K),
                    mask=tm[:, None] & (cols[None, :] >= K) & (cols[None, :] < 2 * K),
                    other=0.0)
    vals = tl.where(cols[None, :] < K, (ids + 1).to(tl.float32), probs.to(tl.float32))
    wmask = cols[None, :] < 2 * K
    rows = t  # this program's rows of every block
    for r in range(R):
        if PACKED:
            # Block r follows the tokens of the blocks before it: send row = its meta row.
            first = tl.sum(tl.where(rs < r, counts, 0), axis=0).to(tl.int64)
            block = meta_ptr + first * (2 * K)
        else:
            first = (r * C).to(tl.int64)
            block = meta_ptr + r * (C + 1).to(tl.int64) * (2 * K)
        has_r = tl.sum(tl.where(rs[None, :] == r, has, 0), axis=1)
        if EVERY:
            row_r = t
        else:
            # Row of token t in block r: the tokens going to r before it (the stable order).
            # A 1-D scan per rank: Triton 3.6 fails to lower a 2-D one of [64, 2] (R = 2).
            before_r = tl.sum(tl.where(rs == r, before, 0), axis=0)
            row_r = (before_r + tl.cumsum(has_r, axis=0) - has_r).to(tl.int64)
            tl.store(pos_ptr + t * R + r, tl.where(has_r > 0, first + row_r, -1), mask=tm)
        tl.store(block + row_r[:, None] * (2 * K) + cols[None, :], vals,
                 mask=(has_r > 0)[:, None] & wmask)
        if not PACKED:
            # Rows past the block's tokens travel as zeros ("no expert").
            count_r = tl.sum(tl.where(rs == r, counts, 0), axis=0)
            unused = (rows >= count_r) & (rows < C)
            tl.store(block + rows[:, None] * (2 * K) + cols[None, :],
                     tl.zeros([BLOCK_T, W_P2], dtype=tl.float32), mask=unused[:, None] & wmask)
            if not EVERY:
                tl.store(filled_ptr + r * C + rows, (rows < count_r).to(tl.uint8),
                         mask=rows < C)
    if j == 0:
        if not PACKED:
            # One header row per block: [code, clipped, 0, ...].
            code = tl.load(code_ptr).to(tl.float32)
            head = tl.where(cols == 0, code, tl.where(cols == 1, clipped.to(tl.float32), 0.0))
            hrow = meta_ptr + (rs[:, None].to(tl.int64) * (C + 1) + C) * (2 * K) + cols[None, :]
            tl.store(hrow, tl.zeros([R_P2, W_P2], dtype=tl.float32) + head[None, :],
                     mask=(rs[:, None] < R) & wmask)
        if not EVERY:
            tl.store(counts_ptr + rs, counts.to(tl.int64), mask=rs < R)
            tl.store(drop_ptr, tl.full([], 0, tl.int8))


def pack_meta(idx_TK: torch.Tensor, probs_TK: torch.Tensor, code: torch.Tensor, clipped: bool,
              num_experts: int, num_local: int, rows: int, meta: torch.Tensor,
              plan_out=None, block_t: int | None = None, block_c: int | None = None,
              packed: bool = False) -> None:
    """One launch: the metadata blocks of either wire form (see the module doc).

    idx_TK:      [T, K] int64 global expert ids (-1 masked; ids outside [0, E) go nowhere),
                 contiguous, T <= rows.
    probs_TK:    [T, K] float32 probs, contiguous.
    code:        0-dim int device tensor, this rank's validation code (header field 0;
                 unread when ``packed``).
    clipped:     whether this rank clipped tokens (header field 1; unused when ``packed``).
    num_experts, num_local: E and L (expert e is on rank e // L; R = E // L blocks when
                 ``packed``, else ``meta.shape[0]``).
    rows:        C, token rows per block (T when ``packed``).
    meta:        float32 output, every element written: [R, C + 1, 2K] (budget form) or
                 [S, 2K] with S = the (token, rank) pairs sent (``packed``).
    plan_out:    ``alltoall`` (one block per rank): (pos_TR [T, R] int64, filled_S
                 [R * C] uint8 (None when ``packed``: every send row is real), counts_R [R]
                 int64, dropped [] bool), the send plan's maps, all written. None:
                 ``allgather`` (one block, every token in order; budget form only).
    block_t, block_c: tiling overrides (tests use them to cross tile boundaries).
    packed:      the packed form (the exact mode's): blocks back to back, no header, no
                 unused rows.
    """
    T, K = idx_TK.shape
    R = num_experts // num_local if packed else meta.shape[0]
    C = rows
    r_p2 = next_power_of_2(R)
    # Every program re-counts all T tokens (from L2) to place its tile: keep them few
    # (<= ~16); each program's own writes are small (metadata rows of 2K floats).
    block_t = block_t or max(64, min(512, next_power_of_2(cdiv(max(C, 1), 16))))
    # The counting tile: big (few serial L2 round trips), within a register budget.
    # No wider than the tokens: masked lanes cost as much as real ones.
    block_c = block_c or min(2048, max(64, 8192 // r_p2), max(16, next_power_of_2(T)))
    every = plan_out is None
    pos, filled, counts, dropped = (meta,) * 4 if every else plan_out
    with _launch_lock:
        launch(_pack_meta_kernel, (max(1, cdiv(C, block_t)),), idx_TK, probs_TK, code,
               meta, pos, meta if filled is None else filled, counts,
               dropped if every else dropped.view(torch.int8), T, C, num_experts, num_local,
               int(clipped), R=R, R_P2=r_p2, K=K, W_P2=next_power_of_2(2 * K),
               BLOCK_T=block_t, BLOCK_C=block_c, EVERY=every, PACKED=packed, num_warps=4)
