"""Triton kernels for row permutation and for peer-to-peer dispatch over symmetric memory.

Imported only when a kernel is actually launched (triton is optional). Every kernel moves
whole rows of a [rows, H] matrix, one program per (row, block of H columns), with the row
mapping given as an index map: ``pos[v, k]`` is the output row of slot ``k`` of input row
``v``; ``-1`` means "no such slot" and ``-2`` means "slot exists but its row was dropped"
(static-budget overflow: nothing is written, but the row still counts as sent).

Two kernel shapes cover every direction:
  * ``scatter_rows``: read input row ``v`` once, write it to each ``pos[v, k] >= 0``
    (permute; the backward of unpermute; the dispatch pull from peer buffers);
  * ``gather_reduce``: out[v] = sum_k in[pos[v, k]] in float32, written once
    (unpermute; the backward of permute; the combine push into peer buffers).
The PEER variants read (scatter) or write (gather) rows through a table of device
pointers, one per rank, so one launch talks to every GPU of the group over NVLink.
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from . import _env
from ..protocol import STATUS_BAD_INPUT, STATUS_ROWS_DROPPED, STATUS_TOKENS_DROPPED
from ._launch import cdiv, launch, next_power_of_2

# The interpreter (and first-call compilation) is not re-entrant across threads
# (simulated ranks in tests).
_launch_lock = threading.RLock()


def _block_h(H: int, elem_size: int, exact: bool = False) -> tuple[int, int]:
    """(BLOCK_H, num_warps): a whole row per program up to 16 KiB (one wide burst of
    independent loads per program, few programs), 16-32 bytes per thread.

    exact: when H is not a power of two, prefer the widest power-of-two tile of >= 2 KiB
    that divides H, so no lane idles (H=7168 bf16: 1024-wide tiles, 4 warps; measured on
    H200 at the DeepEP shape: permute 87 %, unpermute 89 % of the copy ceiling, against
    89 % / 79 % with one 8192-wide tile). Used by the local kernels.
    MOE_DISPATCH_TRITON_BLOCK="BLOCK_H,num_warps" overrides (for tuning)."""
    env = _env.get("MOE_DISPATCH_TRITON_BLOCK")
    if env:
        b, w = (int(v) for v in env.split(","))
        return b, w
    cap = max(16384 // elem_size, 16)
    block = min(next_power_of_2(max(H, 1)), cap)
    if exact and H % block:
        b = block // 2
        while b * elem_size >= 2048 and H % b:
            b //= 2
        if b * elem_size >= 2048:
            block = b
    warps = max(1, min(16, block * elem_size // 512))
    return block, warps


# Rank-dependent integers are not specialized, so every rank compiles the same variants.
@triton.jit(do_not_specialize=["rank_shift", "num_src", "p_stride"])
def _scatter_rows_kernel(src_ptr, src_table, rows_per_src, rank_shift, pos_ptr, out_ptr,
                         pin_ptr, pin_table, pout_ptr, dst_table, H, num_src, p_stride,
                         K: tl.constexpr, PEER: tl.constexpr, WITH_PROBS: tl.constexpr,
                         BLOCK_H: tl.constexpr, INDIRECT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    if PEER:
        # Consecutive programs read from different ranks, so every NVLink carries
        # traffic at once instead of all ranks draining one source at a time.
        s = (pid % num_src + rank_shift) % num_src
        t = pid // num_src
        v = s * rows_per_src + t
    else:
        v = pid
    if INDIRECT:
        # Output addresses from a device table (a CUDA graph replays this launch on new
        # outputs); the pointer arguments only give element types. Entry 2 receives a copy
        # of the plan rows (pos), so the caller keeps one the next replay cannot overwrite.
        out_ptr = tl.multiple_of(tl.load(dst_table + 0).to(out_ptr.dtype), 16)
        pout_ptr = tl.load(dst_table + 1).to(pout_ptr.dtype)
        if hb == 0:
            pos_copy = tl.load(dst_table + 2).to(pos_ptr.dtype)
            for k in tl.static_range(K):
                tl.store(pos_copy + v * K + k, tl.load(pos_ptr + v * K + k))
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    # Scalars are broadcast to vectors before comparing: masks stay boolean vectors.
    zero_v = tl.zeros([BLOCK_H], dtype=tl.int64)
    n_slot = zero_v
    for k in tl.static_range(K):
        n_slot += (tl.load(pos_ptr + v * K + k) + zero_v >= 0).to(tl.int64)
    if PEER:
        # Buffers are 256-byte aligned: the hint keeps 16-byte vector accesses.
        base = tl.multiple_of(tl.load(src_table + s).to(out_ptr.dtype), 16)
        row_ptr = base + t * H
    else:
        row_ptr = src_ptr + v * H
    x = tl.load(row_ptr + cols, mask=cmask & (n_slot > 0))
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + v * K + k)
        tl.store(out_ptr + p * H + cols, x, mask=cmask & (p + zero_v >= 0))
    if WITH_PROBS:
        if hb == 0:
            if PEER:
                pbase = tl.load(pin_table + s).to(pout_ptr.dtype) + t * K
            else:
                pbase = pin_ptr + v * p_stride  # probs rows may be a strided view
            for k in tl.static_range(K):
                p = tl.load(pos_ptr + v * K + k)
                if p >= 0:
                    tl.store(pout_ptr + p, tl.load(pbase + k).to(tl.float32))


@triton.jit(do_not_specialize=["dst_row_base", "num_dst"])
def _gather_reduce_kernel(y_ptr, pos_ptr, out_ptr, out_table, rows_per_dst, dst_row_base,
                          gin_ptr, gout_table, H, num_dst,
                          K: tl.constexpr, PEER: tl.constexpr, WITH_PROBS: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    if PEER:
        s = (pid % num_dst + dst_row_base // rows_per_dst) % num_dst
        t = pid // num_dst
        v = s * rows_per_dst + t
    else:
        v = pid
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    zero_v = tl.zeros([BLOCK_H], dtype=tl.int64)
    n_sent = zero_v
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + v * K + k) + zero_v
        n_sent += (p != -1).to(tl.int64)
        acc += tl.load(y_ptr + p * H + cols, mask=cmask & (p >= 0), other=0.0).to(tl.float32)
    if PEER:
        # Row t of the partial sums from this rank lands in rank s's receive area.
        base = tl.multiple_of(tl.load(out_table + s).to(out_ptr.dtype), 16)
        tl.store(base + (dst_row_base + t) * H + cols, acc.to(out_ptr.dtype.element_ty),
                 mask=cmask & (n_sent > 0))
        if WITH_PROBS:
            if hb == 0:
                gbase = tl.load(gout_table + s).to(gin_ptr.dtype) + t * K
                for k in tl.static_range(K):
                    q = tl.load(pos_ptr + v * K + k)
                    if q != -1:
                        # dropped slots (-2) send back a zero gradient
                        g = tl.load(gin_ptr + tl.maximum(q, 0), mask=q >= 0, other=0.0)
                        tl.store(gbase + k, g)
    else:
        tl.store(out_ptr + v * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["M"])
def _zero_unfilled_kernel(out_ptr, filled_ptr, probs_ptr, M, H, WITH_PROBS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program per BLOCK_M rows: it reads their flags and stops unless one is 0, so the
    # launch costs a flag read per row and the stores touch padding rows only (one
    # program per (row, column block) cost more than the permute itself at pad 128).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    empty = (tl.load(filled_ptr + rows, mask=rmask, other=1) == 0) & rmask
    if tl.sum(empty.to(tl.int32), axis=0) > 0:
        if WITH_PROBS:
            tl.store(probs_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.float32), mask=empty)
        zero = tl.zeros([BLOCK_M, BLOCK_H], dtype=out_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            tl.store(out_ptr + rows[:, None] * H + cols[None, :], zero,
                     mask=empty[:, None] & (cols[None, :] < H))


@triton.jit
def _peer_gather_kernel(table, out_ptr, n, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    base = tl.multiple_of(tl.load(table + s).to(out_ptr.dtype), 16)
    vals = tl.load(base + offs, mask=offs < n)
    tl.store(out_ptr + s.to(tl.int64) * n + offs, vals, mask=offs < n)


@triton.jit(do_not_specialize=["rank", "channel"])
def _barrier_kernel(flag_table, rank, channel, status_ptr, R: tl.constexpr,
                    MAX_SPIN: tl.constexpr):
    # Same two-phase protocol as torch's symmetric-memory barrier: set my slot in every
    # peer's pad (release), then consume every peer's slot in mine (acquire). Slots go
    # 0 -> 1 -> 0, so the barrier is stateless and safe to replay in a CUDA graph.
    # A spin limit turns a lost peer into a status bit instead of a hung GPU.
    mine = tl.load(flag_table + rank).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(R):
        if r != rank:
            peer = tl.load(flag_table + r).to(tl.pointer_type(tl.int32))
            addr = peer + channel * R + rank
            n = tl.full([], 0, tl.int32)
            while (tl.atomic_cas(addr, 0, 1, sem="release", scope="sys") != 0) & (n < MAX_SPIN):
                n += 1
            if n >= MAX_SPIN:
                tl.atomic_or(status_ptr, 8)
    for r in tl.static_range(R):
        if r != rank:
            addr = mine + channel * R + r
            n = tl.full([], 0, tl.int32)
            while (tl.atomic_cas(addr, 1, 0, sem="acquire", scope="sys") != 1) & (n < MAX_SPIN):
                n += 1
            if n >= MAX_SPIN:
                tl.atomic_or(status_ptr, 8)


def _launch(kernel, grid, *args, **kw):
    if grid[0] == 0 or (len(grid) > 1 and grid[1] == 0):
        return
    with _launch_lock:  # uncontended in real use; serializes simulated ranks' launches
        launch(kernel, grid, *args, **kw)


# ----------------------------------------------------------------------------- local


def scatter_rows(x_VH: torch.Tensor, pos_VK: torch.Tensor, out_MH: torch.Tensor,
                 probs_VK: torch.Tensor | None = None,
                 probs_M: torch.Tensor | None = None) -> None:
    """out[pos[v, k]] = x[v] for every pos >= 0; probs_M[pos[v, k]] = probs_VK[v, k]
    (probs_VK: unit stride along K, any row stride)."""
    V, H = x_VH.shape
    K = pos_VK.shape[1]
    block, warps = _block_h(H, x_VH.element_size(), exact=True)
    with_p = probs_M is not None
    # At least one column block: with H == 0 the probs still move.
    _launch(_scatter_rows_kernel, (V, max(1, cdiv(H, block))),
            x_VH, pos_VK, 1, 0, pos_VK, out_MH,
            probs_VK if with_p else pos_VK, pos_VK, probs_M if with_p else out_MH, pos_VK, H, 1,
            probs_VK.stride(0) if with_p else K, K=K, PEER=False, WITH_PROBS=with_p,
            BLOCK_H=block, INDIRECT=False, num_warps=warps)


def gather_reduce(y_MH: torch.Tensor, pos_VK: torch.Tensor, out_VH: torch.Tensor) -> None:
    """out[v] = sum_k y[pos[v, k]] over pos >= 0, accumulated in float32 (zeros if none)."""
    V, K = pos_VK.shape
    H = out_VH.shape[1]
    block, warps = _block_h(H, out_VH.element_size(), exact=True)
    _launch(_gather_reduce_kernel, (V, cdiv(H, block)),
            y_MH, pos_VK, out_VH, pos_VK, 1, 0, y_MH, pos_VK, H, 1,
            K=K, PEER=False, WITH_PROBS=False, BLOCK_H=block, num_warps=warps)


def zero_unfilled(out_MH: torch.Tensor, filled_M: torch.Tensor,
                  probs_M: torch.Tensor | None = None) -> None:
    """Zero every row m of out_MH with filled_M[m] == 0 (padding / unused budget rows),
    and probs_M[m] ([M] float32) with it when given."""
    M, H = out_MH.shape
    with_p = probs_M is not None
    # 32 rows x 16 bytes per thread-column: 16 KiB of zeros per store step, 4 warps.
    block_m = 32
    block_h = max(16, min(next_power_of_2(max(H, 1)), 512 // out_MH.element_size()))
    _launch(_zero_unfilled_kernel, (cdiv(M, block_m),), out_MH, filled_M,
            probs_M if with_p else out_MH, M, H, WITH_PROBS=with_p, BLOCK_M=block_m,
            BLOCK_H=block_h, num_warps=4)


# ----------------------------------------------------------------------------- peers


def peer_scatter_rows(src_table: torch.Tensor, rows_per_src: int, rank: int,
                      pos_VK: torch.Tensor, out_MH: torch.Tensor,
                      pin_table: torch.Tensor | None = None,
                      probs_M: torch.Tensor | None = None,
                      dst_table: torch.Tensor | None = None) -> None:
    """Pull: row t of rank s's buffer (``src_table[s]``, [rows_per_src, H], dtype of out)
    goes to out[pos[s * rows_per_src + t, k]]; probs likewise from ``pin_table[s]``
    ([rows_per_src, K] float32).

    dst_table: optional [3] int64 device tensor holding the addresses of out (16-byte
    aligned), probs_M and a [V, K] int64 buffer that receives a copy of ``pos_VK``, read at
    run time (for CUDA-graph replays on new outputs; out_MH / probs_M then only give
    dtypes). Needs probs."""
    R = src_table.shape[0]
    V, K = pos_VK.shape
    H = out_MH.shape[1]
    block, warps = _block_h(H, out_MH.element_size())
    with_p = probs_M is not None
    indirect = dst_table is not None
    if indirect and not with_p:
        raise ValueError("peer_scatter_rows: dst_table needs probs")
    _launch(_scatter_rows_kernel, (V, cdiv(H, block)),
            out_MH, src_table, rows_per_src, rank, pos_VK, out_MH,
            pos_VK, pin_table if with_p else src_table, probs_M if with_p else out_MH,
            dst_table if indirect else src_table, H, R, K, K=K, PEER=True, WITH_PROBS=with_p,
            BLOCK_H=block, INDIRECT=indirect, num_warps=warps)


def peer_gather_reduce(y_MH: torch.Tensor, pos_VK: torch.Tensor, dst_table: torch.Tensor,
                       rows_per_dst: int, rank: int, like: torch.Tensor,
                       grad_probs_M: torch.Tensor | None = None,
                       gout_table: torch.Tensor | None = None) -> None:
    """Push: partial[v] = sum_k y[pos[v, k]] goes to row ``rank * rows_per_dst + t`` of
    rank s's buffer ``dst_table[s]`` (v = s * rows_per_dst + t), for every v with a slot
    (pos != -1). With ``grad_probs_M``, slot k's value grad_probs_M[pos] (0 if dropped)
    goes to element [t, k] of ``gout_table[s]`` ([rows_per_dst, K] float32).
    ``like`` is any tensor of the destination dtype (its pointer type is used)."""
    R = dst_table.shape[0]
    V, K = pos_VK.shape
    H = y_MH.shape[1]
    block, warps = _block_h(H, y_MH.element_size())
    with_p = grad_probs_M is not None
    _launch(_gather_reduce_kernel, (V, cdiv(H, block)),
            y_MH, pos_VK, like, dst_table, rows_per_dst, rank * rows_per_dst,
            grad_probs_M if with_p else y_MH, gout_table if with_p else dst_table, H, R,
            K=K, PEER=True, WITH_PROBS=with_p, BLOCK_H=block, num_warps=warps)


def peer_gather(table: torch.Tensor, out_RN: torch.Tensor) -> None:
    """out[s] = the first N elements of rank s's buffer ``table[s]`` (dtype of out)."""
    R, N = out_RN.shape
    block = min(1024, next_power_of_2(max(N, 1)))
    _launch(_peer_gather_kernel, (R, cdiv(N, block)), table, out_RN, N, BLOCK=block)


