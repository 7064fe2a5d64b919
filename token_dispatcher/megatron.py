"""Megatron-Core drop-in: a token dispatcher for Megatron's ``MoELayer`` backed by moe_dispatch.

Megatron-Core's ``MoELayer`` builds its dispatcher with a hard-coded if/elif over
``config.moe_token_dispatcher_type``, so a new type name cannot be added from outside.
Two ways in, both one call:

* ``use_moe_dispatch(model, backend="deepep")`` swaps the dispatcher of every ``MoELayer``
  already built inside ``model`` (no spec change, works with any model builder);
* ``with build_with_moe_dispatch(backend="deepep"): model = build_model()`` makes every
  ``MoELayer`` constructed inside the block build ours directly (Megatron's own dispatcher
  is never created, so e.g. no DeepEP buffer is allocated for it).

The backend is, in order: the ``backend`` argument; ``config.moe_dispatch_backend`` when the
config carries it (``config.moe_dispatch_backend = "deepep"``); else the moe_dispatch backend
matching Megatron's own choice ('alltoall' -> alltoall, 'allgather' -> allgather,
'flex' + ``moe_flex_dispatcher_backend`` 'deepep' / 'hybridep' -> deepep / hybridep).

Semantics follow Megatron's ``MoEAlltoAllTokenDispatcher``: the six hooks take and return
the same shapes and dtypes; rows come out grouped by local expert (ascending), within an
expert in (source EP rank, token index) order; probs are returned, never applied;
combine sums each token's expert outputs. Capacity dropping (``moe_expert_capacity_factor``,
``moe_token_drop_policy``) happens in Megatron's router, as with Megatron's dispatchers;
``moe_pad_expert_input_to_capacity`` makes every (source rank, expert) pair carry exactly
``capacity`` rows (Megatron's rule: routed tokens first, then the lowest-index unrouted
tokens with their, normally zero, probs), so ``tokens_per_expert == capacity * EP``;
``moe_router_padding_for_quantization`` pads each local expert's rows to a multiple of the
FP8/FP4 alignment (16 or 32) with zero rows of prob 0 added after the exchange, so no
padding crosses the network. ``moe_permute_fusion`` needs nothing here: the backends
permute with their own kernels (no Transformer Engine). Not supported: expert tensor
parallelism (``expert_tensor_parallel_size > 1``) raises ``NotImplementedError``.

Zero-token ranks work forward and backward. Each dispatch stores per-call state on the
dispatcher between hooks, exactly as Megatron's dispatchers do (the hook API requires it);
all autograd flows through the hook arguments, so Megatron's EP-overlap schedule, which
detaches tensors between hooks, keeps a correct graph.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

try:
    from megatron.core import parallel_state as _parallel_state
    from megatron.core.transformer.moe import moe_layer as _moe_layer
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization
    from megatron.core.transformer.moe.moe_utils import get_capacity as _get_capacity
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import \
        MoETokenDispatcher as _MegatronTokenDispatcher
except ImportError as exc:  # pragma: no cover - exercised only without megatron-core
    raise ImportError("token_dispatcher.megatron needs megatron-core: "
                      "pip install 'moe-dispatch[megatron]'") from exc

from .dispatcher import MoETokenDispatcher

__all__ = ["MoEDispatchTokenDispatcher", "use_moe_dispatch", "build_with_moe_dispatch",
           "resolve_backend", "backend_options_from_config"]

# Megatron's own choice -> the moe_dispatch backend doing the same job.
_FLEX_BACKENDS = {"deepep": "deepep", "hybridep": "hybridep"}


def resolve_backend(config, backend: Optional[str] = None) -> str:
    """The moe_dispatch backend name for ``config``.

    backend: explicit name (wins). Otherwise ``config.moe_dispatch_backend`` if set, else the
             backend matching ``config.moe_token_dispatcher_type`` (and, for 'flex',
             ``config.moe_flex_dispatcher_backend``).
    """
    if backend:
        return backend
    chosen = getattr(config, "moe_dispatch_backend", None)
    if chosen:
        return chosen
    kind = getattr(config, "moe_token_dispatcher_type", "alltoall")
    if kind in ("alltoall", "allgather"):
        return kind
    if kind == "flex":
        flex = getattr(config, "moe_flex_dispatcher_backend", "deepep")
        if flex in _FLEX_BACKENDS:
            return _FLEX_BACKENDS[flex]
        raise ValueError(f"moe_flex_dispatcher_backend={flex!r} has no moe_dispatch "
                         f"counterpart; pass backend=... (one of "
                         f"'alltoall', 'allgather', 'deepep', 'hybridep', 'uccl', 'nvshmem')")
    raise ValueError(f"moe_token_dispatcher_type={kind!r} has no moe_dispatch counterpart; "
                     "pass backend=... or set config.moe_dispatch_backend")


def backend_options_from_config(config, backend: str) -> dict:
    """Backend knobs that Megatron's config carries: the SM budget of the fused backends,
    from ``moe_flex_dispatcher_num_sms`` (megatron-core >= 0.17) or the older per-library
    ``moe_deepep_num_sms`` / ``moe_hybridep_num_sms``."""
    n = getattr(config, "moe_flex_dispatcher_num_sms", None)
    if backend in ("deepep", "uccl"):
        n = n if n is not None else getattr(config, "moe_deepep_num_sms", None)
        return {} if n is None else {"num_sms": int(n)}
    if backend == "hybridep":
        n = n if n is not None else getattr(config, "moe_hybridep_num_sms", None)
        return {} if n is None else {"num_sms_dispatch_api": int(n),
                                     "num_sms_combine_api": int(n)}
    return {}


def _default_pg_collection():
    """Megatron's process groups when parallel_state is set up; else WORLD as the EP group
    (or a single process when torch.distributed is not initialized)."""
    if _parallel_state.model_parallel_is_initialized():
        return get_default_pg_collection()
    world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return SimpleNamespace(ep=world, expt_tp=None, tp_ep=world)


class _CommState:
    """Stand-in for the flex dispatcher's ``_comm_manager``: Megatron's EP-overlap schedule
    assigns ``token_probs`` / ``dispatched_probs`` on it. Our hooks read their arguments,
    so these are informational only."""

    def __init__(self):
        self.token_probs: Optional[torch.Tensor] = None
        self.dispatched_probs: Optional[torch.Tensor] = None
        self.tokens_per_expert: Optional[torch.Tensor] = None

    def get_number_of_tokens_per_expert(self) -> Optional[torch.Tensor]:
        return self.tokens_per_expert


class MoEDispatchTokenDispatcher(_MegatronTokenDispatcher):
    """Megatron-Core token dispatcher running on a moe_dispatch backend.

    Args:
        num_local_experts:    L, experts on this EP rank (= num_moe_experts // EP).
        local_expert_indices: the L global ids of this rank's experts; must be contiguous,
                              starting at ep_rank * L (Megatron's layout).
        config:               Megatron ``TransformerConfig``. Read: ``num_moe_experts``,
                              ``moe_router_topk``, ``moe_expert_capacity_factor``,
                              ``moe_pad_expert_input_to_capacity``,
                              ``moe_router_padding_for_quantization`` (+ ``fp8``/``fp4``
                              recipe for the alignment), ``moe_flex_dispatcher_num_sms``
                              (or ``moe_deepep_num_sms`` / ``moe_hybridep_num_sms``),
                              ``moe_shared_expert_overlap``, the backend fields (see
                              ``resolve_backend``).
        pg_collection:        Megatron ``ProcessGroupCollection`` (uses ``ep``, ``expt_tp``,
                              ``tp_ep``); None = Megatron's default groups, or WORLD / a single
                              process when Megatron's parallel state is not initialized.
        backend:              moe_dispatch backend name; overrides the config.
        backend_options:      backend-specific knobs passed through to the backend (merged
                              over ``backend_options_from_config(config, backend)``).
    """

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config,
                 pg_collection=None, *, backend: Optional[str] = None,
                 backend_options: Optional[dict] = None) -> None:
        if pg_collection is None:
            pg_collection = _default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        if config.num_moe_experts is None:
            raise ValueError("config.num_moe_experts must be set for an MoE token dispatcher")
        self.num_experts = int(config.num_moe_experts)
        self.num_local_experts = int(num_local_experts)
        self.local_expert_indices = list(local_expert_indices)
        if self.tp_size > 1:
            raise NotImplementedError(
                f"expert tensor parallelism (expert_tensor_parallel_size={self.tp_size}) is not "
                "supported by moe_dispatch's Megatron dispatcher; use "
                "expert_tensor_parallel_size=1 (attention TP and sequence parallelism are fine)")
        ep_rank = dist.get_rank(self.ep_group) if self.ep_size > 1 else 0
        if self.num_experts % self.ep_size or \
                self.num_local_experts != self.num_experts // self.ep_size:
            raise ValueError(f"num_local_experts={num_local_experts} does not match "
                             f"num_moe_experts={self.num_experts} over EP={self.ep_size}")
        expected = list(range(ep_rank * self.num_local_experts,
                              (ep_rank + 1) * self.num_local_experts))
        if self.local_expert_indices != expected:
            raise ValueError(f"local_expert_indices must be {expected} on EP rank {ep_rank} "
                             f"(contiguous, rank-major), got {self.local_expert_indices}")
        self.router_topk = int(config.moe_router_topk)
        self.drop_and_pad = bool(config.moe_pad_expert_input_to_capacity)
        if self.drop_and_pad and config.moe_expert_capacity_factor is None:
            raise ValueError("moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor")
        # Alignment 0 (megatron-core >= 0.19 without fp8/fp4) means no padding.
        self.pad_multiple = (get_align_size_for_quantization(config) or None
                             if config.moe_router_padding_for_quantization else None)
        self.backend = resolve_backend(config, backend)
        options = {**backend_options_from_config(config, self.backend), **(backend_options or {})}
        # With pad-to-capacity a token may be routed to every expert; otherwise at most top-k.
        max_slots = self.num_experts if self.drop_and_pad else self.router_topk
        self.dispatcher = MoETokenDispatcher(
            self.num_experts, ep_group=self.ep_group, backend=self.backend,
            pad_multiple=self.pad_multiple, topk=max_slots, backend_options=options)

        # Per-call state between hooks (Megatron's hook API is stateful by design).
        self.hidden_shape = None
        self.routing_map: Optional[torch.Tensor] = None
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.capacity: Optional[int] = None
        self._probs_dtype: Optional[torch.dtype] = None
        self._handle = None
        self._comm_manager = _CommState()
        # Only the routing map is produced before the communication: with a CUDA graph over
        # Megatron's "moe_preprocess" scope it is the one tensor to hand across.
        self.cudagraph_attrs = ["routing_map"]

    # ---------------------------------------------------------------- Megatron extras
    def set_shared_experts(self, shared_experts) -> None:
        """Overlap the shared expert with dispatch/combine (``moe_shared_expert_overlap``);
        runs it at the same points as Megatron's alltoall dispatcher."""
        super().set_shared_experts(shared_experts)
        if getattr(shared_experts, "use_shared_expert_gate", False):
            self.cudagraph_attrs.append("shared_experts.gate_score")
        self.cudagraph_attrs.append("shared_experts.cached_fc1_input")

    def get_expert_zero_copy_buffers(self):
        """``(output_buffer, grad_input_buffer)`` for experts to write into: none here."""
        return None, None

    # ---------------------------------------------------------------- the six hooks
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """Local work only.

        hidden_states: [S, B, H] (or [T, H]) hidden states.
        routing_map:   [T, E] bool, True where token t goes to expert e (T = S * B).
        probs:         [T, E] router probs (fp32 / fp64 / the hidden dtype per
                       ``moe_router_dtype``); only entries where routed are used.
        Returns (hidden [T, H], probs [T, E]), the inputs of ``token_dispatch``.
        """
        if probs.dim() != 2 or routing_map.dim() != 2 or routing_map.dtype != torch.bool:
            raise ValueError(f"dispatch_preprocess: routing_map must be [T, E] bool and probs "
                             f"[T, E]; got {routing_map.dtype} {tuple(routing_map.shape)} and "
                             f"{tuple(probs.shape)}")
        self.hidden_shape = hidden_states.shape
        hidden_TH = hidden_states.reshape(-1, self.hidden_shape[-1])
        if self.drop_and_pad:
            routing_map = self._pad_map_to_capacity(routing_map)
        self.routing_map = routing_map
        self._probs_dtype = probs.dtype
        self._comm_manager.token_probs = probs
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states)
        return hidden_TH, probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """The communication: [T, H], [T, E] -> (rows [N, H] grouped by local expert,
        row probs [N] float32). Gradients flow to both arguments."""
        out = self.dispatcher.dispatch(hidden_states, routing_map=self.routing_map, probs=probs)
        self._handle = out.handle
        self.tokens_per_expert = out.tokens_per_expert
        self._comm_manager.tokens_per_expert = out.tokens_per_expert
        self._comm_manager.dispatched_probs = out.probs
        return out.tokens, out.probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Returns (permuted_tokens [N, H], tokens_per_expert [L] int64, permuted_probs [N])
        with permuted_probs in the router's probs dtype, as Megatron's alltoall returns."""
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(hidden_states)
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        if self._probs_dtype is not None and probs.dtype != self._probs_dtype:
            probs = probs.to(self._probs_dtype)
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert output [N, H] in dispatch order; nothing local to do before the exchange
        (the backend un-permutes as part of combine)."""
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The communication: [N, H] -> [T, H], each token the sum of its experts' rows."""
        if self._handle is None:
            raise RuntimeError("token_combine called without a matching token_dispatch")
        handle, self._handle = self._handle, None
        return self.dispatcher.combine(hidden_states, handle)

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, H] -> the shape ``dispatch_preprocess`` received (plus the shared expert's
        output when it is overlapped here)."""
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(hidden_states)
            self.shared_experts.post_forward_comm()
        output = hidden_states.view(self.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        self.routing_map = None
        return output

    # ---------------------------------------------------------------- helpers
    def _pad_map_to_capacity(self, routing_map_TE: torch.Tensor) -> torch.Tensor:
        """Exactly ``capacity`` True per expert column, Megatron's drop-and-pad rule: the
        routed tokens first (lowest index first, overflow dropped), then the lowest-index
        unrouted tokens as padding. No host sync."""
        T, E = routing_map_TE.shape
        self.capacity = _get_capacity(num_tokens=T * self.router_topk, num_experts=E,
                                      capacity_factor=self.config.moe_expert_capacity_factor)
        cap = min(self.capacity, T)
        order_ET = routing_map_TE.to(torch.int8).t().argsort(dim=1, descending=True,
                                                            stable=True)
        keep_ET = torch.zeros(E, T, dtype=torch.bool, device=routing_map_TE.device)
        keep_ET.scatter_(1, order_ET[:, :cap], True)
        return keep_ET.t()


# ------------------------------------------------------------------ installers
def _moe_layers(model) -> Iterator:
    """Every BaseMoELayer in a module, or in a list of modules (Megatron's model chunks)."""
    if isinstance(model, torch.nn.Module):
        yield from (m for m in model.modules() if isinstance(m, _moe_layer.BaseMoELayer))
    else:
        for chunk in model:
            yield from _moe_layers(chunk)


def use_moe_dispatch(model, backend: Optional[str] = None,
                     backend_options: Optional[dict] = None) -> int:
    """Replace ``token_dispatcher`` of every Megatron-Core ``MoELayer`` in ``model``.

    model:           an ``nn.Module`` (a GPT model or a single ``MoELayer``) or a list of
                     them (Megatron's model chunks); every ``BaseMoELayer`` found is switched.
    backend:         moe_dispatch backend name; None = ``resolve_backend(layer.config)``.
    backend_options: backend-specific knobs (see ``MoEDispatchTokenDispatcher``).
    Returns the number of layers switched (0 on a pipeline stage without MoE layers).
    Process groups and the shared-expert overlap are taken over from the replaced
    dispatcher. Call it after building the model, before the first forward.
    """
    count = 0
    for layer in _moe_layers(model):
        old = layer.token_dispatcher
        groups = SimpleNamespace(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
        new = MoEDispatchTokenDispatcher(layer.num_local_experts, layer.local_expert_indices,
                                         layer.config, groups, backend=backend,
                                         backend_options=backend_options)
        if old.shared_experts is not None:
            new.set_shared_experts(old.shared_experts)
        layer.token_dispatcher = new
        if getattr(layer, "_training_token_dispatcher", None) is old:  # megatron-core >= 0.19
            layer._training_token_dispatcher = new
        count += 1
    return count


_DISPATCHER_NAMES = ("MoEAllGatherTokenDispatcher", "MoEAlltoAllTokenDispatcher",
                     "MoEFlexTokenDispatcher")


@contextlib.contextmanager
def build_with_moe_dispatch(backend: Optional[str] = None,
                            backend_options: Optional[dict] = None):
    """Inside the block, every ``MoELayer`` that Megatron-Core builds gets a
    ``MoEDispatchTokenDispatcher`` instead of its own (whatever
    ``moe_token_dispatcher_type`` says; the backend follows ``resolve_backend``).

    backend, backend_options: as for ``use_moe_dispatch``.
    Not thread-safe: it swaps the three dispatcher names that ``moe_layer`` looks up.
    """

    def build(num_local_experts, local_expert_indices, config, pg_collection=None):
        return MoEDispatchTokenDispatcher(num_local_experts, local_expert_indices, config,
                                          pg_collection, backend=backend,
                                          backend_options=backend_options)

    saved = {name: getattr(_moe_layer, name) for name in _DISPATCHER_NAMES}
    try:
        for name in _DISPATCHER_NAMES:
            setattr(_moe_layer, name, build)
        yield
    finally:
        for name, cls in saved.items():
            setattr(_moe_layer, name, cls)
