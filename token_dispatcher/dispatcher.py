"""``MoETokenDispatcher``: the module users touch.

It validates router outputs, applies the capacity rule, hands the canonical top-k form
to the chosen backend and wraps the backend's handle so that combine can restore the
caller's shape. The backend is picked by name through the registry; there is no
fallback: a backend that cannot run raises with the reason.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moe_dispatch import comm, registry
from moe_dispatch.protocol import BackendConfig
from moe_dispatch.routing import apply_capacity, canonicalize

log = logging.getLogger("moe_dispatch")


@dataclass(frozen=True)
class DispatchHandle:
    """Backend handle plus the caller's input shape (combine restores it)."""

    backend_handle: Any
    input_shape: Tuple[int, ...]
    backend_name: str


@dataclass(frozen=True)
class DispatchOutput:
    """Result of ``MoETokenDispatcher.dispatch``.

    tokens:            [N, H] rows grouped by local expert, ascending expert id; within an
                       expert in global token order (source EP rank, then token index).
                       With ``pad_multiple`` each expert's block ends in zero rows.
    tokens_per_expert: [num_local_experts] int64 rows per local expert (padding included);
                       a CPU tensor for syncing backends.
    probs:             [N] float32 routing prob of each row. Not applied by the dispatcher.
    handle:            pass to ``combine``.
    status:            None, or (sync-free static-budget modes) a device int32 [1] tensor of
                       flag bits the backend documents, e.g. rows dropped over the budget.
    """

    tokens: torch.Tensor
    tokens_per_expert: torch.Tensor
    probs: torch.Tensor
    handle: DispatchHandle
    status: Optional[torch.Tensor] = None


