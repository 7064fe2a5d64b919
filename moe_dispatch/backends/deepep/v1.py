"""The dispatch backend over a DeepEP-V1-compatible ``Buffer`` (normal / high-throughput mode).

``deepep`` (``deep_ep.Buffer``) and ``uccl`` (UCCL-EP's ``Buffer``) differ only in where
the ``Buffer`` class comes from and how it is constructed; both subclass ``V1Backend``.

Per dispatch:
  1. Input validation and shape agreement. The first call (and any call after a rank's
     hidden size or top-k width changed) runs ``agree``: one tiny all-gather and host sync
     that settles the ``PendingCheck`` on every rank and agrees on H and K (a zero-token
     rank's narrower K is widened with masked slots). Later calls with the agreed shape
     add nothing: a rank whose input is bad (value check failed on the device, a host
     error, or H / K that no longer fit the agreed shape) still takes part in DeepEP's
     dispatch with rows of the agreed shape (so no rank hangs and the buffer is only ever
     used with the agreed H): no rows at all for a host error or a shape misfit; for a
     value error its rows with the bad ids already turned into -1 by the check
     (``routing.canonicalize``). It raises a flag carried in the per-expert counts DeepEP
     already hands to the host (``v1_buffer.v1_dispatch``).
     Every rank sees the flag right after the dispatch and only then runs ``agree``: it
     raises on every rank, or (a legitimate new shape) the dispatch is redone with it.
  2. DeepEP layout + dispatch: each token goes once to every rank holding one of its
     experts, with its top-k ids (local ids there, -1 elsewhere) and fp32 probs. The CPU
     waits for the received counts inside DeepEP (its one host sync).
  3. Local permutation into expert-grouped rows with ``moe_dispatch.permute.group_plan``,
     using DeepEP's per-expert counts, so no further sync.
Combine: sum each received token's expert rows locally (``unpermute``), then DeepEP's
combine sums over ranks. Backward of dispatch is combine (grads to hidden and to probs);
backward of combine is a dispatch that reuses the cached layout in the handle.

Budget mode (``max_rows_per_rank = B``, intranode only): DeepEP's ``num_worst_tokens``
dispatch, no host sync after the first call (which agrees H, K and the token cap T_cap
once); the received local ids are planned into exactly B rows on the device
(``permute.budget_plan``) and the validation flag rides in extra rows of the dispatch
itself: see ``budget_mode.py`` beside this file. Combine is ``unpermute`` with that plan,
then DeepEP's combine.

Precision: V1 combine kernels reduce BF16 only, so rows travel as BF16; FP32/FP16 inputs are
cast at the boundary and results cast back (BF16 precision). With one rank there is
nothing to communicate: rows are permuted locally and no Buffer is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from ... import comm
from ..budget import BudgetShape, LocalInput, fit_input, pad_rows, status_bits
from ..common import agree, cuda_reason, pad_topk, require_equal
from ...permute import GroupPlan, budget_plan, group_plan, permute, unpermute
from ...protocol import BackendConfig, DispatchResult, PendingCheck, check_wire_dtype
from .budget_mode import MAX_WIRE_TOPK, V1BudgetHandle, num_worst_tokens, read_flags, wire_input
from .buffer import (INTRANODE_SIZES, V1Comm, V1Combine, V1Dispatch, V1Library,
                     check_group_size, configs_for, is_flagged, manager_for, new_box)

WIRE_DTYPE = torch.bfloat16
# Smallest row DeepEP V1 handled correctly in our measurements (H=256 at BF16; H=64 failed).
MIN_ROW_BYTES = 512


@dataclass(frozen=True)
class V1Handle:
    """What combine needs from one dispatch.

    comm_handle: the library's communication handle (layout of this dispatch; reused by
                 combine and, in backward, by the cached dispatch). None with one rank.
    plan:        grouping of the received rows [N_recv, K] by local expert.
    num_tokens:  T, rows of the combine output (a zero-token rank sends one masked dummy
                 row, dropped again here).
    out_dtype:   dtype of the caller's hidden states (combine returns it).
    """

    comm_handle: Any
    plan: GroupPlan
    num_tokens: int
    out_dtype: torch.dtype


@dataclass(frozen=True)
class _Sent:
    """What one DeepEP dispatch received (before the local grouping)."""

    recv_x: torch.Tensor
    recv_p: torch.Tensor
    recv_idx: torch.Tensor
    box: Any
    num_tokens: int
    out_dtype: torch.dtype


_OPTIONS = {"num_sms", "async_finish", "allocate_on_comm_stream", "buffer_module",
            "max_tokens_per_rank"}


class V1Backend(comm.CollectiveBackendBase):
    """Base of the ``deepep`` and ``uccl`` backends.

    backend_options:
      num_sms (int, even):   SMs of the normal-mode kernels (default: the library's class-wide
                             ``Buffer.num_sms``, 20 in DeepEP; ``set_deepep_num_sms`` changes it).
      async_finish (bool):   run DeepEP's kernels after an event of the current stream
                             instead of the stream itself; the result is still waited for
                             before it is returned (as Megatron-Core does).
      allocate_on_comm_stream (bool): let DeepEP allocate outputs on its communication
                             stream (requires async_finish).
      max_tokens_per_rank (int): budget mode only: T_cap, the most tokens a rank sends per
                             call (default: the largest T of the first call); a call with
                             more sends the first T_cap and flags STATUS_TOKENS_DROPPED.
                             Sets DeepEP's num_worst_tokens = R * (T_cap + 1).
    """

    name = "v1"
    library: Optional[V1Library] = None
    # Rows travel in this dtype whatever the input's (DeepEP V1 combines BF16 only).
    wire_dtype = WIRE_DTYPE

    def __init__(self, config: BackendConfig):
        check_wire_dtype(config, self)  # no FP8 rows yet: refuse rather than move BF16
        opts = dict(config.options or {})
        unknown = set(opts) - self._option_names()
        if unknown:
            raise ValueError(f"{self.name}: unknown backend_options {sorted(unknown)}; "
                             f"known: {sorted(self._option_names())}")
        super().__init__(config)
        self.E = config.num_experts
        self.num_sms = opts.get("num_sms")
        if self.num_sms is not None and (not isinstance(self.num_sms, int) or self.num_sms <= 0
                                         or self.num_sms % 2):
            raise ValueError(f"{self.name}: num_sms must be a positive even int (one channel is a "
                             f"pair of SMs), got {self.num_sms!r}")
        self.async_finish = bool(opts.get("async_finish", False))
        self.allocate_on_comm_stream = bool(opts.get("allocate_on_comm_stream", False))
        if self.allocate_on_comm_stream and not self.async_finish:
            raise ValueError(f"{self.name}: allocate_on_comm_stream=True requires async_finish=True "
                             "(DeepEP hands tensors between streams through the events)")
        self.link: Optional[V1Comm] = None
        # (H, K) every rank agreed on in the last agreement: calls in that shape need none.
        self._agreed: Optional[Tuple[int, int]] = None
        self.budget = config.max_rows_per_rank
        self.token_cap = self._token_cap(opts.get("max_tokens_per_rank"))
        # Budget mode: the shapes agreed at the first call (H, K, T_cap) and its dtype (that of
        # a host error's placeholder rows).
        self._shape: Optional[BudgetShape] = None
        self._dtype: Optional[torch.dtype] = None
        self._min_row_bytes = 0
        if self.R > 1:
            lib = self._library(opts)
            buffer_cls = lib.load()
            # DeepEP v1.2.1's intranode combine returned wrong sums for 128-byte rows (H=64)
            # at >= 256 tokens per rank on 4xH200, while H >= 256 was exact: refuse small rows.
            # (A test stand-in Buffer may declare its own minimum.)
            self._min_row_bytes = int(getattr(buffer_cls, "min_row_bytes", MIN_ROW_BYTES))
            mgr = manager_for(lib, self.group, buffer_cls)
            check_group_size(self.R, mgr.rdma, lib.name)
            dcfg = ccfg = None
            if self.num_sms is not None:
                dcfg, ccfg = configs_for(buffer_cls, self.R, self.num_sms)
            self.link = V1Comm(mgr, self.E, dcfg, ccfg, self.async_finish,
                               self.allocate_on_comm_stream, self.num_sms)
            if self.budget is not None:
                self._check_intranode(mgr)

    def _token_cap(self, cap) -> Optional[int]:
        if cap is None:
            return None
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"{self.name}: max_tokens_per_rank must be a positive int, "
                             f"got {cap!r}")
        if self.budget is None:
            raise ValueError(f"{self.name}: max_tokens_per_rank applies to the budget mode "
                             "only (MoETokenDispatcher(..., max_rows_per_rank=B))")
        return cap

    def _check_intranode(self, mgr) -> None:
        # num_worst_tokens is refused by DeepEP's internode dispatch (an assert there).
        if self.R not in INTRANODE_SIZES or not mgr.intranode():
            raise ValueError(
                f"{self.name}: the budget mode (max_rows_per_rank) runs DeepEP's sync-free "
                f"dispatch (num_worst_tokens), which is intranode only: it needs the whole EP "
                f"group on one host with {INTRANODE_SIZES} ranks (got {self.R}); use the "
                "exact mode, or backend 'nvshmem' / 'alltoall' with max_rows_per_rank")

    # Subclasses pick the library.
    def _library(self, opts) -> V1Library:
        return self.library

    def _option_names(self):
        return _OPTIONS - {"buffer_module"}

    @classmethod
    def availability(cls) -> Optional[str]:
        reason = cls.library.reason()
        if reason is not None:
            return reason
        return cuda_reason()

    @property
    def manager(self):
        return None if self.link is None else self.link.manager

    def free_buffer(self) -> None:
        """Destroy this group's buffer (collective; call on every rank before tearing down
        the process group). The next dispatch builds a new one."""
        if self.link is not None:
            self.link.manager.free()

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        if self.budget is not None:
            return self._dispatch_budget(x_TH, idx_TK, probs_TK, check)
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        if self.R == 1:
            agree(check, self.group, x_TH.device, [H, K])
            plan = group_plan(idx_TK, self.L, None, self.cfg.pad_multiple)
            tokens, probs = permute(x_TH, probs_TK, plan)
            return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                                  probs, V1Handle(None, plan, T, x_TH.dtype))
        if self._agreed is None:
            rows = agree(check, self.group, comm.group_device(self.group), [H, K])
            H, K = self._agree_shape(rows)
            idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K)
            return self._finish(self._exchange(x_TH, idx_TK, probs_TK, None))
        H_a, K_a = self._agreed
        if check.host_error is not None or H != H_a or K > K_a:
            # This rank cannot send its rows in the agreed shape: it sends nothing, in that
            # shape, and flags; the agreement after the dispatch sorts it out.
            dev = comm.group_device(self.group)
            sent = self._exchange(torch.zeros(0, H_a, dtype=WIRE_DTYPE, device=dev),
                                  torch.zeros(0, K_a, dtype=torch.long, device=dev),
                                  torch.zeros(0, K_a, dtype=torch.float32, device=dev), 1)
        else:
            if K < K_a:
                idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K_a)
            # Value errors are known on the device only: the check already turned bad ids
            # into -1 (nothing out of range reaches the layout kernel); its 0/1 verdict is
            # added to the counts DeepEP hands every rank, without a sync.
            sent = self._exchange(x_TH, idx_TK, probs_TK, check.device_bad)
        if not is_flagged(sent.box.counts, self.R):
            return self._finish(sent)
        # Some rank flagged (or real counts reached the flag range): agree now. This raises
        # on every rank for bad input; otherwise either nothing was wrong (keep the rows)
        # or some rank's shape changed: redo the dispatch in the newly agreed shape.
        rows = agree(check, self.group, comm.group_device(self.group), [H, K])
        require_equal(rows, 0, "hidden size")
        if all(r[0] == H_a and r[1] <= K_a for r in rows):
            return self._finish(sent)
        del sent
        H, K = self._agree_shape(rows)
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K)
        return self._finish(self._exchange(x_TH, idx_TK, probs_TK, None))

    def _agree_shape(self, rows: List[List[int]]) -> Tuple[int, int]:
        """(H, K) from the gathered [H, K] of every rank; raises on every rank alike."""
        H = require_equal(rows, 0, "hidden size")
        K = max(r[1] for r in rows)
        if (H * WIRE_DTYPE.itemsize) % 16:
            raise ValueError(f"{self.name}: hidden size {H} must be a multiple of 8 (DeepEP moves "
                             "rows in 16-byte vectors)")
        if H * WIRE_DTYPE.itemsize < self._min_row_bytes:
            raise ValueError(
                f"{self.name}: hidden size {H} is below "
                f"{self._min_row_bytes // WIRE_DTYPE.itemsize}: DeepEP V1's intranode combine "
                "was measured returning wrong sums for such small rows; use backend "
                "'alltoall' or 'nvshmem' for this model")
        self._agreed = (H, K)
        return H, K

    def _exchange(self, x_TH, idx_TK, probs_TK, flag) -> "_Sent":
        """DeepEP layout + dispatch of [T, H] rows with [T, K] routing (K agreed)."""
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        x_b = x_TH.to(WIRE_DTYPE).contiguous()
        idx_b = idx_TK.contiguous()
        p_b = probs_TK.contiguous()  # float32 already (the protocol's form)
        if T == 0:
            # One masked row (sent nowhere) keeps the kernels away from empty launches.
            x_b = torch.cat([x_b, x_b.new_zeros(1, H)])
            idx_b = torch.cat([idx_b, idx_b.new_full((1, K), -1)])
            p_b = torch.cat([p_b, p_b.new_zeros(1, K)])
        box = new_box()
        recv_x, recv_p, recv_idx = V1Dispatch.apply(x_b, p_b, idx_b, self.link, box, flag)
        return _Sent(recv_x, recv_p, recv_idx, box, T, x_TH.dtype)

    def _finish(self, sent: "_Sent") -> DispatchResult:
        """Group the received rows by local expert (DeepEP's host counts: no sync)."""
        plan = group_plan(sent.recv_idx, self.L, sent.box.counts, self.cfg.pad_multiple)
        tokens, probs = permute(sent.recv_x, sent.recv_p, plan)
        if tokens.dtype != sent.out_dtype:
            tokens = tokens.to(sent.out_dtype)
        return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                              probs, V1Handle(sent.box.handle, plan, sent.num_tokens,
                                              sent.out_dtype))

    # ------------------------------------------------------------------ budget mode

    def _dispatch_budget(self, x_TH, idx_TK, probs_TK, check: PendingCheck) -> DispatchResult:
        """Exactly B expert-grouped rows, no host sync after the first call (module doc)."""
        if self._shape is None:
            self._agree_budget(x_TH, idx_TK, check)
        dev = comm.group_device(self.group) if self.R > 1 else x_TH.device
        inp = fit_input(self._shape, x_TH, idx_TK, probs_TK, check, self._dtype, dev)
        if self.R == 1:
            recv_x, recv_p, lid_NK, bad, clipped = inp.x_TH, inp.probs_TK, inp.idx_TK, \
                inp.code, torch.full((), int(inp.clipped), device=dev)
            comm_handle = None
        else:
            recv_x, recv_p, lid_NK, bad, clipped, comm_handle = self._exchange_budget(inp)
        plan = budget_plan(lid_NK, self.L, self.budget, self.cfg.pad_multiple)
        tokens, probs = permute(recv_x, recv_p, plan)
        # The caller's dtype (a host error's placeholder has the first call's).
        out_dtype = inp.x_TH.dtype
        if tokens.dtype != out_dtype:
            tokens = tokens.to(out_dtype)
        status = status_bits(plan.dropped, clipped, bad)
        handle = V1BudgetHandle(comm_handle, plan, inp.x_TH.shape[0], inp.num_tokens,
                                out_dtype, status)
        return DispatchResult(tokens, plan.tokens_per_expert_L, probs, handle, status,
                              check=inp.check)

    def _agree_budget(self, x_TH, idx_TK, check: PendingCheck) -> None:
        """The budget mode's one host exchange (first call): H, K, T_cap on every rank;
        raises on every rank for bad input or a hidden size DeepEP cannot move."""
        dev = comm.group_device(self.group) if self.R > 1 else x_TH.device
        shape = BudgetShape.agree(check, self.group, dev, *idx_TK.shape, x_TH.shape[1],
                                  self.token_cap)
        self._agree_shape([[shape.hidden, shape.topk]])  # DeepEP's row-size rules
        if shape.topk + 1 > MAX_WIRE_TOPK:
            raise ValueError(f"{self.name}: top-k {shape.topk} too wide for the budget mode "
                             f"(one extra slot carries the validation flag; DeepEP moves at "
                             f"most {MAX_WIRE_TOPK} slots per token)")
        self._shape, self._dtype = shape, x_TH.dtype

    def _exchange_budget(self, inp: LocalInput):
        """DeepEP's num_worst_tokens dispatch of this rank's tokens plus its flag rows.
        Returns (recv_x [N, H], recv_probs [N, K], recv_lid [N, K], bad, clipped,
        comm_handle); N = R * (T_cap + 1) rows, the unused ones hold no routing."""
        x_TH, probs_TK = inp.x_TH, inp.probs_TK
        x_b, idx_b, p_b = wire_input(x_TH.to(WIRE_DTYPE), inp.idx_TK, probs_TK, inp.code,
                                     inp.clipped, self.L, self.R)
        box = new_box()
        N = num_worst_tokens(self.R, self._shape.token_cap)
        recv_x, recv_p, recv_idx = V1Dispatch.apply(x_b, p_b, idx_b, self.link, box, None, N)
        bad, clipped = read_flags(recv_idx, recv_p)
        K = self._shape.topk
        return recv_x, recv_p[:, :K], recv_idx[:, :K], bad, clipped, box.handle

    def _combine_budget(self, y_BH: torch.Tensor, handle: V1BudgetHandle) -> torch.Tensor:
        per_row = unpermute(y_BH, handle.plan)
        if handle.comm_handle is not None:
            # Rows come back for the sent tokens, then for the flag rows (zeros): cut.
            per_row = V1Combine.apply(per_row.to(WIRE_DTYPE), handle.comm_handle,
                                      self.link)[:handle.num_sent]
        return pad_rows(per_row, handle.num_tokens).to(handle.out_dtype)

    def combine(self, y_NH: torch.Tensor, handle: V1Handle) -> torch.Tensor:
        if isinstance(handle, V1BudgetHandle):
            return self._combine_budget(y_NH, handle)
        per_row = unpermute(y_NH, handle.plan)
        if handle.comm_handle is None:
            return per_row
        out = V1Combine.apply(per_row.to(WIRE_DTYPE), handle.comm_handle, self.link)
        if out.shape[0] != handle.num_tokens:
            out = out[:handle.num_tokens]
        return out.to(handle.out_dtype)