_MAX_SPIN = int(os.environ.get("MOE_DISPATCH_BARRIER_SPIN", str(1 << 26)))


def barrier(flag_table: torch.Tensor, rank: int, channel: int, status: torch.Tensor,
            max_spin: int = _MAX_SPIN) -> None:
    """Device-side barrier over the signal slots ``flag_table[r] + channel * R``.

    Gives up after ``max_spin`` polls of one slot (about a minute by default, long enough
    for a peer compiling a kernel) and ORs STATUS_BARRIER_TIMEOUT (8) into ``status``."""
    R = flag_table.shape[0]
    kernel = _barrier_kernel
    # No launch lock here: simulated ranks spin concurrently.
    launch(kernel, (1,), flag_table, rank, channel, status, R=R, MAX_SPIN=max_spin, num_warps=1)


# ----------------------------------------------------------------------------- layout
#
# The budget plan of a dispatch in two launches (replacing ~25 torch ops and a stable argsort):
#   1. ``_layout_hist_kernel``: program (s, j) reads chunk j of source s's expert ids and
#      counts the slots of each local expert (one-hot sums); in TABLE mode programs (s, 0)
#      also copy rank s's meta row into the host buffer.
#   2. ``_layout_pos_kernel``: every program reduces the [chunks, L] histogram (a few KB,
#      from L2) to per-expert totals, padded block starts and its chunk's offsets, then walks
#      its chunk again giving each slot its row: block start + earlier slots of the expert
#      (a cumsum over the one-hot tile) -- the stable (expert, source, row, slot) order.
#      Program (0, 0) writes tokens_per_expert, the dropped flag and the status word; with
#      FILLED every program also writes its slice of the row mask. TABLE with HEADER (the
#      nvshmem static budget): program (0, 0) also writes the dispatch's int32 status word
#      from the ranks' meta rows (``_table_status``), so no torch op follows the plan.
# Where the ids come from (constexpr TABLE):
#   * TABLE (nvshmem): source s is rank s, whose staged int32 global ids sit at the address
#     ``src[s]`` (a device pointer table); the slots of a source are contiguous.
#   * otherwise: source s is block s of an id matrix (any int or float dtype, e.g. the
#     received float32 metadata of ``alltoall`` / ``allgather``): slot i is element
#     ``i % K`` of row ``i // K``, at ``src + s * blk_stride + row * row_stride + i % K``.
#     With HEADER the row just past each block is a header ``[code, clipped, ...]`` whose
#     nonzero fields become status bits.
# Every id read has ``shift`` subtracted (global -> local id, and a wire encoding's +1);
# slots whose result is outside [0, L) have no row here.

