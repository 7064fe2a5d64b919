"""Fused GPU kernels behind ``moe_dispatch.permute`` (Triton, CUDA only).

``use_triton(t)`` decides per call; the plain torch code in ``moe_dispatch.permute`` stays
the reference and the CPU path. The kernels here compute exactly what that code computes:

* ``plan_arrays(lid_NK, L, ...)``: a stable counting sort (one or two launches) that
  writes the inverse map ``pos_NK`` and the padding mask ``filled_M`` directly, instead of
  a stable argsort and an index_copy (``moe_dispatch.permute`` wraps it in a plan).
* ``budget_arrays(blocks, K, C, L, B, ...)``: the same for the sync-free budget plan (two
  launches, every count on the device), reading ids of any dtype straight from blocks of
  received metadata, with the budget mode's status word alongside.
* ``pack_meta(...)`` (``_pack``): the budget mode's send side of ``alltoall`` /
  ``allgather`` in one launch: each token's row in each destination block, and the
  metadata rows (ids, probs, one header row per block) written straight into the wire.
  ``pack_rows(...)``: the same kernel for the exact mode of ``alltoall`` (blocks packed
  back to back at their all-to-all offsets, no header).
* ``permute(x_NH, probs_NK, plan)``: each input row is read once and written to each of
  its output slots (a scatter through the inverse map ``pos_NK``), its probs alongside;
  padding rows are zeros with prob 0.
* ``unpermute(y_MH, plan)``: for each input row, the float32 sum of its output rows,
  gathered through ``pos_NK`` (no atomics, so the result is deterministic), rounded once.

Both are autograd functions: the backward of one is the other (without the probs).
Set ``MOE_DISPATCH_TRITON=0`` to force the torch path on CUDA.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch

from . import _env

_triton_error: Optional[str] = None
_checked = False


def triton_available() -> Optional[str]:
    """None when triton imports, else a one-line reason."""
    global _triton_error, _checked
    if not _checked:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _triton_error = (f"triton is not importable ({type(exc).__name__}: {exc}); "
                             "pip install triton")
        _checked = True
    return _triton_error


def use_triton(t: torch.Tensor) -> bool:
    """True for CUDA tensors when triton imports and MOE_DISPATCH_TRITON is not "0"."""
    # ``is_cuda`` and ``_env.get``: this runs several times per dispatch, and
    # ``t.device.type`` / ``os.environ.get`` cost the host 0.5 / 2 µs each.
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        return False
    if _env.get("MOE_DISPATCH_TRITON", "1") == "0":
        return False
    return triton_available() is None


_triton_mod = None


def _k():
    """The Triton kernels' module, imported on first use (it imports triton). Kept: a
    function-level import costs the host ~1 µs per call, and a dispatch makes several."""
    global _triton_mod
    if _triton_mod is None:
        from . import _triton
        _triton_mod = _triton
    return _triton_mod


def check_values(idx_TK: Optional[torch.Tensor], probs: torch.Tensor, num_experts: int):
    """The dispatch input check in one launch; see ``moe_dispatch.kernels._check``."""
    from . import _check
    return _check.check_values(idx_TK, probs, num_experts)


def route_counts(idx_TK: torch.Tensor, code: torch.Tensor, msg: torch.Tensor, **kw) -> None:
    """The exact mode's routing message in one launch; see ``moe_dispatch.kernels._route``."""
    from . import _route
    _route.route_counts(idx_TK, code, msg, **kw)


# ------------------------------------------------------------------ plan


def plan_arrays(lid_NK: torch.Tensor, num_local_experts: int,
                counts: Optional[Sequence[int]], padded: Optional[Sequence[int]],
                pad: int, block: Optional[int] = None, chunks: Optional[int] = None):
    """The stable counting sort behind ``moe_dispatch.permute.triton_group_plan``: one or two
    kernels write the plan's inverse map (and the padding mask) directly. The caller builds
    the ``GroupPlan`` (this package never imports ``permute``: no import circle).

    lid_NK:            [N, K] integer local expert id of each slot, -1 = not for this rank
                       (N * K > 0).
    num_local_experts: L.
    counts, padded:    unpadded / padded host counts per local expert when the caller knows
                       them, else both None (then they are read back here: one host sync).
    pad:               the padding multiple (1 = none).
    block, chunks:     tiling overrides for tests (see ``_triton.local_plan``).
    Returns (pos_NK [N, K] int64, filled_M [>= M] uint8 or None, counts list): ``filled_M``
    is sized for the most rows padding can give when the counts were unknown; the caller
    slices it (or drops it when nothing was padded).
    """
    N, K = lid_NK.shape
    L = num_local_experts
    dev = lid_NK.device
    if not lid_NK.is_contiguous():
        lid_NK = lid_NK.contiguous()
    filled = None
    if counts is not None:
        if list(padded) != list(counts):
            filled = torch.empty(sum(padded), dtype=torch.uint8, device=dev)
    elif pad > 1:
        # Counts unknown yet: room for the most rows padding can give; sliced by the caller.
        filled = torch.empty(N * K + L * (pad - 1), dtype=torch.uint8, device=dev)
    buf = _k().local_plan(lid_NK, L, pad, filled, block=block, chunks=chunks)
    pos_NK = buf.as_strided((N, K), (K, 1))
    if counts is None:
        counts = buf[N * K:N * K + L].tolist()  # the one host sync
    return pos_NK, filled, [int(c) for c in counts]


