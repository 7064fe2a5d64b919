"""``hybridep``: DeepEP's HybridEP (``deep_ep.HybridEPBuffer``, branch ``hybrid-ep``).

The permutation is fused into the communication (``dispatch_with_permute`` /
``combine_with_unpermute``), so rows arrive grouped by local expert and padded to
``pad_multiple`` without a separate permute pass. Buffers are owned per process group in
``buffer.py`` beside this file (shared with ``moe_dispatch.fused_a2a``).

Uneven token counts: HybridEP all-gathers the routing maps as equal blocks, so every rank
must pass the same number of tokens. The backend pads each rank's tokens with unrouted
zero rows up to the largest count in the group (rounded up to the kernels' 128-token
chunk, a compile-time constant of their JIT build), learnt in the same small exchange
that settles input validation; the padding rows go nowhere and are cut from combine's
output. A zero-token rank is just the extreme case. Hidden sizes that are not a multiple
of 512 (the library's validity rule) travel zero-padded to the next multiple.

Tokens routed nowhere (all slots masked, and the padding rows) are left unwritten by the
library's combine: the backend zeroes their output rows and their grads.

Library versions: the current hybrid-ep API and older commits with the ``use_host_meta``
API (e.g. 2eec484) are both driven; see ``buffer.py``. On the older API
``num_permuted_tokens`` is refused (it has no overflow guard: extra rows would be
written out of bounds).

backend_options:
  num_sms_dispatch_api, num_sms_combine_api (int): SMs of the two kernels.
  max_tokens_per_rank (int): size the buffer for this many tokens per rank up front
      (default: the first call's; a larger call later reallocates, logged).
  num_permuted_tokens (int): rows to allocate for the received, expert-grouped tokens.
      Dispatch then returns exactly that many rows (those past sum(tokens_per_expert), which
      the library leaves uninitialised, are zeroed with prob 0 by a device mask),
      ``tokens_per_expert`` stays on the GPU and HybridEP does not synchronize the host
      (its fused permute is asked for: the only path of the hybrid-ep head that drops the
      rows past the limit instead of writing them out of bounds). If more rows arrive
      than allowed, they are dropped and the handle's
      ``overflow_flag`` is set: check it with ``HybridEPBackend.overflowed(handle)`` or
      ``check_overflow(handle)`` (each a host sync, when you choose). With
      ``pad_multiple`` it must be a multiple of it. Current hybrid-ep API only: older
      commits (use_host_meta API) have no overflow guard, so it is refused there.
  tokens_per_rank (int): static token count promised by every rank (requires
      ``num_permuted_tokens``). The validation exchange is then skipped, so dispatch has no
      host sync at all; input checks are local only (a bad rank raises alone), so use it
      for fixed shapes (CUDA graphs) with a dispatcher built with ``check_inputs=False``.
  use_shared_buffer (bool): let dispatch and combine share memory (library default True).

Budget mode (``MoETokenDispatcher(..., max_rows_per_rank=B)``): HybridEP's sync-free
dispatch with ``num_permuted_tokens = B`` (so that option must stay unset), every rank at
the token count fixed at the first call (``tokens_per_rank`` / ``max_tokens_per_rank``
name it, else the first call's largest T; more tokens later: the first T_cap are sent
and STATUS_TOKENS_DROPPED is set); nothing raises for bad input after the first call (it
is flagged in ``status`` on every rank, see ``budget_mode.py``). Needs the current
hybrid-ep API: the older use_host_meta API is refused at construction.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ... import comm
from ..budget import BudgetShape, LocalInput, fit_input, pad_rows, status_bits
from ..common import agree, cuda_reason, require_equal, round_up
from .budget_mode import gather_flags, kept_counts
from .buffer import (HybridCall, HybridCombine, HybridDispatch, HybridSettings,
                     hybrid_reason, is_legacy_api, load_hybrid_ep_buffer_class,
                     manager_for, new_box, overflow_flag, zero_unused_rows)
from ...permute import budget_plan, group_plan, permute, unpermute
from ...protocol import (BackendConfig, DispatchInputError, DispatchResult,
                         PendingCheck, check_wire_dtype)
from ...routing import topk_to_dense

WIRE_DTYPE = torch.bfloat16
_OPTIONS = {"num_sms_dispatch_api", "num_sms_combine_api", "max_tokens_per_rank",
            "num_permuted_tokens", "tokens_per_rank", "use_shared_buffer"}
# Token counts per rank are padded to a multiple of the kernels' token chunk (env
# NUM_OF_TOKENS_PER_CHUNK_{DISPATCH,COMBINE}_API, default 128): the JIT build asserts it.
_CHUNK_ENV = ("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API")
# Hidden sizes valid for HybridEP (BufferConfig.is_valid); others travel zero-padded.
HIDDEN_ALIGN = 512


def token_align() -> int:
    a = 16  # the metadata maps' own alignment
    for name in _CHUNK_ENV:
        a = math.lcm(a, max(int(os.environ.get(name, "128")), 1))
    return a


@dataclass(frozen=True)
class HybridEPHandle:
    """What combine needs from one dispatch.

    lib_handle:    HybridEP's handle tuple (None with one rank).
    plan:          local grouping plan (one rank only; None otherwise).
    num_tokens:    T, rows of combine's output (padding rows are cut).
    num_rows:      N, rows dispatch returned (combine's input must have as many).
    out_dtype:     dtype of the caller's hidden states.
    overflow_flag: [1] int32 on the GPU, nonzero when more rows arrived than
                   ``num_permuted_tokens`` allowed (None if the library has no flag).
    routed_T:      [T_pad] bool, token routed to at least one expert (padding rows False);
                   combine zeroes the other rows, which the library leaves unwritten.
    live_N:        [N] bool, rows the library wrote (sync-free dispatch: the rest is
                   uninitialised; zeroed, and given zero grads); None when all are.
    status:        budget mode: [1] int32 device ``protocol.STATUS_*`` bits; else None.
    pad_to:        budget mode: the caller's T (combine's rows past ``num_tokens``, tokens
                   not sent over the token cap, come back as zeros); else None.
    """

    lib_handle: Any
    plan: Optional[Any]  # GroupPlan, or BudgetPlan (budget mode); None with several ranks
    num_tokens: int
    num_rows: int
    out_dtype: torch.dtype
    overflow_flag: Optional[torch.Tensor] = None
    routed_T: Optional[torch.Tensor] = None
    live_N: Optional[torch.Tensor] = None
    status: Optional[torch.Tensor] = None
    pad_to: Optional[int] = None


class HybridEPBackend(comm.CollectiveBackendBase):
    name = "hybridep"
    # Rows travel as BF16 (HybridEP's dispatch/combine kernels), whatever the input's dtype.
    wire_dtype = torch.bfloat16

    def __init__(self, config: BackendConfig):
        check_wire_dtype(config, self)  # no FP8 rows yet: refuse rather than move BF16
        opts = dict(config.options or {})
        unknown = set(opts) - _OPTIONS
        if unknown:
            raise ValueError(f"hybridep: unknown backend_options {sorted(unknown)}; "
                             f"known: {sorted(_OPTIONS)}")
        super().__init__(config)
        self.E = config.num_experts
        for key in ("num_sms_dispatch_api", "num_sms_combine_api", "max_tokens_per_rank",
                    "num_permuted_tokens", "tokens_per_rank"):
            v = opts.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"hybridep: {key} must be a non-negative int, got {v!r}")
        self.budget = config.max_rows_per_rank
        if self.budget is not None and opts.get("num_permuted_tokens") is not None:
            raise ValueError("hybridep: in the budget mode num_permuted_tokens is "
                             "max_rows_per_rank; leave the option unset")
        self.num_permuted_tokens = opts.get("num_permuted_tokens", self.budget)
        self.tokens_per_rank = opts.get("tokens_per_rank")
        self.max_tokens_per_rank = opts.get("max_tokens_per_rank")
        # Budget mode: the shapes agreed at the first call (H, K, T_cap) and its dtype (that of
        # a host error's placeholder rows).
        self._shape: Optional[BudgetShape] = None
        self._dtype: Optional[torch.dtype] = None
        pad = config.pad_multiple
        if self.num_permuted_tokens is not None and pad and self.num_permuted_tokens % pad:
            raise ValueError(f"hybridep: num_permuted_tokens={self.num_permuted_tokens} must be a "
                             f"multiple of pad_multiple={pad}")
        if self.tokens_per_rank is not None and self.num_permuted_tokens is None:
            raise ValueError("hybridep: tokens_per_rank (no validation exchange) requires "
                             "num_permuted_tokens (no host sync in HybridEP either)")
        self.settings = HybridSettings(
            num_local_experts=self.L,
            num_sms_dispatch_api=opts.get("num_sms_dispatch_api"),
            num_sms_combine_api=opts.get("num_sms_combine_api"),
            use_shared_buffer=opts.get("use_shared_buffer"))
        self.call = None
        if self.R > 1:
            if self.budget is not None and is_legacy_api(load_hybrid_ep_buffer_class()):
                raise ValueError(
                    "hybridep: the budget mode (max_rows_per_rank) needs the current hybrid-ep "
                    "API (non_blocking dispatch with its overflow guard); this "
                    "deep_ep.HybridEPBuffer is the older use_host_meta API, whose "
                    "num_permuted_tokens writes extra rows out of bounds and syncs the host: "
                    "upgrade hybrid-ep, or use backend 'deepep' / 'nvshmem' in the budget mode")
            self.call = HybridCall(manager_for(self.group), self.settings, pad,
                                   self.num_permuted_tokens)

    @classmethod
    def availability(cls) -> Optional[str]:
        return hybrid_reason() or cuda_reason()

    @staticmethod
    def overflowed(handle: HybridEPHandle) -> bool:
        """Whether the sync-free dispatch of ``handle`` dropped rows (one host sync)."""
        flag = handle.overflow_flag
        return bool(flag is not None and int(flag.reshape(-1)[0].item()) != 0)

    @classmethod
    def check_overflow(cls, handle: HybridEPHandle) -> None:
        if cls.overflowed(handle):
            raise RuntimeError(
                f"hybridep: more rows arrived than num_permuted_tokens={handle.num_rows} allows; "
                "results of this dispatch are incomplete: raise num_permuted_tokens")

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        if self.budget is not None:
            return self._dispatch_budget(x_TH, idx_TK, probs_TK, check)
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        if self.R == 1:
            agree(check, self.group, x_TH.device, [])
            plan = group_plan(idx_TK, self.L, None, self.cfg.pad_multiple)
            tokens, probs = permute(x_TH, probs_TK, plan)
            return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                                  probs, HybridEPHandle(None, plan, T, tokens.shape[0],
                                                        x_TH.dtype))
        align = token_align()
        if self.tokens_per_rank is not None:
            # Static shapes: no exchange. Host errors are raised here, on this rank alone.
            if check.host_error is not None:
                raise DispatchInputError(check.host_error)
            if T > self.tokens_per_rank:
                raise DispatchInputError(f"hybridep: {T} tokens exceed tokens_per_rank="
                                         f"{self.tokens_per_rank}")
            T_pad = round_up(max(self.tokens_per_rank, 1), align)
        else:
            rows = agree(check, self.group, comm.group_device(self.group), [H, T])
            require_equal(rows, 0, "hidden size")
            T_pad = round_up(max(max(r[1] for r in rows), 1), align)
        if self.max_tokens_per_rank:
            T_pad = max(T_pad, round_up(self.max_tokens_per_rank, align))
        if self.num_permuted_tokens is not None and self._legacy():
            raise RuntimeError(
                "hybridep: this deep_ep.HybridEPBuffer (older hybrid-ep API with use_host_meta) "
                "does not guard num_permuted_tokens (extra rows are written out of bounds) "
                "and syncs the host anyway: leave num_permuted_tokens unset or upgrade")
        tokens, probs, box = self._send(x_TH, idx_TK, probs_TK, T_pad)
        tpe = box.tokens_per_expert
        live_N = None
        if tpe.device.type == "cpu":
            tpe = tpe.to(torch.long).clone()  # pinned buffer of the library: own a copy
        elif self.num_permuted_tokens is None:
            tpe = tpe.to(torch.long).cpu()  # legacy API returns it on the GPU if nothing came
        else:
            tpe = tpe.to(torch.long)
        if self.num_permuted_tokens is not None:
            # Sync-free: the rows past the received ones are uninitialised; zero them.
            tpe = kept_counts(tpe, self.num_permuted_tokens)
            live_N = torch.arange(tokens.shape[0], device=tpe.device) < tpe.sum()
            tokens, probs = zero_unused_rows(tokens, probs, live_N.to(tokens.device))
        if tokens.dtype != x_TH.dtype:
            tokens = tokens.to(x_TH.dtype)
        handle = HybridEPHandle(box.handle, None, T, tokens.shape[0], x_TH.dtype,
                                overflow_flag(box.handle), box.routed_T, live_N)
        return DispatchResult(tokens, tpe, probs, handle)

    def _send(self, x_TH, idx_TK, probs_TK, T_pad: int):
        """HybridEP's dispatch of [T, H] tokens (T <= T_pad) as T_pad rows, the padding ones
        routed nowhere. Returns (tokens [N, H] wire dtype, probs [N] fp32, box)."""
        T, H = x_TH.shape
        H_pad = round_up(H, HIDDEN_ALIGN)
        map_TE, probs_TE = topk_to_dense(idx_TK, probs_TK.float(), self.E)
        x_b = x_TH.to(WIRE_DTYPE)
        if H_pad > H:
            x_b = torch.nn.functional.pad(x_b, (0, H_pad - H))
        if T_pad > T:
            # Unrouted padding rows: equal blocks for HybridEP's all-gather, sent nowhere.
            x_b = torch.cat([x_b, x_b.new_zeros(T_pad - T, H_pad)])
            map_TE = torch.cat([map_TE, map_TE.new_zeros(T_pad - T, self.E)])
            probs_TE = torch.cat([probs_TE, probs_TE.new_zeros(T_pad - T, self.E)])
        box = new_box()
        tokens, probs = HybridDispatch.apply(x_b.contiguous(), probs_TE.contiguous(),
                                             map_TE.contiguous(), self.call, box)
        if H_pad > H:
            tokens = tokens[:, :H].contiguous()
        return tokens, probs, box

    # ------------------------------------------------------------------ budget mode

    def _dispatch_budget(self, x_TH, idx_TK, probs_TK, check: PendingCheck) -> DispatchResult:
        """Exactly B expert-grouped rows, no host sync after the first call (module doc)."""
        if self._shape is None:
            self._agree_budget(x_TH, idx_TK, check)
        dev = comm.group_device(self.group) if self.R > 1 else x_TH.device
        inp = fit_input(self._shape, x_TH, idx_TK, probs_TK, check, self._dtype, dev)
        if self.R == 1:
            return self._local_budget(inp)
        bad, clipped = gather_flags(inp.code, inp.clipped, self.group)
        x, probs_TK = inp.x_TH, inp.probs_TK
        T_pad = round_up(max(self._shape.token_cap, 1), token_align())
        tokens, probs, box = self._send(x, inp.idx_TK, probs_TK, T_pad)
        tpe = kept_counts(box.tokens_per_expert, self.budget)
        live_N = torch.arange(self.budget, device=tpe.device) < tpe.sum()
        tokens, probs = zero_unused_rows(tokens, probs, live_N.to(tokens.device))
        flag = overflow_flag(box.handle)
        status = status_bits(flag.reshape(()) != 0, clipped, bad)
        # The caller's dtype (a host error's placeholder has the first call's).
        dtype = inp.x_TH.dtype
        handle = HybridEPHandle(box.handle, None, inp.x_TH.shape[0], self.budget, dtype,
                                flag, box.routed_T, live_N, status, inp.num_tokens)
        return DispatchResult(tokens.to(dtype), tpe, probs, handle, status, check=inp.check)

    def _agree_budget(self, x_TH, idx_TK, check: PendingCheck) -> None:
        """The budget mode's one host exchange (first call): H, K and the token cap on every
        rank; raises on every rank for bad input."""
        dev = comm.group_device(self.group) if self.R > 1 else x_TH.device
        cap = self.tokens_per_rank or self.max_tokens_per_rank
        self._shape = BudgetShape.agree(check, self.group, dev, *idx_TK.shape, x_TH.shape[1],
                                        cap)
        self._dtype = x_TH.dtype

    def _local_budget(self, inp: LocalInput) -> DispatchResult:
        """One rank: nothing to communicate, the budget plan on this rank's rows."""
        plan = budget_plan(inp.idx_TK, self.L, self.budget, self.cfg.pad_multiple)
        tokens, probs = permute(inp.x_TH, inp.probs_TK, plan)
        clipped = torch.full((), int(inp.clipped), device=inp.code.device)
        status = status_bits(plan.dropped, clipped, inp.code)
        dtype = inp.x_TH.dtype
        handle = HybridEPHandle(None, plan, inp.x_TH.shape[0], self.budget, dtype,
                                status=status, pad_to=inp.num_tokens)
        return DispatchResult(tokens.to(dtype), plan.tokens_per_expert_L, probs, handle, status,
                              check=inp.check)

    def _legacy(self) -> bool:
        buf = self.call.manager.buffer
        return is_legacy_api(buf if buf is not None else load_hybrid_ep_buffer_class())

    def combine(self, y_NH: torch.Tensor, handle: HybridEPHandle) -> torch.Tensor:
        if handle.plan is not None:
            return self._padded(unpermute(y_NH, handle.plan), handle)
        if y_NH.shape[0] != handle.num_rows:
            raise ValueError(f"combine: expert output has {y_NH.shape[0]} rows, dispatch produced "
                             f"{handle.num_rows}")
        y_b = y_NH.to(WIRE_DTYPE)
        H = y_b.shape[1]
        H_pad = round_up(H, HIDDEN_ALIGN)
        if H_pad > H:
            y_b = torch.nn.functional.pad(y_b, (0, H_pad - H))
        out = HybridCombine.apply(y_b, handle.lib_handle, self.call, handle.num_rows,
                                  handle.routed_T, handle.live_N)
        out = out[:handle.num_tokens]
        if H_pad > H:
            out = out[:, :H].contiguous()
        return self._padded(out, handle).to(handle.out_dtype)

    @staticmethod
    def _padded(out_TH: torch.Tensor, handle: HybridEPHandle) -> torch.Tensor:
        """Budget mode: zero rows for the caller's tokens past those sent (token cap)."""
        return out_TH if handle.pad_to is None else pad_rows(out_TH, handle.pad_to)

    def free_buffer(self) -> None:
        if self.call is not None:
            self.call.manager.reset()