# Status bits (``moe_dispatch.protocol.STATUS_*``); kernels read constexpr globals only.
_ROWS_DROPPED = tl.constexpr(STATUS_ROWS_DROPPED)
_TOKENS_DROPPED = tl.constexpr(STATUS_TOKENS_DROPPED)
_BAD_INPUT = tl.constexpr(STATUS_BAD_INPUT)


@triton.jit
def _layout_lids(src, s, i, ok, K, row_stride, blk_stride, shift, TABLE: tl.constexpr):
    """[BLOCK_S] int32 local expert ids of the flat slots ``i`` of source ``s`` (-1 where
    not ``ok``); see the comment above for the two addressings."""
    if TABLE:
        base = tl.load(src + s).to(tl.pointer_type(tl.int32))
        ids = tl.load(base + i, mask=ok, other=0)
    else:
        row = i // K
        ids = tl.load(src + s.to(tl.int64) * blk_stride + row * row_stride + (i - row * K),
                      mask=ok, other=0)
    return tl.where(ok, ids.to(tl.int32) - shift, -1)


@triton.jit(do_not_specialize=["slots_per_src", "chunk", "shift", "K", "row_stride",
                               "blk_stride"])
def _layout_hist_kernel(src, meta_table, host_ptr, hist_ptr, slots_per_src, chunk, shift, K,
                        row_stride, blk_stride, L: tl.constexpr, L_P2: tl.constexpr,
                        NCP: tl.constexpr, BLOCK_S: tl.constexpr, TABLE: tl.constexpr):
    s = tl.program_id(0)
    j = tl.program_id(1)
    if TABLE:
        if j == 0:
            m = tl.arange(0, 16)
            mbase = tl.load(meta_table + s).to(tl.pointer_type(tl.int64))
            tl.store(host_ptr + s * 16 + m, tl.load(mbase + m))
    experts = tl.arange(0, L_P2)
    hist = tl.zeros([L_P2], dtype=tl.int32)
    start = j.to(tl.int64) * chunk
    for off in range(0, chunk, BLOCK_S):
        i = start + off + tl.arange(0, BLOCK_S)
        lid = _layout_lids(src, s, i, i < slots_per_src, K, row_stride, blk_stride, shift,
                           TABLE)
        hit = (lid[:, None] == experts[None, :]) & (experts[None, :] < L)
        hist += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(hist_ptr + (s * NCP + j) * L_P2 + experts, hist)