def budget_arrays(blocks: torch.Tensor, topk: int, rows: int, num_local_experts: int,
                  budget: int, pad: int, shift: int = 0, header: bool = False,
                  block: Optional[int] = None, chunks: Optional[int] = None,
                  filled: bool = True):
    """The maps of a budget plan (``moe_dispatch.permute.BudgetPlan``) in two launches,
    straight from blocks of ids, without a host sync (the caller builds the plan: this
    package never imports ``permute``).

    blocks:            [R, C (+ 1 with ``header``), >= K] ids, any dtype (int64 local ids,
                       received float32 metadata, ...), any strides: slot k of input row
                       n = r * C + c is ``blocks[r, c, k]`` for k < K. Id ``v`` is local
                       expert ``v - shift``; outside [0, L): no row here.
    topk, rows:        K and C.
    num_local_experts: L.
    budget:            B, the plan's rows; rows at or past B are dropped (pos -2).
    pad:               the padding multiple (1 = none).
    shift:             subtracted from every id (global -> local, a wire encoding's +1).
    header:            row C of each block holds ``[code, clipped, ...]`` (the budget-mode
                       metadata's header row); folded into the status.
    block, chunks:     tiling overrides for tests (see ``_triton.budget_layout``).
    filled:            compute ``filled_M`` (False: the caller knows every row is real, e.g.
                       the exact plan without padding; None is returned in its place).
    Returns (pos_NK [R*C, K] int64, filled_M [B] uint8 or None, tokens_per_expert_L [L]
    int64, dropped [] bool, status [1] int32 with ``header`` else None).
    """
    R, K, C = blocks.shape[0], topk, rows
    dev = blocks.device
    if K > 1 and blocks.stride(2) != 1:
        if header:
            raise ValueError("budget_arrays: a header needs ids with unit stride along K")
        blocks = blocks.contiguous()
    pos_NK = torch.empty(R * C, K, dtype=torch.int64, device=dev)
    filled_M = torch.empty(budget, dtype=torch.uint8, device=dev) if filled else None
    tpe_L = torch.empty(num_local_experts, dtype=torch.int64, device=dev)
    dropped = torch.empty((), dtype=torch.bool, device=dev)
    status = torch.empty(1, dtype=torch.int32, device=dev) if header else None
    _k().budget_layout(blocks, K, C, num_local_experts, budget, pad, shift, header, pos_NK,
                       filled_M, tpe_L, dropped, status, block=block, chunks_per_src=chunks)
    return pos_NK, filled_M, tpe_L, dropped, status


