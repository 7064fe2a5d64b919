"""The dispatch backend over a DeepEP-V1-compatible ``Buffer`` (normal / high-throughput mode).

``deepep`` (``deep_ep.Buffer``) and ``uccl`` (UCCL-EP's ``Buffer``) differ only in where
the ``Buffer`` class comes from and how it is constructed; both subclass ``V1Backend``.

Per dispatch:
  1. ``agree``: one tiny all-gather settles input validation on every rank and checks that
     H and K agree (a zero-token rank's narrower K is widened with masked slots).
  2. DeepEP layout + dispatch: each token goes once to every rank holding one of its
     experts, with its top-k ids (local ids there, -1 elsewhere) and fp32 probs. The CPU
     waits for the received counts inside DeepEP (its one host sync).
  3. Local permutation into expert-grouped rows with ``moe_dispatch.permute.group_plan``,
     using DeepEP's per-expert counts, so no further sync.
Combine: sum each received token's expert rows locally (``unpermute``), then DeepEP's
combine sums over ranks. Backward of dispatch is combine (grads to hidden and to probs);
backward of combine is a dispatch that reuses the cached layout in the handle.

Precision: V1 combine kernels reduce BF16 only, so rows travel as BF16; FP32/FP16 inputs are
cast at the boundary and results cast back (BF16 precision). With one rank there is
nothing to communicate: rows are permuted locally and no Buffer is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import comm
from .ep_common import agree, cuda_reason, pad_topk, require_equal
from .permute import GroupPlan, group_plan, permute, unpermute
from .protocol import BackendConfig, DispatchResult, PendingCheck
from .v1_buffer import (V1Comm, V1Combine, V1Dispatch, V1Library, check_group_size,
                        configs_for, manager_for, new_box)

WIRE_DTYPE = torch.bfloat16


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


_OPTIONS = {"num_sms", "async_finish", "allocate_on_comm_stream", "buffer_module"}


class V1Backend:
    """Base of the ``deepep`` and ``uccl`` backends.

    backend_options:
      num_sms (int, even):   SMs of the normal-mode kernels (default: the library's class-wide
                             ``Buffer.num_sms``, 20 in DeepEP; ``set_deepep_num_sms`` changes it).
      async_finish (bool):   run DeepEP's kernels after an event of the current stream
                             instead of the stream itself; the result is still waited for
                             before it is returned (as Megatron-Core does).
      allocate_on_comm_stream (bool): let DeepEP allocate outputs on its communication
                             stream (requires async_finish).
    """

    name = "v1"
    library: Optional[V1Library] = None
    # Rows travel in this dtype whatever the input's (DeepEP V1 combines BF16 only).
    wire_dtype = WIRE_DTYPE

    def __init__(self, config: BackendConfig):
        opts = dict(config.options or {})
        unknown = set(opts) - self._option_names()
        if unknown:
            raise ValueError(f"{self.name}: unknown backend_options {sorted(unknown)}; "
                             f"known: {sorted(self._option_names())}")
        self.cfg = config
        self.group = config.group
        self.R = comm.group_size(self.group)
        self.rank = comm.group_rank(self.group)
        self.E = config.num_experts
        self.L = self.E // self.R
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
        if self.R > 1:
            lib = self._library(opts)
            buffer_cls = lib.load()
            mgr = manager_for(lib, self.group, buffer_cls)
            check_group_size(self.R, mgr.rdma, lib.name)
            dcfg = ccfg = None
            if self.num_sms is not None:
                dcfg, ccfg = configs_for(buffer_cls, self.R, self.num_sms)
            self.link = V1Comm(mgr, self.E, dcfg, ccfg, self.async_finish,
                               self.allocate_on_comm_stream, self.num_sms)

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
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        dev = x_TH.device
        rows = agree(check, self.group, comm.group_device(self.group) if self.R > 1 else dev,
                     [H, K])
        require_equal(rows, 0, "hidden size")
        K = max(r[1] for r in rows)
        idx_TK, probs_TK = pad_topk(idx_TK, probs_TK, K)
        if self.R == 1:
            plan = group_plan(idx_TK, self.L, None, self.cfg.pad_multiple)
            tokens, probs = permute(x_TH, probs_TK, plan)
            return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                                  probs, V1Handle(None, plan, T, x_TH.dtype))
        if (H * WIRE_DTYPE.itemsize) % 16:
            raise ValueError(f"{self.name}: hidden size {H} must be a multiple of 8 (DeepEP moves "
                             "rows in 16-byte vectors)")
        x_b = x_TH.to(WIRE_DTYPE).contiguous()
        idx_b = idx_TK.contiguous()
        p_b = probs_TK.float().contiguous()
        if T == 0:
            # One masked row (sent nowhere) keeps the kernels away from empty launches.
            x_b = torch.cat([x_b, x_b.new_zeros(1, H)])
            idx_b = torch.cat([idx_b, idx_b.new_full((1, K), -1)])
            p_b = torch.cat([p_b, p_b.new_zeros(1, K)])
        box = new_box()
        recv_x, recv_p, recv_idx = V1Dispatch.apply(x_b, p_b, idx_b, self.link, box)
        plan = group_plan(recv_idx, self.L, box.counts, self.cfg.pad_multiple)
        tokens, probs = permute(recv_x, recv_p, plan)
        if tokens.dtype != x_TH.dtype:
            tokens = tokens.to(x_TH.dtype)
        return DispatchResult(tokens, torch.tensor(plan.tokens_per_expert, dtype=torch.long),
                              probs, V1Handle(box.handle, plan, T, x_TH.dtype))

    def combine(self, y_NH: torch.Tensor, handle: V1Handle) -> torch.Tensor:
        per_row = unpermute(y_NH, handle.plan)
        if handle.comm_handle is None:
            return per_row
        out = V1Combine.apply(per_row.to(WIRE_DTYPE), handle.comm_handle, self.link)
        if out.shape[0] != handle.num_tokens:
            out = out[:handle.num_tokens]
        return out.to(handle.out_dtype)
