"""What the collective backends (``alltoall``, ``allgather``) share in the budget mode.

The budget mode (``BackendConfig.max_rows_per_rank = B``) never syncs the host after the
first call of a shape. Buffers that cross ranks then need sizes every rank knows without
asking: the hidden size H, the top-k width K and a token capacity ``T_cap`` (the most
tokens one rank may send per call: ``backend_options["max_tokens_per_rank"]``, else the
largest T of the first call). ``BudgetShape.agree`` settles them once, with the same single
all-gather (and the same raising on every rank) as an exact-mode dispatch. Later calls
check their own shape against it on the host: a misfit rank takes part with no tokens and
flags bad input, and a rank with more than ``T_cap`` tokens sends the first ``T_cap`` and
flags ``STATUS_TOKENS_DROPPED``.

The metadata both exchange (``pack_meta`` / ``receive_plan``): R blocks of C rows plus a
header row, ``[R, C + 1, 2K]`` float32. A token's row is ``[id + 1 (as float32, exact below
2**24; 0 = masked), probs]``, so an unused (zero) row is "no expert"; the header row is
``[code, clipped, 0, ...]`` (the sender's validation code; whether it clipped tokens), so
bad input and clipping reach every rank with the data. On CUDA (with triton) both sides run
as fused kernels (``fused_budget``: one launch to pack, two to plan, instead of ~60 small
torch ops); the torch code here is the reference and the CPU path, with identical results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import comm, kernels
from ..permute import BudgetPlan, budget_plan, filled_rows, permute
from ..routing import rank_mask
from ..protocol import (STATUS_BAD_INPUT, STATUS_ROWS_DROPPED, STATUS_TOKENS_DROPPED,
                        BudgetCheck, DispatchInputError, PendingCheck)


@dataclass(frozen=True)
class BudgetShape:
    """Sizes every rank of the group agreed on at the first budget-mode call.

    hidden: H.  topk: K (the widest rank's; narrower ranks widen with -1 slots).
    token_cap: T_cap, the most tokens a rank sends per call.
    """

    hidden: int
    topk: int
    token_cap: int

    @staticmethod
    def agree(check: PendingCheck, group, device: torch.device, T: int, K: int, H: int,
              token_cap: Optional[int]) -> "BudgetShape":
        """One all-gather of [code, T, K, H] (a host sync, first call only); raises on every
        rank if any rank's input was bad or the hidden sizes differ."""
        msg = torch.cat([check.code(device).reshape(1).to(torch.int64),
                         comm.ints_on([T, K, H], device)])
        rows = comm.gather_ints(msg, group).tolist() if comm.group_size(group) > 1 \
            else [msg.tolist()]
        check.raise_if_failed([r[0] for r in rows], comm.group_rank(group))
        hiddens = [r[3] for r in rows]
        if any(h != H for h in hiddens):
            raise DispatchInputError(f"dispatch: hidden size differs across EP ranks: {hiddens}")
        cap = token_cap if token_cap is not None else max(max(r[1] for r in rows), 1)
        return BudgetShape(H, max(r[2] for r in rows), int(cap))


def budget_options(config, name: str):
    """(B or None, T_cap or None) from a collective backend's config; its only
    ``backend_options`` key is ``max_tokens_per_rank``."""
    opts = dict(config.options or {})
    unknown = set(opts) - {"max_tokens_per_rank"}
    if unknown:
        raise ValueError(f"{name}: unknown backend_options {sorted(unknown)}; known: "
                         "['max_tokens_per_rank'] (budget mode)")
    return config.max_rows_per_rank, opts.get("max_tokens_per_rank")


@dataclass(frozen=True)
class LocalInput:
    """This rank's input brought to the agreed shape for one budget-mode call.

    x_TH, idx_TK, probs_TK: T <= T_cap rows, K = the agreed top-k (masked where padded);
                 a misfit rank's (host error, other H, wider K) have no tokens.
    code:        0-dim int64 device tensor, this rank's validation code (0 = fine).
    num_tokens:  the caller's T (combine returns that many rows; zeros past T_cap).
    clipped:     True when T > T_cap (the tail tokens were not sent).
    check:       the ``BudgetCheck`` the handle carries (this rank's message, if any).
    """

    x_TH: torch.Tensor
    idx_TK: torch.Tensor
    probs_TK: torch.Tensor
    code: torch.Tensor
    num_tokens: int
    clipped: bool
    check: BudgetCheck


def fit_input(shape: BudgetShape, x_TH, idx_TK, probs_TK, check: PendingCheck,
              dtype: torch.dtype, device: torch.device) -> LocalInput:
    """Bring this rank's input to the agreed shape without a host sync (see module doc)."""
    T, K = idx_TK.shape
    H = x_TH.shape[1] if x_TH.dim() == 2 else -1
    message = check.host_error
    if message is None and (H != shape.hidden or K > shape.topk):
        message = (f"dispatch: this call's hidden size {H} / top-k {K} do not fit the budget "
                   f"mode's agreed hidden {shape.hidden} / top-k {shape.topk} (fixed at the "
                   "first call: shapes are static in the budget mode)")
    if message is not None:
        # Placeholders of the agreed shape. They require grad in grad mode: the peers'
        # outputs do, and their backward runs collectives this rank must join too.
        grad = torch.is_grad_enabled()
        empty = torch.zeros(0, shape.topk, device=device)
        return LocalInput(torch.zeros(0, shape.hidden, dtype=dtype, device=device)
                          .requires_grad_(grad), empty.long() - 1, empty.requires_grad_(grad),
                          comm.ints_on([2], device)[0], T, False, BudgetCheck(message))
    if K < shape.topk:
        from ..routing import pad_topk
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, shape.topk)
    clipped = T > shape.token_cap
    if clipped:
        x_TH, idx_TK, probs_TK = (t[:shape.token_cap] for t in (x_TH, idx_TK, probs_TK))
    code = check.code(device)
    return LocalInput(x_TH, idx_TK, probs_TK, code, T, clipped,
                      BudgetCheck(check.value_help if check.device_bad is not None else None,
                                  code))


