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
2-byte (BF16) and probs FP32; older commits take ``use_host_meta`` instead of
``non_blocking`` and return an 8-field handle without the overflow flag.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .ep_common import import_optional

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
    kw: Dict[str, Any] = dict(hidden=x, scaling_factor=None, pad_multiple=pad_multiple,
                              num_permuted_tokens=num_permuted_tokens)
    if handle is None:
        kw.update(routing_map=routing_map, probs=probs, num_of_experts_per_rank=num_local_experts)
    else:
        kw["handle"] = handle
    sync_free = num_permuted_tokens is not None and handle is None
    if "non_blocking" in params:
        kw["non_blocking"] = sync_free
    elif "use_host_meta" in params:
        kw["use_host_meta"] = not sync_free
    return buffer.dispatch_with_permute(**kw)


def combine_with_unpermute(buffer, x, handle, probs=None, *, pad_multiple: Optional[int] = None):
    """Returns (combined [T, H], combined_probs [T, E] fp32 or None)."""
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
    __slots__ = ("tokens_per_expert", "handle")


def new_box() -> _Box:
    return _Box()


class HybridDispatch(torch.autograd.Function):
    """(x_TH bf16, probs_TE fp32, routing_map_TE bool) -> (tokens_NH, probs_N).
    Backward: combine_with_unpermute of the row grads and prob grads."""

    @staticmethod
    def forward(ctx, x_TH, probs_TE, map_TE, call: HybridCall, box: _Box):
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
        return g_x, g_pTE, None, None, None


class HybridCombine(torch.autograd.Function):
    """tokens_NH (expert-grouped, bf16) -> [T, H]. Backward: dispatch_with_permute of the
    output grad along the cached handle."""

    @staticmethod
    def forward(ctx, y_NH, handle, call: HybridCall, num_rows: int):
        out, _ = combine_with_unpermute(call.manager.buffer, y_NH.contiguous(), handle,
                                        pad_multiple=call.pad_multiple)
        ctx.call, ctx.handle, ctx.num_rows = call, handle, num_rows
        return out

    @staticmethod
    def backward(ctx, g_TH):
        call = ctx.call
        g, _, _, _, _ = dispatch_with_permute(
            call.manager.buffer, g_TH.contiguous(), None, None,
            call.settings.num_local_experts, pad_multiple=call.pad_multiple,
            num_permuted_tokens=ctx.num_rows, handle=ctx.handle)
        return g, None, None, None
