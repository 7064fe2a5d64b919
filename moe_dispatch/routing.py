"""Router-output formats and their validation.

Two forms describe the same routing:
  * top-k:  ``idx_TK`` [T, K] integer expert ids (-1 = masked slot) and ``probs_TK`` [T, K];
  * dense:  ``routing_map_TE`` [T, E] bool and ``probs_TE`` [T, E] (0 where not routed).
Backends consume the top-k form (int64 ids, float32 probs). Conversions keep autograd
through the probs, so router gradients flow whichever form the caller used.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import kernels
from .protocol import PendingCheck


def topk_to_dense(idx_TK: torch.Tensor, probs_TK: torch.Tensor, num_experts: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k form -> (routing_map_TE bool, probs_TE same dtype as probs_TK).

    Duplicate ids in a row are summed in ``probs_TE``. Masked slots (-1) are ignored.
    """
    T = idx_TK.shape[0]
    valid_TK = idx_TK >= 0
    # Masked slots add zero to column 0 (no spare column, so both results are contiguous:
    # libraries such as HybridEP all-gather the map and need that).
    col_TK = idx_TK.long().clamp(min=0)
    probs_TE = probs_TK.new_zeros(T, num_experts).scatter_add(1, col_TK, probs_TK * valid_TK)
    hits_TE = torch.zeros(T, num_experts, dtype=torch.int32, device=idx_TK.device)
    hits_TE.scatter_add_(1, col_TK, valid_TK.to(torch.int32))
    return hits_TE > 0, probs_TE


