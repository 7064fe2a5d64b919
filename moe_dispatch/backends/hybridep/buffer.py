"""HybridEP buffers (DeepEP branch ``hybrid-ep``, ``deep_ep.HybridEPBuffer``): one owner per
process group, plus the version-tolerant calls and autograd Functions that the
``hybridep`` backend and ``moe_dispatch.fused_a2a`` share.

HybridEP fuses the local permutation into the communication: ``dispatch_with_permute``
takes a dense routing map [T, E] and returns rows already grouped by local expert (each
expert's block padded to ``pad_multiple``); ``combine_with_unpermute`` is its inverse.
The buffer is sized for a maximum token count per rank; a larger request reallocates it
inside the library (logged here). With ``num_permuted_tokens`` given, dispatch runs
without a host sync (``non_blocking``): counts stay on the GPU and an overflow flag in the
handle reports whether more rows arrived than were allowed for.

Library facts this module relies on (hybrid-ep branch, 2026): every rank must pass the
same token count (the routing maps are all-gathered as equal blocks), hidden rows are
2-byte (BF16) and probs FP32. Within a local expert, rows come in global token order
(source rank, then token), as the metadata scan numbers received tokens that way.
Combine's output is allocated uninitialised and only tokens routed somewhere are written:
rows (and combined-prob rows) of unrouted tokens are garbage, so callers that need zeros
must mask them (``HybridDispatch`` / ``HybridCombine`` do, given the routed mask).

In the head's sync-free dispatch (``non_blocking``), rows past ``num_permuted_tokens`` are
dropped and the overflow flag is set only by its fused permute (``fuse_permute_dispatch``,
which builds the preprocessing with HYBRID_EP_BUILD_TOKEN_DROP_ENABLE); its standalone
permute writes them out of bounds and leaves the flag uninitialised, so the fused one is
asked for whenever the API has it. The output rows past the received ones are
uninitialised either way (``zero_unused_rows`` masks them).

Older commits (e.g. 2eec484, the "legacy" API here) differ: ``use_host_meta`` instead of
``non_blocking``; an 8-field handle without the overflow flag; ``num_permuted_tokens``
is not guarded (more arriving rows are written past the allocation) and dispatch still
reads the received-token count on the host; ``pad_multiple=None`` (0) divides by zero in
the permute preprocessing kernel (expert offsets come out wrong), so 1 is passed instead;
tokens_per_expert is int32 in pinned host memory, but on the GPU when nothing arrives.
Both versions JIT their kernels with the token count per rank as a template constant that
must be a multiple of the 128-token chunk, and only hidden sizes that are multiples of 512
are valid (``BufferConfig.is_valid``, not enforced by the library).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..common import import_optional

log = logging.getLogger("moe_dispatch")

HINT = ("install DeepEP's hybrid-ep branch (deepseek-ai/DeepEP, branch hybrid-ep: provides "
        "deep_ep.HybridEPBuffer), built from source for your GPU arch")


def load_hybrid_ep_buffer_class():
    """``deep_ep.HybridEPBuffer``; raises ``ImportError`` naming what to install."""
    mod = import_optional("deep_ep", HINT)
    cls = getattr(mod, "HybridEPBuffer", None)
    if cls is None:
        raise ImportError("deep_ep is installed but has no HybridEPBuffer (DeepEP V1 releases do "
                          "not ship it); " + HINT)
    return cls


def hybrid_reason() -> Optional[str]:
    try:
        load_hybrid_ep_buffer_class()
    except ImportError as exc:
        return str(exc)
    return None


def _params(fn) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def is_legacy_api(buffer) -> bool:
    """True for older hybrid-ep commits (``use_host_meta`` API, e.g. 2eec484): no overflow
    flag, unguarded ``num_permuted_tokens``, ``pad_multiple`` required (see module doc).
    ``buffer``: a HybridEPBuffer or the class."""
    params = _params(buffer.dispatch_with_permute)
    return "use_host_meta" in params and "non_blocking" not in params


@dataclass(frozen=True)
class HybridSettings:
    """What a HybridEP buffer is built for (fixed for its life).

    num_local_experts: L.  fp8_dispatch: FP8 rows on the wire (not supported by this
    adapter's callers yet).  num_sms_dispatch_api / num_sms_combine_api: SMs of the two
    kernels (None = library default).  use_shared_buffer: dispatch and combine share
    memory (library default True).
    """

    num_local_experts: int
    num_sms_dispatch_api: Optional[int] = None
    num_sms_combine_api: Optional[int] = None
    fp8_dispatch: bool = False
    use_shared_buffer: Optional[bool] = None


class HybridEPManager:
    """Owns the ``HybridEPBuffer`` of one process group.

    ``get(hidden_dim, num_tokens, settings)`` returns the buffer, building it on first use
    (collective). Later requests for more tokens or a larger hidden size are served by the
    library, which reallocates on the fly; each such growth is logged here. Settings must
    not change over the buffer's life (``reset()`` first): an error says so.
    """

    def __init__(self, group):
        self.group = group
        self.buffer = None
        self.settings: Optional[HybridSettings] = None
        self.max_tokens = 0
        self.max_hidden = 0
        self.growths = 0

    def init(self, hidden_dim: int, num_tokens: int, settings: HybridSettings):
        cls = load_hybrid_ep_buffer_class()
        accepted = _params(cls.__init__)
        kw: Dict[str, Any] = dict(group=self.group, hidden_dim=hidden_dim,
                                  max_num_of_tokens_per_rank=max(num_tokens, 1),
                                  num_local_experts=settings.num_local_experts,
                                  use_fp8=settings.fp8_dispatch)
        for name in ("num_sms_dispatch_api", "num_sms_combine_api", "use_shared_buffer"):
            val = getattr(settings, name)
            if val is not None and name in accepted:
                kw[name] = val
        self.buffer = cls(**kw)
        self.settings = settings
        self.max_tokens, self.max_hidden = num_tokens, hidden_dim
        _notify(self.buffer)
        return self.buffer

    def get(self, hidden_dim: int, num_tokens: int, settings: HybridSettings,
            strict: bool = True):
        """strict=False reuses an existing buffer whatever its SM settings (the seed API's
        behaviour after an explicit ``init_hybrid_ep_buffer``); the expert count must match."""
        if self.buffer is None:
            return self.init(hidden_dim, num_tokens, settings)
        mismatch = (settings.num_local_experts != self.settings.num_local_experts
                    if not strict else settings != self.settings)
        if mismatch:
            raise RuntimeError(
                f"HybridEP buffer of this group was built with {self.settings}, now asked for "
                f"{settings}; call reset_hybrid_ep_buffer() (on every rank) before changing them")
        if num_tokens > self.max_tokens or hidden_dim > self.max_hidden:
            self.growths += 1
            log.info("moe_dispatch: HybridEP buffer grows (reallocated by the library): tokens "
                     "per rank %d -> %d, hidden %d -> %d", self.max_tokens,
                     max(num_tokens, self.max_tokens), self.max_hidden,
                     max(hidden_dim, self.max_hidden))
            self.max_tokens = max(num_tokens, self.max_tokens)
            self.max_hidden = max(hidden_dim, self.max_hidden)
        return self.buffer

    def reset(self) -> None:
        self.buffer, self.settings = None, None
        self.max_tokens = self.max_hidden = 0
        _notify(None)


_MANAGERS: Dict[int, Tuple[Any, HybridEPManager]] = {}
_LISTENERS: List[Any] = []


def manager_for(group) -> HybridEPManager:
    g = group if group is not None else dist.group.WORLD
    hit = _MANAGERS.get(id(g))
    if hit is None:
        hit = _MANAGERS[id(g)] = (g, HybridEPManager(g))
    return hit[1]


def reset_all() -> None:
    for _, mgr in list(_MANAGERS.values()):
        mgr.reset()
    _MANAGERS.clear()


def add_listener(fn) -> None:
    _LISTENERS.append(fn)


def _notify(buffer) -> None:
    for fn in _LISTENERS:
        fn(buffer)


# --------------------------------------------------------------------------------------
# Version-tolerant calls


def dispatch_with_permute(buffer, x, routing_map, probs, num_local_experts: int, *,
                          pad_multiple: Optional[int] = None,
                          num_permuted_tokens: Optional[int] = None, handle=None):
    """Returns (tokens [N, H], probs [N] fp32 or None, scaling_factor, tokens_per_expert [L]
    int64 (pinned host, or device when ``num_permuted_tokens`` is given), handle)."""
    params = _params(buffer.dispatch_with_permute)
    legacy = "use_host_meta" in params and "non_blocking" not in params
    if legacy and not pad_multiple:
        # Legacy permute preprocessing computes ceil(n / pad) * pad unguarded: pad 0 divides
        # by zero. Padding to 1 is the identity.
        pad_multiple = 1
    kw: Dict[str, Any] = dict(hidden=x, scaling_factor=None, pad_multiple=pad_multiple,
                              num_permuted_tokens=num_permuted_tokens)
    if handle is None:
        # The library all-gathers the routing map, which NCCL requires contiguous.
        kw.update(routing_map=routing_map.contiguous(),
                  probs=None if probs is None else probs.contiguous(),
                  num_of_experts_per_rank=num_local_experts)
    else:
        kw["handle"] = handle
    sync_free = num_permuted_tokens is not None and handle is None
    if "non_blocking" in params:
        kw["non_blocking"] = sync_free
    elif "use_host_meta" in params:
        kw["use_host_meta"] = not sync_free
    if sync_free and "fuse_permute_dispatch" in params:
        # The hybrid-ep head (94a9f8f) drops rows past num_permuted_tokens and sets the
        # overflow flag only in its fused permute (HYBRID_EP_BUILD_TOKEN_DROP_ENABLE is
        # fuse_permute_dispatch && non_blocking); the standalone permute writes them out of
        # bounds and leaves the flag uninitialised.
        kw["fuse_permute_dispatch"] = True
    return buffer.dispatch_with_permute(**kw)


def combine_with_unpermute(buffer, x, handle, probs=None, *, pad_multiple: Optional[int] = None):
    """Returns (combined [T, H], combined_probs [T, E] fp32 or None). Rows of tokens routed
    nowhere are NOT written by the library (uninitialised memory)."""
    if not pad_multiple and is_legacy_api(buffer):
        pad_multiple = 1  # same value as its dispatch (see dispatch_with_permute)
    return buffer.combine_with_unpermute(hidden=x, probs=probs, handle=handle,
                                         pad_multiple=pad_multiple)


def overflow_flag(handle) -> Optional[torch.Tensor]:
    """The handle's overflow flag ([1] int32 on the GPU, nonzero when more rows arrived than
    ``num_permuted_tokens`` allowed), or None for library versions without it."""
    if isinstance(handle, tuple) and len(handle) >= 11:
        return handle[10]
    return None


# --------------------------------------------------------------------------------------
# Autograd


@dataclass(frozen=True)
class HybridCall:
    """Fixed arguments of one backend's HybridEP calls.

    manager: owner of the group's buffer.  settings: buffer settings.  pad_multiple: expert
    block alignment (None = none).  num_permuted_tokens: rows to allocate for the sync-free
    path (None = sync and size exactly).
    """

    manager: HybridEPManager
    settings: HybridSettings
    pad_multiple: Optional[int] = None
    num_permuted_tokens: Optional[int] = None


class _Box:
    __slots__ = ("tokens_per_expert", "handle", "routed_T")


def new_box() -> _Box:
    return _Box()


class HybridDispatch(torch.autograd.Function):
    """(x_TH bf16, probs_TE fp32, routing_map_TE bool) -> (tokens_NH, probs_N).
    Backward: combine_with_unpermute of the row grads and prob grads; rows of tokens routed
    nowhere (which the library leaves unwritten) get zero grads."""

    @staticmethod
    def forward(ctx, x_TH, probs_TE, map_TE, call: HybridCall, box: _Box):
        ctx.routed_T = box.routed_T = map_TE.any(dim=1)
        buf = call.manager.get(x_TH.shape[1], x_TH.shape[0], call.settings)
        tokens, probs, _scale, tpe, handle = dispatch_with_permute(
            buf, x_TH, map_TE, probs_TE, call.settings.num_local_experts,
            pad_multiple=call.pad_multiple, num_permuted_tokens=call.num_permuted_tokens)
        box.tokens_per_expert, box.handle = tpe, handle
        ctx.call, ctx.handle = call, handle
        ctx.meta = (tokens.shape, tokens.dtype, tokens.device, probs_TE.shape)
        return tokens, probs

    @staticmethod
    def backward(ctx, g_tokens, g_probs):
        call = ctx.call
        shape, dtype, device, p_shape = ctx.meta
        if g_tokens is None:
            g_tokens = torch.zeros(shape, dtype=dtype, device=device)
        g_p = None
        if ctx.needs_input_grad[1]:
            g_p = (g_probs.float().contiguous() if g_probs is not None
                   else torch.zeros(shape[0], dtype=torch.float32, device=device))
        g_x, g_pTE = combine_with_unpermute(call.manager.buffer, g_tokens.contiguous(),
                                            ctx.handle, g_p, pad_multiple=call.pad_multiple)
        unrouted_T = ~ctx.routed_T
        g_x = g_x.masked_fill_(unrouted_T.unsqueeze(1), 0)
        if g_pTE is not None:
            g_pTE = g_pTE.masked_fill_(unrouted_T.unsqueeze(1), 0)
        return g_x, g_pTE, None, None, None


def zero_unused_rows(tokens_NH: torch.Tensor, probs_N: Optional[torch.Tensor],
                     live_N: torch.Tensor):
    """Rows past ``live_N`` (``[N]`` bool, False on rows the library left uninitialised)
    as zeros and prob 0; a device select, no sync (a 0 * garbage product could be NaN)."""
    tokens_NH = torch.where(live_N.unsqueeze(1), tokens_NH, tokens_NH.new_zeros(()))
    if probs_N is not None:
        probs_N = torch.where(live_N, probs_N, probs_N.new_zeros(()))
    return tokens_NH, probs_N


class HybridCombine(torch.autograd.Function):
    """tokens_NH (expert-grouped, bf16) -> [T, H]; rows where ``routed_T`` [T] bool is False
    are zeroed (the library leaves them unwritten). Backward: dispatch_with_permute of the
    output grad along the cached handle; with ``live_N`` ([N] bool, or None) the rows it
    leaves unwritten (past the received ones, sync-free mode) get zero grads."""

    @staticmethod
    def forward(ctx, y_NH, handle, call: HybridCall, num_rows: int, routed_T, live_N=None):
        out, _ = combine_with_unpermute(call.manager.buffer, y_NH.contiguous(), handle,
                                        pad_multiple=call.pad_multiple)
        if routed_T is not None:
            out.masked_fill_(~routed_T.unsqueeze(1), 0)
        ctx.call, ctx.handle, ctx.num_rows, ctx.live_N = call, handle, num_rows, live_N
        return out

    @staticmethod
    def backward(ctx, g_TH):
        call = ctx.call
        g, _, _, _, _ = dispatch_with_permute(
            call.manager.buffer, g_TH.contiguous(), None, None,
            call.settings.num_local_experts, pad_multiple=call.pad_multiple,
            num_permuted_tokens=ctx.num_rows, handle=ctx.handle)
        if ctx.live_N is not None:
            g, _ = zero_unused_rows(g, None, ctx.live_N)
        return g, None, None, None, None, None