def _grad_needed(*ts: Optional[torch.Tensor]) -> bool:
    """Whether autograd must record a call on ``ts``: an autograd Function's ``apply`` costs
    the host ~10 µs even when it records nothing (no grad mode, inference, benchmarks), so
    the wrappers below call the kernels directly then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _pack_meta_rows(probs_TK, idx_TK, code, clipped, num_experts, num_local, num_blocks,
                    rows, plan_out, tiles, packed_rows) -> torch.Tensor:
    """The metadata rows of ``pack_meta`` / ``pack_rows`` (``_PackMeta``'s forward)."""
    from . import _pack
    K = idx_TK.shape[1]
    shape = (num_blocks, rows + 1, 2 * K) if packed_rows is None else (packed_rows, 2 * K)
    meta = torch.empty(shape, dtype=torch.float32, device=idx_TK.device)
    _pack.pack_meta(idx_TK, probs_TK, code, clipped, num_experts, num_local, rows, meta,
                    plan_out, *tiles, packed=packed_rows is not None)
    return meta


class _PackMeta(torch.autograd.Function):
    """Differentiable w.r.t. the probs: a token's probs appear in each block it is sent to,
    so their gradient is the sum over those rows (in block order, float32), as the torch
    reference's permute backward computes it."""

    @staticmethod
    def forward(ctx, probs_TK, idx_TK, code, clipped, num_experts, num_local, num_blocks,
                rows, plan_out, tiles, packed_rows):
        meta = _pack_meta_rows(probs_TK, idx_TK, code, clipped, num_experts, num_local,
                               num_blocks, rows, plan_out, tiles, packed_rows)
        ctx.pos_TR = None if plan_out is None else plan_out[0]
        ctx.probs_like = (probs_TK.shape, probs_TK.dtype)
        return meta

    @staticmethod
    def backward(ctx, g_meta):
        (T, K), dtype = ctx.probs_like
        if ctx.pos_TR is None:  # one block, token t on row t
            g_p = g_meta[0, :T, K:]
        elif g_meta.dim() == 2:  # packed: the send rows themselves
            g_p = reduce_rows(g_meta[:, K:].float(), ctx.pos_TR)
        else:
            R, C = g_meta.shape[0], g_meta.shape[1] - 1
            g_p = reduce_rows(g_meta[:, :C, K:].reshape(R * C, K).float(), ctx.pos_TR)
        return (g_p.to(dtype),) + (None,) * 10


def pack_meta(idx_TK: torch.Tensor, probs_TK: torch.Tensor, code: torch.Tensor, clipped: bool,
              num_experts: int, num_local_experts: int, num_blocks: int, rows: int,
              per_rank: bool, block_t: Optional[int] = None, block_c: Optional[int] = None):
    """The budget mode's send side in one launch (``_pack``; the torch reference is
    ``moe_dispatch.backends.budget``): metadata blocks ready for the wire, and for an
    all-to-all the send plan's maps. No host sync.

    idx_TK:            [T, K] int64 global expert ids (-1 = masked), T <= rows.
    probs_TK:          [T, K] float32 probs (differentiable: the result carries their
                       gradient).
    code:              0-dim int device tensor, this rank's validation code.
    clipped:           this rank clipped tokens over the token capacity.
    num_experts:       E.   num_local_experts: L (expert e lives on rank e // L).
    num_blocks, rows:  R blocks of C token rows.
    per_rank:          True (``alltoall``, R = E / L): block r holds the tokens with an
                       expert on rank r, in token order. False (``allgather``, R = 1): one
                       block, token t on row t.
    block_t, block_c:  tiling overrides for tests.
    Returns (meta_RCW [R, C + 1, 2K] float32: rows ``[id + 1, probs]``, zeros past the
    tokens, a header row ``[code, clipped, 0...]`` per block; plan maps or None): the maps
    (per_rank) are (pos_TR [T, R] int64 row of token t in the R * C send rows, -1 = not
    sent there; filled_S [R * C] uint8; counts_R [R] int64 tokens per block; dropped []
    bool, always False).
    """
    idx_TK, probs_TK = _contiguous(idx_TK), _contiguous(probs_TK)
    maps = None
    if per_rank:
        maps = _send_maps(idx_TK.shape[0], num_blocks, num_blocks * rows, idx_TK.device)
    pack = _PackMeta.apply if _grad_needed(probs_TK) else _pack_meta_rows
    meta = pack(probs_TK, idx_TK, code, clipped, num_experts, num_local_experts, num_blocks,
                rows, maps, (block_t, block_c), None)
    return meta, maps


def pack_rows(idx_TK: torch.Tensor, probs_TK: torch.Tensor, num_experts: int,
              num_local_experts: int, num_sent: int, block_t: Optional[int] = None,
              block_c: Optional[int] = None):
    """The exact mode's send side of ``alltoall`` in one launch (``_pack``, packed form;
    the torch reference is ``moe_dispatch.backends.exact.pack_rows``): the send buffer's
    metadata rows, every block at its all-to-all offset, and the send plan's maps. No host
    sync.

    idx_TK:            [T, K] int64 global expert ids (-1 = masked, every other id in
                       [0, E): the exact mode validated them before).
    probs_TK:          [T, K] float32 probs (differentiable: the result carries their
                       gradient).
    num_experts:       E.   num_local_experts: L (expert e lives on rank e // L; R = E / L).
    num_sent:          S, the (token, destination rank) pairs: the sum of the send splits
                       (host-known after the exact mode's count exchange).
    block_t, block_c:  tiling overrides for tests.
    Returns (meta_SW [S, 2K] float32: row ``[id + 1 (0 = masked), probs]`` of each sent
    token, rank-major, token ascending; maps (pos_TR [T, R] int64 row of token t in the S
    send rows, -1 = not sent there; None (every send row is real); counts_R [R] int64
    tokens per rank; dropped [] bool, always False)).
    """
    idx_TK, probs_TK = _contiguous(idx_TK), _contiguous(probs_TK)
    R = num_experts // num_local_experts
    maps = _send_maps(idx_TK.shape[0], R, None, idx_TK.device)
    pack = _PackMeta.apply if _grad_needed(probs_TK) else _pack_meta_rows
    meta = pack(probs_TK, idx_TK, idx_TK, False, num_experts, num_local_experts, R,
                idx_TK.shape[0], maps, (block_t, block_c), num_sent)
    return meta, maps


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _send_maps(T: int, R: int, send_rows: Optional[int], dev: torch.device):
    """Empty (pos_TR, filled_S or None when ``send_rows`` is None, counts_R, dropped) for
    the send side's kernel to fill."""
    filled = None if send_rows is None else torch.empty(send_rows, dtype=torch.uint8,
                                                        device=dev)
    return (torch.empty(T, R, dtype=torch.int64, device=dev), filled,
            torch.empty(R, dtype=torch.int64, device=dev),
            torch.empty((), dtype=torch.bool, device=dev))


# ------------------------------------------------------------------ plan inverse maps

_maps_cache: dict = {}


def plan_maps(plan) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(pos_NK, filled_M) for a ``moe_dispatch.permute.GroupPlan``.

    pos_NK:   [N, K] int64, output row of slot (n, k), -1 where the slot has no row here.
    filled_M: [M] uint8, 1 where an output row is a real row, 0 on padding rows; None when
              the plan has no padding (every row is real).
    The plan's own maps when it carries them (built by the counting sort: no work);
    otherwise computed once per plan object and cached for the plan's lifetime (one
    scatter of N*K indices).
    """
    if plan.pos_NK is not None:
        return plan.pos_NK, plan.filled_M
    key = id(plan)
    hit = _maps_cache.get(key)
    if hit is not None and hit[0]() is plan:
        return hit[1]
    dev = plan.slot_M.device
    N, K, M = plan.num_in_rows, plan.topk, plan.num_out_rows
    m_real = plan.slot_M.numel()
    dest = plan.dest_M if plan.dest_M is not None else torch.arange(m_real, device=dev)
    pos = torch.full((N * K,), -1, dtype=torch.long, device=dev)
    pos.index_copy_(0, plan.slot_M, dest)
    pos = pos.view(N, K)
    filled = None
    if plan.dest_M is not None:
        filled = torch.zeros(M, dtype=torch.uint8, device=dev)
        filled.index_fill_(0, plan.dest_M, 1)
    maps = (pos, filled)
    try:
        ref = weakref.ref(plan, lambda _r, k=key: _maps_cache.pop(k, None))
        _maps_cache[key] = (ref, maps)
    except TypeError:  # not weak-referenceable: just don't cache
        pass
    return maps


# ------------------------------------------------------------------ functional kernels


def permute_rows(x_NH: torch.Tensor, pos_NK: torch.Tensor, num_out_rows: int,
                 filled_M: Optional[torch.Tensor] = None,
                 probs_NK: Optional[torch.Tensor] = None,
                 out_MH: Optional[torch.Tensor] = None,
                 probs_out_M: Optional[torch.Tensor] = None):
    """Scatter rows: out[pos[n, k]] = x[n]; rows with filled_M == 0 become zeros.

    x_NH:         [N, H] rows to scatter.
    pos_NK:       [N, K] int64 output row of each slot, -1 = no row.
    num_out_rows: M.
    filled_M:     [M] uint8, 0 on rows no slot writes (they are zeroed, probs too), or None.
    probs_NK:     [N, K] probs of the slots (any float dtype, read as float32; any row
                  stride, e.g. columns of received metadata rows), or None.
    out_MH, probs_out_M: [M, H] (dtype of x) / [M] float32 outputs, e.g. poisoned buffers
                  in tests; otherwise allocated.
    Returns (out_MH, probs_M float32 or None). Two launches at most (scatter, zero fill);
    no host op on inputs that are already contiguous.
    """
    if not x_NH.is_contiguous():
        x_NH = x_NH.contiguous()
    if not pos_NK.is_contiguous():
        pos_NK = pos_NK.contiguous()
    H = x_NH.shape[1]
    if out_MH is None:
        out_MH = torch.empty(num_out_rows, H, dtype=x_NH.dtype, device=x_NH.device)
    probs_M = None
    if probs_NK is not None:
        probs_M = probs_out_M if probs_out_M is not None else torch.empty(
            num_out_rows, dtype=torch.float32, device=x_NH.device)
        # The kernel converts to float32 itself (exactly as .float() would).
        probs_NK = unit_stride_rows(probs_NK)
    _k().scatter_rows(x_NH, pos_NK, out_MH, probs_NK, probs_M)
    if filled_M is not None:  # padding rows (and their probs) become zeros
        _k().zero_unfilled(out_MH, filled_M, probs_M)
    return out_MH, probs_M


def unit_stride_rows(t_NK: torch.Tensor) -> torch.Tensor:
    """``t_NK`` itself when its rows are unit-stride along K (the row stride is free: the
    kernels take it), else a contiguous copy; so a view such as the probs columns of
    received metadata rows costs no copy launch."""
    if t_NK.shape[1] > 1 and t_NK.stride(1) != 1:
        return t_NK.contiguous()
    return t_NK


def reduce_rows(y_MH: torch.Tensor, pos_NK: torch.Tensor,
                out_NH: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather-reduce: out[n] = sum_k y[pos[n, k]] (float32 accumulation), zeros if none."""
    if not y_MH.is_contiguous():
        y_MH = y_MH.contiguous()
    if not pos_NK.is_contiguous():
        pos_NK = pos_NK.contiguous()
    if out_NH is None:
        out_NH = torch.empty(pos_NK.shape[0], y_MH.shape[1], dtype=y_MH.dtype,
                             device=y_MH.device)
    _k().gather_reduce(y_MH, pos_NK, out_NH)
    return out_NH