@triton.jit
def _layout_status(src, dropped, rows, row_stride, blk_stride, R: tl.constexpr,
                   R_P2: tl.constexpr, HEADER: tl.constexpr):
    """int32 status bits: rows dropped here, plus (HEADER) the OR over the R blocks'
    headers of "clipped" (field 1) and "bad input" (field 0). R_P2: a power of 2 >= R."""
    bits = dropped.to(tl.int32) * _ROWS_DROPPED
    if HEADER:
        rs = tl.arange(0, R_P2)
        hdr = src + rs.to(tl.int64) * blk_stride + rows * row_stride
        code = tl.max(tl.load(hdr, mask=rs < R, other=0).to(tl.float32), axis=0)
        clipped = tl.max(tl.load(hdr + 1, mask=rs < R, other=0).to(tl.float32), axis=0)
        bits += (clipped != 0).to(tl.int32) * _TOKENS_DROPPED
        bits += (code != 0).to(tl.int32) * _BAD_INPUT
    return bits


@triton.jit(do_not_specialize=["slots_per_src", "chunk", "shift", "budget", "pad", "K",
                               "row_stride", "blk_stride", "m_chunk", "token_cap"])
def _layout_pos_kernel(src, hist_ptr, pos_ptr, tpe_ptr, drop_ptr, status_ptr, filled_ptr,
                       slots_per_src, chunk, shift, budget, pad, K, row_stride, blk_stride,
                       m_chunk, token_cap, R: tl.constexpr, L: tl.constexpr, L_P2: tl.constexpr,
                       NCP: tl.constexpr, NC_P2: tl.constexpr, BLOCK_S: tl.constexpr,
                       TABLE: tl.constexpr, HEADER: tl.constexpr, FILLED: tl.constexpr):
    s = tl.program_id(0)
    j = tl.program_id(1)
    g = s * NCP + j
    experts = tl.arange(0, L_P2)
    crow = tl.arange(0, NC_P2)
    hist = tl.load(hist_ptr + crow[:, None] * L_P2 + experts[None, :],
                   mask=(crow[:, None] < R * NCP), other=0)
    # int32 tile math (row counts are far below 2**31); int64 only against the budget.
    c = tl.sum(hist, axis=0)
    before = tl.sum(tl.where(crow[:, None] < g, hist, 0), axis=0)
    pad32 = pad.to(tl.int32)
    padded = (c + pad32 - 1) // pad32 * pad32
    pstart = tl.cumsum(padded, axis=0) - padded
    budget64 = budget.to(tl.int64)
    if g == 0:
        tpe = tl.minimum(padded.to(tl.int64), tl.maximum(budget64 - pstart.to(tl.int64), 0))
        dropped = tl.sum(padded, axis=0).to(tl.int64) > budget64
        if TABLE:
            # The host buffer: R meta rows, tokens_per_expert, dropped, this rank's status.
            host = tpe_ptr + R * 16
            tl.store(host + experts, tpe, mask=experts < L)
            tl.store(host + L, dropped.to(tl.int64))
            tl.store(host + L + 1, tl.load(status_ptr).to(tl.int64))
            if HEADER:
                # Static budget: the dispatch's status word (int32, at drop_ptr) from the meta
                # rows the hist kernel copied: [tokens, code, ...] of every rank.
                tl.store(drop_ptr, _table_status(tpe_ptr, dropped, tl.load(status_ptr),
                                                 token_cap, R, NC_P2))
        else:
            tl.store(tpe_ptr + experts, tpe, mask=experts < L)
            tl.store(drop_ptr, dropped.to(tl.int8))
            if HEADER:
                # NC_P2 >= R: the header tile's width.
                tl.store(status_ptr, _layout_status(src, dropped, slots_per_src // K,
                                                    row_stride, blk_stride, R, NC_P2, HEADER))
    running = pstart + before
    start = j.to(tl.int64) * chunk
    out_base = s.to(tl.int64) * slots_per_src
    for off in range(0, chunk, BLOCK_S):
        i = start + off + tl.arange(0, BLOCK_S)
        ok = i < slots_per_src
        lid = _layout_lids(src, s, i, ok, K, row_stride, blk_stride, shift, TABLE)
        hit = ((lid[:, None] == experts[None, :]) & (experts[None, :] < L)).to(tl.int32)
        before_in = tl.cumsum(hit, axis=0) - hit  # earlier slots of the same expert
        pos = tl.sum(hit * (running[None, :] + before_in), axis=1).to(tl.int64)
        mine = tl.sum(hit, axis=1) > 0
        pos = tl.where(mine, tl.where(pos < budget64, pos, -2), -1)
        tl.store(pos_ptr + out_base + i, pos, mask=ok)
        running += tl.sum(hit, axis=0)
    if FILLED:
        # Row m (< budget) is real iff pstart[e] <= m < pstart[e] + c[e] for some expert e.
        real_end = pstart + c
        mstart = g.to(tl.int64) * m_chunk
        for off in range(0, m_chunk, BLOCK_S):
            m = mstart + off + tl.arange(0, BLOCK_S)
            real = (m[:, None] >= pstart[None, :]) & (m[:, None] < real_end[None, :])
            f = tl.max(real.to(tl.int32), axis=1)
            tl.store(filled_ptr + m, f.to(tl.uint8), mask=m < budget64)