def budget_input(backend, x_TH, idx_TK, probs_TK, check: PendingCheck) -> LocalInput:
    """This call's input fitted to ``backend.shape``, agreed first (one host sync) on the
    backend's first budget-mode call. ``backend``: a collective backend with ``shape``,
    ``group`` and ``token_cap``."""
    dev = x_TH.device
    if backend.shape is None:
        backend.shape = BudgetShape.agree(check, backend.group, dev, *idx_TK.shape,
                                          x_TH.shape[1], backend.token_cap)
    return fit_input(backend.shape, x_TH, idx_TK, probs_TK, check, x_TH.dtype, dev)


def fused_budget(t: torch.Tensor) -> bool:
    """Whether the budget mode's metadata and plan work for tensors like ``t`` runs as fused
    Triton kernels (CUDA with triton, ``MOE_DISPATCH_TRITON`` not "0") or as the torch
    reference. The one decision both backends use."""
    return kernels.use_triton(t)


def pack_meta(inp: LocalInput, rows: int, num_experts: Optional[int] = None,
              num_local_experts: Optional[int] = None, fused: Optional[bool] = None):
    """This rank's metadata blocks for the wire (see the module doc); no host sync.

    inp:               this call's fitted input (ids, probs, validation code, clipped),
                       with T <= rows tokens.
    rows:              C, token rows per block.
    num_experts, num_local_experts: E and L for ``alltoall``: R = E / L blocks, block r
                       holding, in token order, the tokens with an expert on rank r (ids in
                       [0, E); expert e lives on rank e // L). Both None for ``allgather``:
                       one block, token t on row t.
    fused:             force the fused kernel (True) or the torch reference (False); None:
                       ``fused_budget``.
    Returns (send_plan, meta_RCW [R, C + 1, 2K] float32, differentiable w.r.t. the probs):
    ``send_plan`` (alltoall) is the ``BudgetPlan`` of the T tokens into the R * C send rows
    (``pos_TR``: token t's row, -1 = not sent to that rank); None for allgather.
    """
    if fused is None:
        fused = fused_budget(inp.idx_TK)
    per_rank = num_local_experts is not None
    # One block (allgather) needs no expert split: E = L = 1 stand in, unread.
    E, L = (num_experts, num_local_experts) if per_rank else (1, 1)
    R = E // L
    if fused:
        meta, maps = kernels.pack_meta(inp.idx_TK, inp.probs_TK, inp.code, inp.clipped, E, L,
                                       R, rows, per_rank)
        if not per_rank:
            return None, meta
        pos_TR, filled_S, counts_R, dropped = maps
        return BudgetPlan(pos_TR, filled_S, R * rows, pos_TR.shape[0], R, counts_R,
                          dropped), meta
    K = inp.idx_TK.shape[1]
    meta_TW = torch.cat([(inp.idx_TK + 1).to(torch.float32), inp.probs_TK], dim=1)
    if per_rank:
        plan = _send_plan(inp.idx_TK, E, L, rows)
        rows_SW, _ = permute(meta_TW, None, plan)
    else:
        plan, rows_SW = None, pad_rows(meta_TW, rows)
    head_R2 = torch.stack([inp.code.to(torch.float32).expand(R),
                           torch.full((R,), float(inp.clipped), device=meta_TW.device)], 1)
    head_RW = torch.nn.functional.pad(head_R2, (0, 2 * K - 2))
    return plan, torch.cat([rows_SW.view(R, rows, 2 * K), head_RW.view(R, 1, 2 * K)], 1)