class MoETokenDispatcher(nn.Module):
    """Moves tokens to the EP ranks owning their experts, grouped by local expert, and back.

    Args:
        num_experts:     E, global number of experts. Expert e lives on EP rank e // (E // R).
        ep_group:        the expert-parallel process group; None = the default (WORLD) group,
                         or a single process when torch.distributed is not initialized.
        backend:         a registry name ("alltoall", "allgather", "deepep", "hybridep",
                         "uccl", "nvshmem") or "auto" (chosen from what is available here;
                         the choice and why are logged).
        capacity_factor: if set, each expert keeps at most ceil(T * K / E * factor) slots of
                         each rank's T tokens; the lowest-prob overflow is dropped before
                         dispatch (see ``moe_dispatch.routing.apply_capacity``).
        pad_multiple:    if set, each local expert's rows are padded with zero rows (prob 0)
                         to a multiple of this; combine ignores them.
        capacity_policy: "probs" (drop lowest probs) or "position" (drop latest tokens).
        topk:            K for the dense routing form; None reads it from the map (a sync).
        backend_options: dict of backend-specific knobs, passed through untouched.
        check_inputs:    run the device-side value checks (expert ids, probs finite and
                         non-negative). Shape checks always run.
    """

    def __init__(self, num_experts: int, ep_group=None, backend: str = "alltoall",
                 capacity_factor: Optional[float] = None, pad_multiple: Optional[int] = None,
                 *, capacity_policy: str = "probs", topk: Optional[int] = None,
                 backend_options: Optional[dict] = None, check_inputs: bool = True):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__}")
        if capacity_factor is not None and not (capacity_factor > 0):
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
        if pad_multiple is not None and (not isinstance(pad_multiple, int) or pad_multiple < 1):
            raise ValueError(f"pad_multiple must be a positive int or None, got {pad_multiple!r}")
        if capacity_policy not in ("probs", "position"):
            raise ValueError(f"capacity_policy must be 'probs' or 'position', "
                             f"got {capacity_policy!r}")
        if ep_group is None and dist.is_available() and dist.is_initialized():
            ep_group = dist.group.WORLD
        self.ep_group = ep_group
        self.ep_size = comm.group_size(ep_group)
        self.ep_rank = comm.group_rank(ep_group)
        # Every rank checks the same things in the same order: a mismatch raises everywhere.
        requested = backend
        comm.check_same_across_ranks(
            [num_experts, zlib.crc32(requested.encode()), pad_multiple or 0,
             comm.optional_int(capacity_factor, 10 ** 6)],
            "num_experts / backend / pad_multiple / capacity_factor", ep_group)
        if num_experts % self.ep_size != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by the EP group size "
                             f"{self.ep_size}")
        if backend == "auto":
            from moe_dispatch.auto import choose_backend
            backend, why = choose_backend(ep_group, comm.group_device(ep_group))
            log.info("moe_dispatch: backend 'auto' chose %r: %s", backend, why)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.local_expert_offset = self.ep_rank * self.num_local_experts
        self.capacity_factor = capacity_factor
        self.capacity_policy = capacity_policy
        self.pad_multiple = pad_multiple
        self.topk = topk
        self.check_inputs = check_inputs
        self.backend_name = backend
        cls = registry.get_backend_class(backend)
        self.backend = cls(BackendConfig(group=ep_group, num_experts=num_experts,
                                         pad_multiple=pad_multiple,
                                         options=dict(backend_options or {})))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, backend={self.backend_name!r}, "
                f"ep_size={self.ep_size}, capacity_factor={self.capacity_factor}, "
                f"pad_multiple={self.pad_multiple}")

    def dispatch(self, hidden: torch.Tensor, *, topk_idx: Optional[torch.Tensor] = None,
                 topk_probs: Optional[torch.Tensor] = None,
                 routing_map: Optional[torch.Tensor] = None,
                 probs: Optional[torch.Tensor] = None) -> DispatchOutput:
        """Send tokens to their experts' ranks.

        hidden:      [T, H] or [S, B, H] floating hidden states (T = S * B may be 0).
        topk_idx:    [T, K] integer global expert ids, -1 = masked slot; with ``topk_probs``.
        topk_probs:  [T, K] floating routing probs (ignored where masked).
        routing_map: [T, E] bool, True where routed; with ``probs``.
        probs:       [T, E] floating probs, 0 where not routed.
        Exactly one of the two forms. Invalid input raises ``ValueError`` on every rank.
        """
        x_TH, idx_TK, probs_TK, check = canonicalize(
            hidden, self.num_experts, topk_idx=topk_idx, topk_probs=topk_probs,
            routing_map=routing_map, probs=probs, topk=self.topk,
            check_values=self.check_inputs)
        if self.capacity_factor is not None and check.host_error is None:
            idx_TK, probs_TK = apply_capacity(idx_TK, probs_TK, self.num_experts,
                                              self.capacity_factor, self.capacity_policy)
        res = self.backend.dispatch(x_TH, idx_TK, probs_TK, check)
        handle = DispatchHandle(res.handle, tuple(hidden.shape), self.backend_name)
        return DispatchOutput(res.tokens_NH, res.tokens_per_expert_L, res.probs_N, handle,
                              getattr(res.handle, "status", None))

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Bring expert outputs home: [N, H] -> the shape ``hidden`` had, each token the plain
        sum of its rows."""
        if not isinstance(handle, DispatchHandle):
            raise TypeError("combine: handle must be the DispatchOutput.handle of a dispatch")
        if handle.backend_name != self.backend_name:
            raise ValueError(f"combine: handle comes from backend {handle.backend_name!r}, "
                             f"this dispatcher uses {self.backend_name!r}")
        if expert_output.dim() != 2:
            raise ValueError(f"combine: expert_output must be [N, H], got shape "
                             f"{tuple(expert_output.shape)}")
        y_TH = self.backend.combine(expert_output, handle.backend_handle)
        return y_TH.reshape(handle.input_shape[:-1] + (y_TH.shape[-1],))

    def forward(self, hidden: torch.Tensor, experts: Callable, **routing) -> torch.Tensor:
        """dispatch -> ``experts(tokens, tokens_per_expert, probs)`` -> combine."""
        out = self.dispatch(hidden, **routing)
        return self.combine(experts(out.tokens, out.tokens_per_expert, out.probs), out.handle)
