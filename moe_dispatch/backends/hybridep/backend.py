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
      Dispatch then returns exactly that many rows (those past sum(tokens_per_expert) are
      junk that combine ignores), ``tokens_per_expert`` stays on the GPU and HybridEP does
      not synchronize the host. If more rows arrive than allowed, the handle's
      ``overflow_flag`` is set: check it with ``HybridEPBackend.overflowed(handle)`` or
      ``check_overflow(handle)`` (each a host sync, when you choose). With
      ``pad_multiple`` it must be a multiple of it. Current hybrid-ep API only: older
      commits (use_host_meta API) have no overflow guard, so it is refused there.
  tokens_per_rank (int): static token count promised by every rank (requires
      ``num_permuted_tokens``). The validation exchange is then skipped, so dispatch has no
      host sync at all; input checks are local only (a bad rank raises alone), so use it
      for fixed shapes (CUDA graphs) with a dispatcher built with ``check_inputs=False``.
  use_shared_buffer (bool): let dispatch and combine share memory (library default True).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ... import comm
from ..common import agree, cuda_reason, require_equal, round_up
from .buffer import (HybridCall, HybridCombine, HybridDispatch, HybridSettings,
                             hybrid_reason, is_legacy_api, load_hybrid_ep_buffer_class,
                             manager_for, new_box, overflow_flag)
from ...permute import GroupPlan, group_plan, permute, unpermute
from ...protocol import BackendConfig, DispatchInputError, DispatchResult, PendingCheck
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
    """

    lib_handle: Any
    plan: Optional[GroupPlan]
    num_tokens: int
    num_rows: int
    out_dtype: torch.dtype
    overflow_flag: Optional[torch.Tensor] = None
    routed_T: Optional[torch.Tensor] = None


class HybridEPBackend(comm.CollectiveBackendBase):
    name = "hybridep"
    # Rows travel as BF16 (HybridEP's dispatch/combine kernels), whatever the input's dtype.
    wire_dtype = torch.bfloat16

    def __init__(self, config: BackendConfig):
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
        self.num_permuted_tokens = opts.get("num_permuted_tokens")
        self.tokens_per_rank = opts.get("tokens_per_rank")
        self.max_tokens_per_rank = opts.get("max_tokens_per_rank")
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
        map_TE = map_TE.contiguous()
        box = new_box()
        tokens, probs = HybridDispatch.apply(x_b.contiguous(), probs_TE.contiguous(),
                                             map_TE, self.call, box)
        tpe = box.tokens_per_expert
        if tpe.device.type == "cpu":
            tpe = tpe.to(torch.long).clone()  # pinned buffer of the library: own a copy
        elif self.num_permuted_tokens is None:
            tpe = tpe.to(torch.long).cpu()  # legacy API returns it on the GPU if nothing came
        else:
            tpe = tpe.to(torch.long)
        if H_pad > H:
            tokens = tokens[:, :H].contiguous()
        if tokens.dtype != x_TH.dtype:
            tokens = tokens.to(x_TH.dtype)
        handle = HybridEPHandle(box.handle, None, T, tokens.shape[0], x_TH.dtype,
                                overflow_flag(box.handle), box.routed_T)
        return DispatchResult(tokens, tpe, probs, handle)

    def _legacy(self) -> bool:
        buf = self.call.manager.buffer
        return is_legacy_api(buf if buf is not None else load_hybrid_ep_buffer_class())

    def combine(self, y_NH: torch.Tensor, handle: HybridEPHandle) -> torch.Tensor:
        if handle.plan is not None:
            return unpermute(y_NH, handle.plan)
        if y_NH.shape[0] != handle.num_rows:
            raise ValueError(f"combine: expert output has {y_NH.shape[0]} rows, dispatch produced "
                             f"{handle.num_rows}")
        y_b = y_NH.to(WIRE_DTYPE)
        H = y_b.shape[1]
        H_pad = round_up(H, HIDDEN_ALIGN)
        if H_pad > H:
            y_b = torch.nn.functional.pad(y_b, (0, H_pad - H))
        out = HybridCombine.apply(y_b, handle.lib_handle, self.call, handle.num_rows,
                                  handle.routed_T)
        out = out[:handle.num_tokens]
        if H_pad > H:
            out = out[:, :H].contiguous()
        return out.to(handle.out_dtype)

    def free_buffer(self) -> None:
        if self.call is not None:
            self.call.manager.reset()