def dense_to_topk(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor,
                  topk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense form -> (idx_TK int64, probs_TK float32), experts ascending within a row.

    topk: K, the most experts any token is routed to. When None it is read from the map,
          which costs one host sync; pass it (e.g. the router's top-k) to avoid that.
          Rows with fewer routed experts get -1 slots.
    """
    T, E = routing_map_TE.shape
    if topk is None:
        topk = int(routing_map_TE.sum(1).max().item()) if T > 0 else 1
    topk = max(1, min(int(topk), E))
    # Larger key = smaller expert id, so torch.topk returns routed experts ascending.
    key_TE = routing_map_TE.to(torch.float32) * torch.arange(
        E, 0, -1, device=routing_map_TE.device, dtype=torch.float32)
    key_TK, idx_TK = torch.topk(key_TE, topk, dim=1, sorted=True)
    valid_TK = key_TK > 0
    idx_TK = torch.where(valid_TK, idx_TK, torch.full_like(idx_TK, -1))
    probs_TK = probs_TE.float().gather(1, idx_TK.clamp(min=0)) * valid_TK
    return idx_TK, probs_TK


def pad_topk(idx_TK: torch.Tensor, probs_TK: torch.Tensor, K: int):
    """Widen [T, k] routing to [T, K] with masked (-1, prob 0) slots (k <= K).

    Ranks must agree on K for the wire format; a zero-token rank routed from a dense map
    derives a narrower K, which carries no information and is simply widened."""
    k = idx_TK.shape[1]
    if k == K:
        return idx_TK, probs_TK
    T = idx_TK.shape[0]
    idx = torch.cat([idx_TK, idx_TK.new_full((T, K - k), -1)], 1)
    probs = torch.cat([probs_TK, probs_TK.new_zeros(T, K - k)], 1)
    return idx, probs


def rank_mask(idx_TK: torch.Tensor, num_experts: int, num_local: int) -> torch.Tensor:
    """[T, R] bool, R = E / L: token t has at least one expert on rank r (expert e lives on
    rank e // L). Masked (-1) and out-of-range ids count nowhere.

    idx_TK: [T, K] integer global expert ids.  num_experts: E.  num_local: L."""
    E, L = num_experts, num_local
    R = E // L
    # Masked and out-of-range ids land in the spare column R, cut below.
    rank_TK = torch.div(torch.remainder(idx_TK.clamp(-1, E), E + 1), L, rounding_mode="floor")
    mask_TR = torch.zeros(idx_TK.shape[0], R + 1, dtype=torch.bool, device=idx_TK.device)
    mask_TR.scatter_(1, rank_TK, True)
    return mask_TR[:, :R]


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each expert may take from one rank: ceil(T * K / E * capacity_factor)."""
    return int(math.ceil(num_tokens * topk / num_experts * capacity_factor))


def apply_capacity(idx_TK: torch.Tensor, probs_TK: torch.Tensor, num_experts: int,
                   capacity_factor: float, policy: str = "probs"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop the overflow of each expert on this rank (before dispatch, no host sync).

    Each expert keeps at most ``expert_capacity(T, K, E, capacity_factor)`` of this rank's
    slots. policy "probs": keep the highest probs (ties: lower token index first);
    "position": keep the earliest tokens. Dropped slots become -1 with prob 0, so the token
    gets no output from that expert and its prob gets zero gradient.
    """
    if policy not in ("probs", "position"):
        raise ValueError(f"capacity_policy must be 'probs' or 'position', got {policy!r}")
    T, K = idx_TK.shape
    if T == 0:
        return idx_TK, probs_TK
    cap = expert_capacity(T, K, num_experts, capacity_factor)
    flat_e = idx_TK.reshape(-1)
    valid = flat_e >= 0
    e_key = torch.where(valid, flat_e, num_experts)
    if policy == "probs":
        # Sort by prob (descending, stable), then stably by expert: rank within expert.
        p = torch.where(valid, probs_TK.detach().reshape(-1).float(), float("-inf"))
        order = torch.argsort(-p, stable=True)
        order = order[torch.argsort(e_key[order], stable=True)]
    else:
        order = torch.argsort(e_key, stable=True)
    sorted_e = e_key[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=idx_TK.device)
    counts.scatter_add_(0, sorted_e, torch.ones_like(sorted_e))
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(order.numel(), device=idx_TK.device) - starts[sorted_e]
    keep_sorted = (pos < cap) & (sorted_e < num_experts)
    keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted).view(T, K)
    return torch.where(keep, idx_TK, -1), probs_TK * keep


def canonicalize(hidden: torch.Tensor, num_experts: int, *,
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_probs: Optional[torch.Tensor] = None,
                 routing_map: Optional[torch.Tensor] = None,
                 probs: Optional[torch.Tensor] = None,
                 topk: Optional[int] = None,
                 check_values: bool = True,
                 check_in_message: bool = False):
    """Validate one rank's dispatch input and bring it to the backend form.

    Returns (x_TH, idx_TK int64, probs_TK float32, check). Nothing is raised here for bad
    input: the error is carried in ``check`` (a ``PendingCheck``) so that the backend
    raises it on every rank together, after the ranks have agreed, instead of one rank
    raising while the others wait in a collective. On a host error the returned tensors
    are empty placeholders of the right rank.

    With ``check_values`` the top-k ids outside [-1, E) are returned as -1 (flagged in
    ``check.device_bad``), so a backend never sees an out-of-range id; without it the
    caller promises valid ids. Probs of masked slots are returned as given (backends
    ignore them; they get zero gradient). Inputs already int64 / float32 / [T, H] are
    returned as they are, without a copy (the checked ids are a new tensor). On CUDA the
    value check is one Triton launch (``moe_dispatch.kernels._check``).

    ``check_in_message`` (with ``check_values``, the top-k form): leave the value check of
    the ids and probs to the backend's routing message (the exact mode of ``alltoall`` /
    ``allgather`` reads them there anyway, and the check then costs no launch of its own):
    the ids come back unchecked and unmasked, ``check.in_message`` set.
    """
    err = _host_errors(hidden, num_experts, topk_idx, topk_probs, routing_map, probs)
    if err is not None:
        dev = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
        H = hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else 0
        dt = hidden.dtype if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() \
            else torch.float32
        return (torch.zeros(0, H, device=dev, dtype=dt),
                torch.zeros(0, 1, dtype=torch.long, device=dev),
                torch.zeros(0, 1, dtype=torch.float32, device=dev),
                PendingCheck(err, None))
    # Inputs already in the canonical form pass through untouched: on the GPU dispatch
    # path every op (even a no-op call) is host time.
    x_TH = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
    if topk_idx is not None:
        probs_TK = topk_probs if topk_probs.dtype == torch.float32 else topk_probs.float()
        bad = None
        help_ = ("dispatch: topk_idx has an expert id outside [-1, num_experts) or "
                 "topk_probs has NaN/inf/negative values")
        if check_values and check_in_message:
            idx_TK = topk_idx if topk_idx.dtype == torch.int64 else topk_idx.long()
            return x_TH, idx_TK, probs_TK, PendingCheck(None, None, help_, in_message=True)
        if check_values and topk_idx.numel():
            # Bad ids become -1 here, so none reaches a backend's layout or scatter; the
            # error itself travels in ``check``.
            idx_TK, bad = _check_topk(topk_idx, topk_probs, probs_TK, num_experts)
        else:
            idx_TK = topk_idx if topk_idx.dtype == torch.int64 else topk_idx.long()
        # Probs of masked slots are left as given: every backend reads only the probs of
        # slots that reach an expert row, and masked slots get zero gradient.
    else:
        help_ = "dispatch: probs has NaN/inf/negative values"
        bad = None
        if check_values and probs.numel():
            bad = _check_probs(probs)
            if topk is not None:
                # A top-k hint smaller than a row's routed count would drop experts silently.
                help_ += f", or a token is routed to more than topk={topk} experts"
                bad = bad | (routing_map.sum(1) > topk).any()
        idx_TK, probs_TK = dense_to_topk(routing_map.bool(), probs, topk)
    return x_TH, idx_TK, probs_TK, PendingCheck(None, bad, help_)


def _check_topk(idx: torch.Tensor, probs: torch.Tensor, probs_f32: torch.Tensor,
                num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(idx_TK int64 with ids outside [-1, E) replaced by -1, bad 0-dim int64 0/1).

    One Triton launch on CUDA (``kernels._check``); the torch code is the reference.
    ``probs_f32`` is ``probs`` as float32: both paths check the float32 values."""
    if kernels.use_triton(idx):
        return kernels.check_values(idx, probs, num_experts)
    idx = idx.long()
    # An id outside [-1, E) changes under clamp.
    oob_TK = idx.clamp(-1, num_experts - 1) != idx
    bad = (oob_TK.any() | bad_probs(probs_f32)).to(torch.int64)
    return idx.masked_fill(oob_TK, -1), bad


def _check_probs(p: torch.Tensor) -> torch.Tensor:
    """0-dim int64 0/1: any NaN, +-inf or negative value of ``p`` (as float32)."""
    if kernels.use_triton(p):
        return kernels.check_values(None, p, 0)[1]
    return bad_probs(p.float()).to(torch.int64)


def bad_probs(p: torch.Tensor) -> torch.Tensor:
    """0-dim bool: any NaN, +-inf or negative value (NaN and +inf become -1 first)."""
    return (p.nan_to_num(nan=-1.0, posinf=-1.0) < 0).any()


def _host_errors(hidden, num_experts, topk_idx, topk_probs, routing_map, probs) -> Optional[str]:
    if not isinstance(hidden, torch.Tensor):
        return f"dispatch: hidden must be a torch.Tensor, got {type(hidden).__name__}"
    if not hidden.is_floating_point():
        return f"dispatch: hidden must be a floating tensor, got dtype {hidden.dtype}"
    if hidden.dim() not in (2, 3):
        return f"dispatch: hidden must be [T, H] or [S, B, H], got shape {tuple(hidden.shape)}"
    T = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else hidden.shape[:-1].numel()
    topk_given = topk_idx is not None or topk_probs is not None
    dense_given = routing_map is not None or probs is not None
    if topk_given and dense_given:
        return "dispatch: give either (topk_idx, topk_probs) or (routing_map, probs), not both"
    if not topk_given and not dense_given:
        return "dispatch: give (topk_idx, topk_probs) or (routing_map, probs)"
    if topk_given:
        if topk_idx is None or topk_probs is None:
            return "dispatch: topk_idx and topk_probs must be given together"
        for name, t in (("topk_idx", topk_idx), ("topk_probs", topk_probs)):
            if not isinstance(t, torch.Tensor):
                return f"dispatch: {name} must be a torch.Tensor, got {type(t).__name__}"
        if topk_idx.is_floating_point() or topk_idx.dtype == torch.bool:
            return f"dispatch: topk_idx must be an integer tensor, got dtype {topk_idx.dtype}"
        if not topk_probs.is_floating_point():
            return f"dispatch: topk_probs must be a floating tensor, got dtype {topk_probs.dtype}"
        if topk_idx.dim() != 2 or topk_idx.shape[0] != T:
            return (f"dispatch: topk_idx must be [T, K] with T={T} tokens of hidden "
                    f"{tuple(hidden.shape)}, got shape {tuple(topk_idx.shape)}")
        if topk_probs.shape != topk_idx.shape:
            return (f"dispatch: topk_probs shape {tuple(topk_probs.shape)} does not match "
                    f"topk_idx shape {tuple(topk_idx.shape)}")
        for name, t in (("topk_idx", topk_idx), ("topk_probs", topk_probs)):
            if t.device != hidden.device:
                return f"dispatch: {name} is on {t.device} but hidden is on {hidden.device}"
    else:
        if routing_map is None or probs is None:
            return "dispatch: routing_map and probs must be given together"
        for name, t in (("routing_map", routing_map), ("probs", probs)):
            if not isinstance(t, torch.Tensor):
                return f"dispatch: {name} must be a torch.Tensor, got {type(t).__name__}"
        if routing_map.dtype != torch.bool:
            return f"dispatch: routing_map must be a bool tensor, got dtype {routing_map.dtype}"
        if not probs.is_floating_point():
            return f"dispatch: probs must be a floating tensor, got dtype {probs.dtype}"
        if routing_map.shape != (T, num_experts):
            return (f"dispatch: routing_map must be [T, E] = [{T}, {num_experts}], "
                    f"got shape {tuple(routing_map.shape)}")
        if probs.shape != routing_map.shape:
            return (f"dispatch: probs shape {tuple(probs.shape)} does not match routing_map "
                    f"shape {tuple(routing_map.shape)}")
        for name, t in (("routing_map", routing_map), ("probs", probs)):
            if t.device != hidden.device:
                return f"dispatch: {name} is on {t.device} but hidden is on {hidden.device}"
    return None
