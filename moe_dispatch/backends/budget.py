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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import comm
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