# ------------------------------------------------------------------ autograd wrappers


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, probs_NK, pos_NK, filled_M, num_out_rows):
        tokens, probs = permute_rows(x_NH, pos_NK, num_out_rows, filled_M, probs_NK)
        ctx.save_for_backward(pos_NK)
        if probs_NK is not None:
            ctx.probs_shape = probs_NK.shape
            ctx.probs_dtype = probs_NK.dtype
        return tokens, probs

    @staticmethod
    def backward(ctx, g_tokens, g_probs):
        (pos_NK,) = ctx.saved_tensors
        g_x = g_p = None
        if ctx.needs_input_grad[0]:
            g_x = reduce_rows(g_tokens, pos_NK)
        if ctx.needs_input_grad[1] and g_probs is not None:
            # Slots with no row read a trailing zero.
            flat = pos_NK.reshape(-1)
            g_ext = torch.cat([g_probs.float(), g_probs.new_zeros(1, dtype=torch.float32)])
            M = g_probs.shape[0]
            g_p = g_ext.index_select(0, torch.where(flat >= 0, flat, M))
            g_p = g_p.view(ctx.probs_shape).to(ctx.probs_dtype)
        return g_x, g_p, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MH, pos_NK, filled_M):
        ctx.save_for_backward(pos_NK, filled_M if filled_M is not None else None)
        ctx.has_filled = filled_M is not None
        ctx.num_out_rows = y_MH.shape[0]
        return reduce_rows(y_MH, pos_NK)

    @staticmethod
    def backward(ctx, g_out):
        pos_NK, filled_M = ctx.saved_tensors
        g_y, _ = permute_rows(g_out, pos_NK, ctx.num_out_rows,
                              filled_M if ctx.has_filled else None)
        return g_y, None, None


def permute(x_NH: torch.Tensor, probs_NK: Optional[torch.Tensor], plan):
    """Triton version of ``moe_dispatch.permute.permute``: (tokens_MH, probs_M float32, or
    None when ``probs_NK`` is None)."""
    pos_NK, filled_M = plan_maps(plan)
    if not _grad_needed(x_NH, probs_NK):
        return permute_rows(x_NH, pos_NK, plan.num_out_rows, filled_M, probs_NK)
    return _Permute.apply(x_NH, probs_NK, pos_NK, filled_M, plan.num_out_rows)


def unpermute(y_MH: torch.Tensor, plan) -> torch.Tensor:
    """Triton version of ``moe_dispatch.permute.unpermute``: [M, H] -> [N, H]."""
    pos_NK, filled_M = plan_maps(plan)
    if not _grad_needed(y_MH):
        return reduce_rows(y_MH, pos_NK)
    return _Unpermute.apply(y_MH, pos_NK, filled_M)