@triton.jit
def _table_status(metas_ptr, dropped, own, token_cap, R: tl.constexpr, R_P2: tl.constexpr):
    """int32 status of a static-budget TABLE layout: rows dropped here, a rank that had more
    than ``token_cap`` tokens (meta field 0), a rank with bad input (field 1), OR this rank's
    own status word ``own``. R_P2: a power of 2 >= R."""
    rs = tl.arange(0, R_P2)
    tokens = tl.load(metas_ptr + rs * 16, mask=rs < R, other=0)
    code = tl.load(metas_ptr + rs * 16 + 1, mask=rs < R, other=0)
    bits = dropped.to(tl.int32) * _ROWS_DROPPED
    bits += (tl.max((tokens > token_cap).to(tl.int32), axis=0) != 0).to(tl.int32) * _TOKENS_DROPPED
    bits += (tl.max((code != 0).to(tl.int32), axis=0) != 0).to(tl.int32) * _BAD_INPUT
    return bits | own.to(tl.int32)


def _layout_tiles(num_src: int, slots_per_src: int, num_local: int, block: int | None,
                  chunks_per_src: int | None):
    """(L_P2, BLOCK_S, chunks per source, chunk length) of the layout kernels."""
    L_P2 = next_power_of_2(max(num_local, 1))
    block = block or max(16, min(1024, 8192 // L_P2))
    # Enough chunks to spread the walk over the GPU, few enough that every program can
    # reduce the whole [chunks, L] histogram from L2 in one register tile.
    max_chunks = max(num_src, min(256, 8192 // L_P2))
    ncp = chunks_per_src or max(1, min(cdiv(max(slots_per_src, 1), block),
                                       max_chunks // num_src))
    return L_P2, block, ncp, _round_to(cdiv(max(slots_per_src, 1), ncp), block)


def layout_plan(idx_table: torch.Tensor, meta_table: torch.Tensor, status: torch.Tensor,
                slots_per_src: int, e0: int, num_local: int, pad: int, budget: int,
                pos_out: torch.Tensor, host_out: torch.Tensor, block: int | None = None,
                chunks_per_src: int | None = None, scratch=None,
                filled_out: torch.Tensor | None = None, status_out: torch.Tensor | None = None,
                token_cap: int = 0) -> None:
    """Fused dispatch layout over every rank's staged ids (TABLE mode, see above).

    idx_table:     [R] int64 addresses of each rank's staged ids ([slots_per_src] int32).
    meta_table:    [R] int64 addresses of each rank's meta row ([16] int64).
    status:        [1] int32 this rank's status word (copied to the host buffer).
    pos_out:       [R * slots_per_src] int64: output row of each slot, -1 not here, -2 dropped.
    host_out:      [R * 16 + L + 2] int64: metas, tokens_per_expert (padded, clipped to
                   ``budget``), dropped flag (padded total > budget), status.
    scratch:       optional callable numel -> int32 device tensor for the [chunks, L]
                   histogram (written and read within this call).
    block, chunks_per_src: tiling overrides (tests use them to cross chunk boundaries).
    filled_out:    [budget] uint8 or None: 1 on rows some slot writes (the static budget's
                   row mask, written by the same launches).
    status_out:    [1] int32 or None: the static budget's status word: STATUS_ROWS_DROPPED
                   when dropped, STATUS_TOKENS_DROPPED when some rank's meta field 0 (its
                   tokens) exceeds ``token_cap``, STATUS_BAD_INPUT when some rank's field 1
                   (its validation code) is nonzero, OR ``status``.
    token_cap:     T_cap for ``status_out``.
    """
    R, L = idx_table.shape[0], num_local
    L_P2, block, ncp, chunk = _layout_tiles(R, slots_per_src, L, block, chunks_per_src)
    # scratch(numel) -> int32 workspace the caller may keep between calls (saves a launch).
    hist = scratch(R * ncp * L_P2) if scratch is not None else \
        torch.empty(R * ncp * L_P2, dtype=torch.int32, device=pos_out.device)
    strides = (1, 1, 0)  # K, row_stride, blk_stride: unused by TABLE mode
    m_chunk = _round_to(cdiv(max(budget, 1), R * ncp), block) if filled_out is not None \
        else 0
    with _launch_lock:
        launch(_layout_hist_kernel, (R, ncp), idx_table, meta_table, host_out, hist, slots_per_src,
               chunk, e0, *strides, L=L, L_P2=L_P2, NCP=ncp, BLOCK_S=block, TABLE=True,
               num_warps=4)
        launch(_layout_pos_kernel, (R, ncp), idx_table, hist, pos_out, host_out,
               host_out if status_out is None else status_out, status,
               host_out if filled_out is None else filled_out, slots_per_src, chunk, e0, budget,
               max(int(pad), 1), *strides, m_chunk, token_cap, R=R, L=L, L_P2=L_P2, NCP=ncp,
               NC_P2=next_power_of_2(R * ncp), BLOCK_S=block, TABLE=True,
               HEADER=status_out is not None, FILLED=filled_out is not None, num_warps=8)


def budget_layout(blocks: torch.Tensor, topk: int, rows: int, num_local: int, budget: int,
                  pad: int, shift: int, header: bool, pos_out: torch.Tensor,
                  filled_out: torch.Tensor, tpe_out: torch.Tensor, dropped_out: torch.Tensor,
                  status_out: torch.Tensor | None, block: int | None = None,
                  chunks_per_src: int | None = None) -> None:
    """The budget plan of blocks of ids (matrix mode, see above): two launches.

    blocks:      [R, rows (+ 1 with ``header``), >= topk] ids, any dtype, unit stride along
                 the last dim: slot k of input row n = r * rows + c is ``blocks[r, c, k]``
                 (k < topk), a global id that becomes local id ``id - shift``; results
                 outside [0, L) are slots with no row here.
    topk, rows:  K and C.
    num_local:   L.
    budget:      B, rows of the plan; rows at or past B are dropped (pos -2).
    pad:         each expert's rows start at a multiple of this (1 = none).
    shift:       subtracted from every id read.
    header:      row C of each block is ``[code, clipped, ...]``; their nonzero fields become
                 ``STATUS_BAD_INPUT`` / ``STATUS_TOKENS_DROPPED`` in ``status_out``.
    pos_out:     [R * C * K] int64: the output row of each slot, -1 none, -2 dropped.
    filled_out:  [B] uint8: 1 on rows some slot writes; None: not computed.
    tpe_out:     [L] int64: rows per expert (padding included) clipped to B.
    dropped_out: [] bool: the padded total exceeds B.
    status_out:  [1] int32 (with ``header``): ``STATUS_ROWS_DROPPED`` when dropped, plus
                 the headers' bits; None without ``header``.
    block, chunks_per_src: tiling overrides (tests use them to cross chunk boundaries).
    """
    R, K, C, L = blocks.shape[0], topk, rows, num_local
    slots = C * K
    L_P2, block, ncp, chunk = _layout_tiles(R, slots, L, block, chunks_per_src)
    hist = torch.empty(R * ncp * L_P2, dtype=torch.int32, device=pos_out.device)
    strides = (max(K, 1), blocks.stride(1), blocks.stride(0))
    m_chunk = _round_to(cdiv(max(budget, 1), R * ncp), block)
    dropped = dropped_out.view(torch.int8)
    with _launch_lock:
        launch(_layout_hist_kernel, (R, ncp), blocks, hist, hist, hist, slots, chunk, shift,
               *strides, L=L, L_P2=L_P2, NCP=ncp, BLOCK_S=block, TABLE=False, num_warps=4)
        launch(_layout_pos_kernel, (R, ncp), blocks, hist, pos_out, tpe_out, dropped, status_out if
               header else dropped, filled_out if filled_out is not None else dropped, slots,
               chunk, shift, budget, max(int(pad), 1), *strides, m_chunk, 0, R=R, L=L,
               L_P2=L_P2, NCP=ncp, NC_P2=next_power_of_2(R * ncp), BLOCK_S=block,
               TABLE=False, HEADER=header, FILLED=filled_out is not None, num_warps=8)


def _round_to(x: int, m: int) -> int:
    return -(-x // m) * m


@triton.jit(do_not_specialize=["T_st", "K", "K_out", "num_tokens", "row_bytes"])
def _stage_kernel(x_ptr, idx_ptr, probs_ptr, x_out, idx_out, probs_out, meta_out, code_ptr,
                  src_table, T_st, H, K, K_out, num_tokens, row_bytes,
                  K_P2: tl.constexpr, BLOCK_H: tl.constexpr, INDIRECT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    if INDIRECT:
        # Input addresses come from a device table (written before a CUDA-graph replay);
        # the pointer arguments only give their element types.
        x_src = tl.multiple_of(tl.load(src_table + 0).to(x_ptr.dtype), 16)
        idx_src = tl.load(src_table + 1).to(idx_ptr.dtype)
        probs_src = tl.load(src_table + 2).to(probs_ptr.dtype)
        code_src = tl.load(src_table + 3).to(code_ptr.dtype)
    else:
        x_src, idx_src, probs_src, code_src = x_ptr, idx_ptr, probs_ptr, code_ptr
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    zero_v = tl.zeros([BLOCK_H], dtype=tl.int64)
    m = (cols < H) & (t + zero_v < T_st)
    row = tl.load(x_src + t * H + cols, mask=m)
    tl.store(x_out + t * H + cols, row, mask=m)
    if hb == 0:
        ks = tl.arange(0, K_P2)
        km = ks < K_out
        zk = tl.zeros([K_P2], dtype=tl.int64)
        lk = (ks < K) & (t + zk < T_st)
        # Rows are K_out wide whatever this rank's K: -1 / 0 past the tokens and past K.
        ids = tl.load(idx_src + t * K + ks, mask=lk, other=-1)
        tl.store(idx_out + t * K_out + ks, ids.to(tl.int32), mask=km)
        p = tl.load(probs_src + t * K + ks, mask=lk, other=0.0)
        tl.store(probs_out + t * K_out + ks, p.to(tl.float32), mask=km)
        if t == 0:
            tl.store(meta_out + 0, num_tokens.to(tl.int64))
            tl.store(meta_out + 1, tl.load(code_src).to(tl.int64))
            tl.store(meta_out + 2, row_bytes.to(tl.int64))
            tl.store(meta_out + 3, K.to(tl.int64))
            tl.store(meta_out + 4, tl.full([], 1, tl.int64))  # fits


def stage(x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor, T_st: int,
          x_out: torch.Tensor, idx_out: torch.Tensor, probs_out: torch.Tensor,
          meta_out: torch.Tensor, code: torch.Tensor, num_tokens: int, row_bytes: int,
          src_table: torch.Tensor | None = None) -> None:
    """One launch for the dispatch staging: x_out[:T_st] = x, idx_out[t] = int32 ids
    (-1 for t >= T_st, up to idx_out's rows, and for columns past idx_TK's K),
    probs_out[t] = float32 probs (0 where the ids are -1 by padding), and the meta row
    (tokens, check code, row bytes, K, fits=1).

    x_out [T_cap, H] (dtype of x), idx_out [T_cap, K_out] int32, probs_out [T_cap, K_out]
    float32 with K_out >= K, meta_out [16] int64, code: 0-dim int tensor on the device.
    src_table: optional [4] int64 device tensor holding the addresses of x, ids, probs and
    code, read by the kernel at run time (x's must be 16-byte aligned); the tensors passed
    then only give dtypes and shapes. This lets a CUDA graph replay the staging on new
    inputs."""
    T_cap, H = x_out.shape
    K = idx_TK.shape[1]
    K_out = idx_out.shape[1]
    block, warps = _block_h(H, x_out.element_size())
    grid = (T_cap, cdiv(H, block))
    indirect = src_table is not None
    with _launch_lock:
        launch(_stage_kernel, grid, x_TH, idx_TK, probs_TK, x_out, idx_out, probs_out, meta_out,
               code, src_table if indirect else meta_out, T_st, H, K, K_out, num_tokens, row_bytes,
               K_P2=next_power_of_2(max(K_out, 1)), BLOCK_H=block, INDIRECT=indirect,
               num_warps=warps)


@triton.jit(do_not_specialize=["T", "T_eff", "K", "E", "L", "T_cap"])
def _token_maps_kernel(idx_ptr, valid_ptr, pos_ptr, io_table, T, T_eff, K, E, L, T_cap,
                       R: tl.constexpr, R_P2: tl.constexpr, K_P2: tl.constexpr,
                       BLOCK_T: tl.constexpr, INDIRECT: tl.constexpr):
    if INDIRECT:  # addresses from a device table (CUDA-graph replays on new tensors)
        idx_ptr = tl.load(io_table + 0).to(idx_ptr.dtype)
        valid_ptr = tl.load(io_table + 1).to(valid_ptr.dtype)
        pos_ptr = tl.load(io_table + 2).to(pos_ptr.dtype)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, K_P2)
    rs = tl.arange(0, R_P2)
    tm = t < T
    m2 = tm[:, None] & (ks[None, :] < K)
    ids = tl.load(idx_ptr + t[:, None] * K + ks[None, :], mask=m2, other=-1)
    valid = (ids >= 0) & (ids < E) & (t[:, None] < T_eff) & m2
    tl.store(valid_ptr + t[:, None] * K + ks[None, :], valid.to(tl.int8), mask=m2)
    rank = tl.where(valid, ids // L, -1)
    has = tl.zeros([BLOCK_T, R_P2], dtype=tl.int32)
    for k in tl.static_range(K_P2):
        rk = tl.sum(tl.where(ks[None, :] == k, rank, 0), axis=1)  # column k
        vk = tl.sum(tl.where((ks[None, :] == k) & valid, 1, 0), axis=1) > 0
        has = tl.maximum(has, ((rk[:, None] == rs[None, :]) & vk[:, None]).to(tl.int32))
    pos = tl.where(has > 0, rs[None, :].to(tl.int64) * T_cap + t[:, None], -1)
    tl.store(pos_ptr + t[:, None] * R + rs[None, :], pos, mask=tm[:, None] & (rs[None, :] < R))


def token_maps(idx_TK: torch.Tensor, T_eff: int, num_experts: int, num_local: int,
               T_cap: int, R: int, valid_TK: torch.Tensor, pos_TR: torch.Tensor,
               io_table: torch.Tensor | None = None) -> None:
    """One launch for the combine-side maps of a dispatch:
    valid_TK [T, K] bool: 0 <= id < E and t < T_eff (slots whose prob gradient comes back);
    pos_TR [T, R] int64: r * T_cap + t where token t has a valid slot on rank r, else -1.
    io_table: optional [3] int64 device tensor with the addresses of idx_TK, valid_TK and
    pos_TR, read at run time (CUDA-graph replays); the tensors then only give dtypes."""
    T, K = idx_TK.shape
    if T == 0:
        return
    k_p2 = next_power_of_2(max(K, 1))
    r_p2 = next_power_of_2(max(R, 1))
    block = 64
    indirect = io_table is not None
    with _launch_lock:
        launch(_token_maps_kernel, (cdiv(T, block),), idx_TK, valid_TK.view(torch.int8),
               pos_TR, io_table if indirect else pos_TR, T, T_eff, K, num_experts, num_local,
               T_cap, R=R, R_P2=r_p2, K_P2=k_p2, BLOCK_T=block, INDIRECT=indirect, num_warps=4)


# ----------------------------------------------------------------------------- local plan
#
# ``group_plan`` on the GPU: a stable counting sort of the slots by local expert in two
# launches (one for small inputs), replacing torch.where + a stable argsort + the
# index_copy that inverted it:
#   1. ``_plan_hist_kernel``: program j counts the slots of each expert in chunk j of the
#      flat [N * K] ids (one-hot sums) -> hist [chunks, L_P2].
#   2. ``_plan_pos_kernel``: program j reduces the histogram to per-expert totals, padded
#      block starts and the slots of each expert in earlier chunks, then walks its chunk
#      again giving each slot its row: block start + earlier slots of the same expert (a
#      cumsum over the one-hot tile), i.e. (expert, row, k) order, as the argsort gives.
#      It also writes slice j of filled_M (real rows vs padding, from the block starts)
#      and, from program 0, the unpadded per-expert counts.
# With a single chunk the second kernel counts the chunk itself and the first is skipped.


@triton.jit(do_not_specialize=["n_slots", "chunk", "hist_off"])
def _plan_hist_kernel(lid_ptr, buf_ptr, n_slots, chunk, hist_off,
                      L: tl.constexpr, L_P2: tl.constexpr, BLOCK_S: tl.constexpr):
    j = tl.program_id(0)
    experts = tl.arange(0, L_P2)
    hist = tl.zeros([L_P2], dtype=tl.int32)
    start = j.to(tl.int64) * chunk
    for off in range(0, chunk, BLOCK_S):
        i = start + off + tl.arange(0, BLOCK_S)
        lid = tl.load(lid_ptr + i, mask=i < n_slots, other=-1)
        hit = (lid[:, None] == experts[None, :]) & (experts[None, :] < L)
        hist += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(buf_ptr + hist_off + j * L_P2 + experts, hist.to(tl.int64))


@triton.jit(do_not_specialize=["n_slots", "chunk", "hist_off", "pad", "m_alloc", "m_chunk"])
def _plan_pos_kernel(lid_ptr, buf_ptr, filled_ptr, n_slots, chunk, hist_off, pad, m_alloc,
                     m_chunk, L: tl.constexpr, L_P2: tl.constexpr, NC: tl.constexpr,
                     NC_P2: tl.constexpr, SELF_HIST: tl.constexpr, FILLED: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    j = tl.program_id(0)
    experts = tl.arange(0, L_P2)
    start = j.to(tl.int64) * chunk
    if SELF_HIST:  # the only chunk: count it here
        c = tl.zeros([L_P2], dtype=tl.int32)
        for off in range(0, chunk, BLOCK_S):
            i = start + off + tl.arange(0, BLOCK_S)
            lid = tl.load(lid_ptr + i, mask=i < n_slots, other=-1)
            hit = (lid[:, None] == experts[None, :]) & (experts[None, :] < L)
            c += tl.sum(hit.to(tl.int32), axis=0)
        before = tl.zeros([L_P2], dtype=tl.int32)
    else:
        crow = tl.arange(0, NC_P2)
        hist = tl.load(buf_ptr + hist_off + crow[:, None] * L_P2 + experts[None, :],
                       mask=crow[:, None] < NC, other=0).to(tl.int32)
        c = tl.sum(hist, axis=0)
        before = tl.sum(tl.where(crow[:, None] < j, hist, 0), axis=0)
    # int32 tile math: row counts are far below 2**31.
    padded = (c + pad - 1) // pad * pad
    pstart = tl.cumsum(padded, axis=0) - padded
    if j == 0:
        tl.store(buf_ptr + n_slots + experts, c.to(tl.int64), mask=experts < L)
    running = pstart + before
    for off in range(0, chunk, BLOCK_S):
        i = start + off + tl.arange(0, BLOCK_S)
        ok = i < n_slots
        lid = tl.load(lid_ptr + i, mask=ok, other=-1)
        hit = ((lid[:, None] == experts[None, :]) & (experts[None, :] < L)).to(tl.int32)
        before_in = tl.cumsum(hit, axis=0) - hit  # earlier slots of the same expert
        pos = tl.sum(hit * (running[None, :] + before_in), axis=1).to(tl.int64)
        pos = tl.where(tl.sum(hit, axis=1) > 0, pos, -1)
        tl.store(buf_ptr + i, pos, mask=ok)
        running += tl.sum(hit, axis=0)
    if FILLED:
        # Row m is real iff pstart[e] <= m < pstart[e] + c[e] for some expert e.
        real_end = pstart + c
        mstart = j.to(tl.int64) * m_chunk
        for off in range(0, m_chunk, BLOCK_S):
            m = mstart + off + tl.arange(0, BLOCK_S)
            real = (m[:, None] >= pstart[None, :]) & (m[:, None] < real_end[None, :])
            f = tl.max(real.to(tl.int32), axis=1)
            tl.store(filled_ptr + m, f.to(tl.uint8), mask=m < m_alloc)


def local_plan(lid_NK: torch.Tensor, num_local: int, pad: int,
               filled_M: torch.Tensor | None = None, block: int | None = None,
               chunks: int | None = None) -> torch.Tensor:
    """Counting-sort plan of ``lid_NK`` (see the comment above); returns ``buf``.

    lid_NK:    [N, K] integer local expert ids, contiguous; ids outside [0, L) (-1) are
               slots with no row.
    num_local: L.
    pad:       block multiple (1 = no padding): expert e's rows start at the sum of the
               earlier experts' counts, each rounded up to ``pad``.
    filled_M:  [M] uint8 written when given: 1 on real rows, 0 on padding (and on rows
               past the last block, so an upper bound of M may be allocated).
    block, chunks: tiling overrides (tests use them to cross chunk boundaries).
    buf:       [N * K + L + hist] int64: pos (output row of each flat slot, -1 none), then
               the unpadded per-expert counts, then scratch.
    """
    N, K = lid_NK.shape
    S = N * K
    L = num_local
    L_P2 = next_power_of_2(max(L, 1))
    block = block or max(16, min(1024, 8192 // L_P2))
    n_blocks = cdiv(max(S, 1), block)
    if chunks is None:
        # A few blocks: one program counts and walks them (one launch). Otherwise enough
        # chunks to spread the walk, few enough that each program reduces the whole
        # [chunks, L] histogram in one register tile.
        chunks = 1 if n_blocks <= 4 else min(n_blocks, max(1, min(256, 8192 // L_P2)))
    chunk = _round_to(cdiv(max(S, 1), chunks), block)
    nc = cdiv(max(S, 1), chunk)
    self_hist = nc == 1
    hist_words = 0 if self_hist else nc * L_P2
    buf = torch.empty(S + L + hist_words, dtype=torch.int64, device=lid_NK.device)
    if S == 0:
        return buf
    with_f = filled_M is not None
    m_alloc = filled_M.shape[0] if with_f else 0
    m_chunk = _round_to(cdiv(max(m_alloc, 1), nc), block)
    with _launch_lock:
        if not self_hist:
            launch(_plan_hist_kernel, (nc,), lid_NK, buf, S, chunk, S + L, L=L, L_P2=L_P2,
                   BLOCK_S=block, num_warps=4)
        launch(_plan_pos_kernel, (nc,), lid_NK, buf, filled_M if with_f else buf, S, chunk, S + L,
               max(int(pad), 1), m_alloc, m_chunk, L=L, L_P2=L_P2, NC=nc,
               NC_P2=next_power_of_2(nc), SELF_HIST=self_hist, FILLED=with_f, BLOCK_S=block,
               num_warps=8)
    return buf