def _send_plan(idx_TK: torch.Tensor, E: int, L: int, C: int) -> BudgetPlan:
    """The torch reference of the send plan: the T <= C tokens grouped into R = E / L
    blocks of C rows (token t's row in block r is its rank among the tokens going to r)."""
    R, T, dev = E // L, idx_TK.shape[0], idx_TK.device
    mask_TR = rank_mask(idx_TK, E, L)
    row_TR = torch.cumsum(mask_TR.to(torch.long), 0) - 1
    pos_TR = torch.where(mask_TR, torch.arange(R, device=dev) * C + row_TR, -1)
    return BudgetPlan(pos_TR, filled_rows(pos_TR, R * C), R * C, T, R, mask_TR.sum(0),
                      torch.zeros((), dtype=torch.bool, device=dev))


def receive_plan(meta_RCW: torch.Tensor, topk: int, first_expert: int, num_local_experts: int,
                 budget: int, pad_multiple: Optional[int], fused: Optional[bool] = None):
    """The receiver's side: the ``BudgetPlan`` of the R * C token rows of received
    metadata blocks (see the module doc), their probs, and the status; no host sync.

    meta_RCW:          [R, C + 1, 2K] float32 received blocks (differentiable).
    topk:              K.
    first_expert:      this rank's first global expert id (rank * L).
    num_local_experts: L; a slot is this rank's when first_expert <= id < first_expert + L.
    budget, pad_multiple: B rows, each expert's block padded to a multiple (``budget_plan``).
    fused:             force the fused kernels (True) or the torch reference (False); None:
                       ``fused_budget``.
    Returns (plan over the N = R * C rows, probs_NK [N, K] float32 (differentiable),
    status [1] int32: ``STATUS_ROWS_DROPPED`` when rows did not fit, plus
    ``STATUS_TOKENS_DROPPED`` / ``STATUS_BAD_INPUT`` when some header says so).
    """
    R, C, K, L = meta_RCW.shape[0], meta_RCW.shape[1] - 1, topk, num_local_experts
    if fused is None:
        fused = fused_budget(meta_RCW)
    probs_NK = meta_RCW[:, :C, K:].reshape(R * C, K)
    if fused:
        # The kernels decode the ids (id + 1 - first_expert) and read the header rows.
        pos, filled, tpe, dropped, status = kernels.budget_arrays(
            meta_RCW.detach(), K, C, L, budget, max(int(pad_multiple or 1), 1),
            shift=first_expert + 1, header=True)
        return BudgetPlan(pos, filled, budget, R * C, K, tpe, dropped), probs_NK, status
    gid_NK = meta_RCW.detach()[:, :C, :K].reshape(R * C, K).to(torch.long) - 1
    lid_NK = gid_NK - first_expert
    lid_NK = torch.where((gid_NK >= 0) & (lid_NK >= 0) & (lid_NK < L), lid_NK, -1)
    plan = budget_plan(lid_NK, L, budget, pad_multiple)
    head_R2 = meta_RCW.detach()[:, C, :2]
    return plan, probs_NK, status_bits(plan.dropped, head_R2[:, 1].amax(),
                                       head_R2[:, 0].amax())


def status_bits(dropped: torch.Tensor, tokens_dropped: torch.Tensor,
                bad: torch.Tensor) -> torch.Tensor:
    """[1] int32 status from three 0-dim device flags (bool or int)."""
    return (dropped.to(torch.int32) * STATUS_ROWS_DROPPED
            + (tokens_dropped != 0).to(torch.int32) * STATUS_TOKENS_DROPPED
            + (bad != 0).to(torch.int32) * STATUS_BAD_INPUT).reshape(1)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` [n, ...] with zero rows appended to ``rows`` (n <= rows); differentiable."""
    n = t.shape[0]
    return t if n == rows else torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - n))
