"""``MoETokenDispatcher``: the module users touch.

It validates router outputs, applies the capacity rule, hands the canonical top-k form
to the chosen backend and wraps the backend's handle so that combine can restore the
caller's shape. The backend is picked by name through the registry; there is no
fallback: a backend that cannot run raises with the reason.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moe_dispatch import comm, registry
from moe_dispatch.kernels import fp8
from moe_dispatch.protocol import STATUS_BITS, BackendConfig, check_wire_dtype, raise_on_status
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
    status:            None in the exact modes; in the budget mode (``max_rows_per_rank``) a
                       device int32 [1] tensor of ``moe_dispatch.protocol.STATUS_*`` bits:
                       nonzero when rows were dropped over the budget (on the rank that
                       dropped them) or some rank's input was invalid (on every rank).
                       Read it with ``MoETokenDispatcher.check_status`` (one host sync).
    check:             budget mode: the ``BudgetCheck`` that ``check_status`` raises from.
    fp8:               with ``wire_dtype=float8_e4m3fn``: the source of ``tokens_fp8`` and
                       ``scales`` (``moe_dispatch.backends.wire.Fp8Rows``); else None.

    With ``wire_dtype=float8_e4m3fn``, ``tokens`` are the dequantised rows (caller's dtype)
    and the quantised form is offered too, for experts that run FP8 grouped GEMMs:
    ``tokens_fp8`` [N, H] e4m3 (same rows and order; zeros on padding / unused rows) and
    ``scales`` [N, H / 128] float32 (0 there), one per 1x128 block, DeepEP's layout
    (``moe_dispatch.kernels.fp8.dequantize(tokens_fp8, scales, dtype)`` equals ``tokens``).
    Both are None without an FP8 wire, made on first access (one permute of the received
    bytes), and carry no gradient: route an FP8 expert's input gradient through ``tokens``.
    """

    tokens: torch.Tensor
    tokens_per_expert: torch.Tensor
    probs: torch.Tensor
    handle: DispatchHandle
    status: Optional[torch.Tensor] = None
    check: Any = None
    fp8: Any = None

    @property
    def tokens_fp8(self) -> Optional[torch.Tensor]:
        return None if self.fp8 is None else self.fp8.tokens_fp8

    @property
    def scales(self) -> Optional[torch.Tensor]:
        return None if self.fp8 is None else self.fp8.scales


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
        max_rows_per_rank: B, or None. Set: the sync-free budget mode. Every dispatch returns
                         exactly B rows (real rows first, grouped by local expert as in the
                         exact mode, then zero rows with prob 0), ``tokens_per_expert`` on the
                         device, and ``status``; nothing in dispatch or combine waits for the
                         host, so the step can be captured in a CUDA graph. Rows over B are
                         dropped and flagged in ``status`` (read it once per step: see
                         ``check_status``). A multiple of ``pad_multiple`` when both are set.
        wire_dtype:      None (default: rows travel in the input's dtype) or
                         ``torch.float8_e4m3fn``: dispatch quantises each token once (e4m3,
                         one float32 scale = amax / 448 per 1x128 block, DeepEP's layout),
                         moves the FP8 rows + scales, and the receiver dequantises in its
                         permute, so ``out.tokens`` keeps the input's dtype; ``out.tokens_fp8``
                         / ``out.scales`` give the quantised form. Combine and both backwards
                         stay in the input's dtype: the gradient to ``hidden`` passes the
                         quantiser straight through, the probs' gradient is exact. The hidden
                         size must be a multiple of 128 (else ``DispatchInputError`` on every
                         rank). Backends: ``alltoall`` and ``allgather``; the others refuse it
                         here ("auto" picks ``alltoall`` when its choice cannot). Error bound:
                         README, "FP8 on the wire".
    """

    def __init__(self, num_experts: int, ep_group=None, backend: str = "alltoall",
                 capacity_factor: Optional[float] = None, pad_multiple: Optional[int] = None,
                 *, capacity_policy: str = "probs", topk: Optional[int] = None,
                 backend_options: Optional[dict] = None, check_inputs: bool = True,
                 max_rows_per_rank: Optional[int] = None,
                 wire_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__}")
        if capacity_factor is not None and not (capacity_factor > 0):
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
        if pad_multiple is not None and (not isinstance(pad_multiple, int) or pad_multiple < 1):
            raise ValueError(f"pad_multiple must be a positive int or None, got {pad_multiple!r}")
        _check_budget(max_rows_per_rank, pad_multiple, backend_options)
        fp8.check_wire_dtype(wire_dtype)
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
             comm.optional_int(capacity_factor, 10 ** 6), -1 if max_rows_per_rank is None
             else max_rows_per_rank, zlib.crc32(str(wire_dtype).encode())],
            "num_experts / backend / pad_multiple / capacity_factor / max_rows_per_rank / "
            "wire_dtype", ep_group)
        if num_experts % self.ep_size != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by the EP group size "
                             f"{self.ep_size}")
        if backend == "auto":
            from moe_dispatch.auto import choose_backend
            backend, why = choose_backend(ep_group, comm.group_device(ep_group))
            if wire_dtype is not None and wire_dtype not in getattr(
                    registry.get_backend_class(backend), "supported_wire_dtypes", ()):
                backend, why = "alltoall", f"{why}; but wire_dtype={wire_dtype} needs a " \
                    "backend that moves FP8 rows: alltoall"
            log.info("moe_dispatch: backend 'auto' chose %r: %s", backend, why)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.local_expert_offset = self.ep_rank * self.num_local_experts
        self.capacity_factor = capacity_factor
        self.capacity_policy = capacity_policy
        self.pad_multiple = pad_multiple
        self.topk = topk
        self.check_inputs = check_inputs
        self.max_rows_per_rank = max_rows_per_rank
        self.wire_dtype = wire_dtype
        self._backends: dict = {}  # kept backends of other modes (set_max_rows_per_rank)
        self.backend_name = backend
        cls = registry.get_backend_class(backend)
        self.backend_config = BackendConfig(group=ep_group, num_experts=num_experts,
                                            pad_multiple=pad_multiple,
                                            options=dict(backend_options or {}),
                                            max_rows_per_rank=max_rows_per_rank,
                                            wire_dtype=wire_dtype)
        check_wire_dtype(self.backend_config, cls)  # out-of-tree backends too
        self.backend = cls(self.backend_config)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, backend={self.backend_name!r}, "
                f"ep_size={self.ep_size}, capacity_factor={self.capacity_factor}, "
                f"pad_multiple={self.pad_multiple}, "
                f"max_rows_per_rank={self.max_rows_per_rank}"
                + (f", wire_dtype={self.wire_dtype}" if self.wire_dtype is not None else ""))

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
        # A backend whose routing message reads the ids and probs before its one sync
        # checks them there (no launch of its own), unless capacity clipping must use the
        # ids first.
        x_TH, idx_TK, probs_TK, check = canonicalize(
            hidden, self.num_experts, topk_idx=topk_idx, topk_probs=topk_probs,
            routing_map=routing_map, probs=probs, topk=self.topk,
            check_values=self.check_inputs,
            check_in_message=self.capacity_factor is None and getattr(
                self.backend, "checks_in_message", False))
        if self.wire_dtype is not None and check.host_error is None and \
                fp8.hidden_error(x_TH.shape[1]):
            # A host error rides in the exchange every backend makes anyway: every rank raises.
            check = dataclasses.replace(check, host_error=fp8.hidden_error(x_TH.shape[1]))
        if self.capacity_factor is not None and check.host_error is None:
            idx_TK, probs_TK = apply_capacity(idx_TK, probs_TK, self.num_experts,
                                              self.capacity_factor, self.capacity_policy)
        res = self.backend.dispatch(x_TH, idx_TK, probs_TK, check)
        handle = DispatchHandle(res.handle, tuple(hidden.shape), self.backend_name)
        if self.max_rows_per_rank is not None and res.status is None:
            raise RuntimeError(f"backend {self.backend_name!r} returned no status in the budget "
                               "mode (a backend bug)")
        return DispatchOutput(res.tokens_NH, res.tokens_per_expert_L, res.probs_N, handle,
                              res.status, res.check, res.fp8)

    def set_max_rows_per_rank(self, budget: Optional[int]) -> None:
        """Switch between the exact mode (None) and the budget mode with B rows, e.g. to rerun
        an overflowed step exactly and then grow the budget. Every rank of the group must make
        the same call (the backend for each mode is built once, collectively, and kept)."""
        _check_budget(budget, self.pad_multiple, None)
        if budget == self.max_rows_per_rank:
            return
        self._backends[self.max_rows_per_rank] = self.backend
        backend = self._backends.get(budget)
        if backend is None:
            cls = registry.get_backend_class(self.backend_name)
            backend = cls(dataclasses.replace(self.backend_config, max_rows_per_rank=budget))
        self.backend, self.max_rows_per_rank = backend, budget

    def check_status(self, *outs: DispatchOutput, group=None) -> int:
        """Read budget-mode statuses once (one host sync) and act on them.

        outs:  the ``DispatchOutput`` s to read (e.g. every layer's of one step).
        group: also agree with the other ranks of this group (one small all-reduce), so that
               every rank sees every rank's overflow; None: this rank's view only (bad input
               is on every rank's status already).
        Returns the OR of the ``STATUS_*`` bits (0 = every row delivered). Raises
        ``DispatchInputError`` on every rank when some rank's input was invalid.
        """
        bits = read_status([o.status for o in outs if o.status is not None], group)
        raise_on_status(bits, [o.check for o in outs])
        return bits

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
        T = math.prod(handle.input_shape[:-1])
        if self.max_rows_per_rank is not None and y_TH.shape[0] < T:
            # Budget mode, this rank's input was bad (a host error): it took part with no
            # tokens and gets zeros back; its status says so and check_status raises.
            y_TH = torch.nn.functional.pad(y_TH, (0, 0, 0, T - y_TH.shape[0]))
        return y_TH.reshape(handle.input_shape[:-1] + (y_TH.shape[-1],))

    def forward(self, hidden: torch.Tensor, experts: Callable, **routing) -> torch.Tensor:
        """dispatch -> ``experts(tokens, tokens_per_expert, probs)`` -> combine."""
        out = self.dispatch(hidden, **routing)
        return self.combine(experts(out.tokens, out.tokens_per_expert, out.probs), out.handle)


def read_status(statuses, group=None) -> int:
    """The OR of budget-mode ``status`` tensors ([1] int32 each) as a host int: one host sync.

    statuses: device tensors to fold (e.g. every MoE layer's of one step).
    group:    if given, OR across the ranks of this group too (bits are spread to 0/1 and
              max-reduced, since NCCL has no bitwise reduction).
    """
    if not statuses and group is None:
        return 0
    dev = statuses[0].device if statuses else comm.group_device(group)
    bits_B = torch.tensor(STATUS_BITS, dtype=torch.int32, device=dev)
    if statuses:
        folded = torch.stack([s.reshape(-1)[0].to(torch.int32) for s in statuses])
        on_B = ((folded.view(-1, 1) & bits_B.view(1, -1)) != 0).any(0).to(torch.int32)
    else:
        on_B = torch.zeros(len(STATUS_BITS), dtype=torch.int32, device=dev)
    if group is not None and comm.group_size(group) > 1:
        dist.all_reduce(on_B, op=dist.ReduceOp.MAX, group=group)
    return int((on_B * bits_B).sum().item())


def _check_budget(budget, pad_multiple, backend_options) -> None:
    if budget is None:
        if backend_options and "max_rows_per_rank" in backend_options:
            raise ValueError("max_rows_per_rank is a MoETokenDispatcher argument "
                             "(MoETokenDispatcher(..., max_rows_per_rank=B)), not a "
                             "backend option")
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_rows_per_rank must be a positive int or None, got {budget!r}")
    if pad_multiple and budget % pad_multiple:
        raise ValueError(f"max_rows_per_rank={budget} must be a multiple of "
                         f"pad_multiple={pad_multiple}")
    if backend_options and "max_rows_per_rank" in backend_options:
        raise ValueError("max_rows_per_rank given twice (argument and backend option)")
