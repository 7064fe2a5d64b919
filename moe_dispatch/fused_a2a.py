"""Drop-in for NeMo AutoModel's ``nemo_automodel.components.moe.megatron.fused_a2a``.

Every class, function and data name of that module, with the same signatures and
defaults, so code written against it can switch its import to ``moe_dispatch.fused_a2a``:

* DeepEP V1 (``deep_ep.Buffer``): ``get_hidden_bytes``, ``get_buffer``, ``free_buffer``,
  ``_is_nvshmem_available``, ``FusedDispatch`` / ``FusedCombine``, ``fused_dispatch`` /
  ``fused_combine``, ``set_deepep_num_sms``.
* HybridEP (``deep_ep.HybridEPBuffer``): ``init_hybrid_ep_buffer``,
  ``reset_hybrid_ep_buffer``, ``HybridEPDispatch`` / ``HybridEPCombine``,
  ``hybrid_ep_dispatch`` / ``hybrid_ep_combine``.
* UCCL-EP (a DeepEP-V1-compatible ``Buffer``): ``get_uccl_buffer``, ``UCCLFusedDispatch``
  / ``UCCLFusedCombine``, ``uccl_fused_dispatch`` / ``uccl_fused_combine``,
  ``set_uccl_num_sms``.
* Data: ``HAVE_DEEP_EP``, ``HAVE_HYBRIDEP``, ``HAVE_UCCL_EP``, ``_buffer``,
  ``_hybrid_ep_buffer``, ``_uccl_buffer``, ``_nvshmem_available``.

Differences from the original, all deliberate:
* Where a library is missing the functions still exist and raise ``ImportError`` naming
  what to install (the original sets them to None). UCCL missing is an error: DeepEP is
  never used in its place.
* Buffers are owned per (library, process group) by ``moe_dispatch.v1_buffer`` /
  ``moe_dispatch.hybrid_buffer`` (shared with the ``deepep``, ``uccl`` and ``hybridep``
  backends); ``_buffer``, ``_uccl_buffer`` and ``_hybrid_ep_buffer`` mirror the most
  recently made one, for code that reads them. A buffer that must grow is destroyed
  (collectively) before the larger one is made. ``free_buffer()`` frees DeepEP buffers of
  every group.
* ``_is_nvshmem_available()`` asks DeepEP whether its RDMA (NVSHMEM) size hint works
  instead of using ``is_sm90_compiled()`` as a proxy, which is True for SM90 builds made
  without NVSHMEM (where the RDMA hint raises).
"""
from __future__ import annotations

import logging

import torch

from . import hybrid_buffer as _hb
from . import v1_buffer as _v1

log = logging.getLogger("moe_dispatch")

HAVE_DEEP_EP = _v1.DEEP_EP.reason() is None
HAVE_HYBRIDEP = _hb.hybrid_reason() is None
HAVE_UCCL_EP = _v1.UCCL.reason() is None

_buffer = None
_hybrid_ep_buffer = None
_nvshmem_available = None
_uccl_buffer = None


def _on_v1_buffer(name: str, buffer) -> None:
    global _buffer, _uccl_buffer
    if name == _v1.DEEP_EP.name:
        _buffer = buffer
    elif name == _v1.UCCL.name:
        _uccl_buffer = buffer


def _on_hybrid_buffer(buffer) -> None:
    global _hybrid_ep_buffer
    _hybrid_ep_buffer = buffer


_v1.add_listener(_on_v1_buffer)
_hb.add_listener(_on_hybrid_buffer)


# --------------------------------------------------------------------------------------
# DeepEP V1


def _is_nvshmem_available() -> bool:
    """Check if DeepEP was compiled with NVSHMEM support (cached in ``_nvshmem_available``)."""
    global _nvshmem_available
    if _nvshmem_available is None:
        _nvshmem_available = _v1.rdma_supported(_v1.DEEP_EP.load())
    return _nvshmem_available


def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes per row of ``x`` [T, H] the buffer must hold: H * max(element size, 2)."""
    return _v1.hidden_bytes_of(x)


def _get_v1_buffer(library: _v1.V1Library, group, hidden_bytes: int):
    mgr = _v1.manager_for(library, group)
    try:
        _v1.check_group_size(mgr.num_ranks, mgr.rdma, library.name)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    return mgr.get(hidden_bytes)


def get_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the DeepEP ``Buffer`` of ``group`` with room for rows of
    ``hidden_bytes`` (collective on first use and when it must grow)."""
    return _get_v1_buffer(_v1.DEEP_EP, group, hidden_bytes)


def free_buffer() -> None:
    """Destroy the DeepEP buffers (of every group) and release their IPC / NVSHMEM state.

    Call on every rank before ``torch.distributed.destroy_process_group``, which can hang
    while a buffer is alive. Errors are logged, not raised. Safe to call when none exists.
    """
    global _buffer
    try:
        _v1.free_all(_v1.DEEP_EP.name)
    except Exception as exc:  # teardown must go on
        log.warning("moe_dispatch: free_buffer: %s", exc)
    _buffer = None


def _fused_dispatch_forward(library, ctx, x, token_indices, token_probs, num_experts, group,
                            async_finish, allocate_on_comm_stream):
    buffer = _get_v1_buffer(library, group, get_hidden_bytes(x))
    recv_x, recv_idx, recv_probs, counts, handle = _v1.v1_dispatch(
        buffer, x, token_indices, token_probs, num_experts, async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream)
    ctx.library, ctx.group, ctx.handle = library, group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
    # DeepEP hands the per-expert counts to the host already (its CPU waited for them).
    tokens_per_expert = torch.tensor(counts)
    return recv_x, recv_idx, recv_probs, tokens_per_expert, handle


def _fused_dispatch_backward(ctx, grad_output, grad_token_probs):
    buffer = _get_v1_buffer(ctx.library, ctx.group, get_hidden_bytes(grad_output))
    grad_w = grad_token_probs.float().contiguous() if grad_token_probs is not None else None
    grad_x, grad_probs = _v1.v1_combine(
        buffer, grad_output.contiguous(), ctx.handle, grad_w, async_finish=ctx.async_finish,
        allocate_on_comm_stream=ctx.allocate_on_comm_stream)
    return grad_x, None, grad_probs, None, None, None, None


def _fused_combine_forward(library, ctx, x, group, handle, async_finish, allocate_on_comm_stream):
    buffer = _get_v1_buffer(library, group, get_hidden_bytes(x))
    combined_x, _ = _v1.v1_combine(buffer, x, handle, None, async_finish=async_finish,
                                   allocate_on_comm_stream=allocate_on_comm_stream)
    ctx.library, ctx.group, ctx.handle = library, group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
    return combined_x, None


def _fused_combine_backward(ctx, grad_output):
    buffer = _get_v1_buffer(ctx.library, ctx.group, get_hidden_bytes(grad_output))
    grad_x = _v1.v1_cached_dispatch(buffer, grad_output.contiguous(), ctx.handle,
                                    async_finish=ctx.async_finish,
                                    allocate_on_comm_stream=ctx.allocate_on_comm_stream)
    return grad_x, None, None, None, None


class FusedDispatch(torch.autograd.Function):
    """Fused dispatch operation for MoE routing combining computation and communication.

    forward(x [T, H] bf16, token_indices [T, K] int64 (-1 masked), token_probs [T, K] fp32,
    num_experts, group, async_finish, allocate_on_comm_stream) ->
    (recv_x [N, H], recv_token_indices [N, K] local ids (-1 elsewhere), recv_token_probs
    [N, K], tokens_per_expert [L] int64 CPU, handle). Backward = DeepEP combine of the grads
    (grads to x and token_probs).
    """

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        """Forward pass of fused dispatch."""
        return _fused_dispatch_forward(_v1.DEEP_EP, ctx, x, token_indices, token_probs,
                                       num_experts, group, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert,
                 grad_handle):
        """Backward pass of fused dispatch."""
        return _fused_dispatch_backward(ctx, grad_output, grad_token_probs)


class FusedCombine(torch.autograd.Function):
    """Fused combine operation for MoE output combining computation and communication.

    forward(x [N, H] bf16, group, handle, ...) -> (combined [T, H], None).
    Backward = DeepEP dispatch of the grad along the cached handle.
    """

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused combine."""
        return _fused_combine_forward(_v1.DEEP_EP, ctx, x, group, handle, async_finish,
                                      allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        """Backward pass of fused combine."""
        return _fused_combine_backward(ctx, grad_output)


def _require(flag: bool, library) -> None:
    if not flag:
        raise ImportError(library.reason() or f"{library.name} is unavailable")


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False):
    """Perform fused dispatch operation if deep_ep is available.

    x: [T, H] bf16. token_indices: [T, K] int64, -1 masked. token_probs: [T, K] fp32.
    num_experts: E. group: the EP process group. Returns FusedDispatch's outputs.
    """
    _require(HAVE_DEEP_EP, _v1.DEEP_EP)
    return FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group,
                               async_finish, allocate_on_comm_stream)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Perform fused combine operation if deep_ep is available.

    x: [N, H] bf16 rows in the received order. handle: from ``fused_dispatch``.
    """
    _require(HAVE_DEEP_EP, _v1.DEEP_EP)
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_deepep_num_sms(num_sms):
    """Sets the number of SMs to use for DeepEP (even; class-wide in DeepEP)."""
    _v1.DEEP_EP.load().set_num_sms(num_sms)


# --------------------------------------------------------------------------------------
# HybridEP


def init_hybrid_ep_buffer(group: torch.distributed.ProcessGroup, hidden_dim: int, seq_len: int,
                          num_local_experts: int, num_sms_dispatch_api: int,
                          num_sms_combine_api: int, fp8_dispatch: bool) -> None:
    """Initialize the HybridEP buffer of ``group`` for ``seq_len`` tokens per rank of
    ``hidden_dim`` (collective). A larger request later reallocates it (logged)."""
    if fp8_dispatch:
        raise ValueError("init_hybrid_ep_buffer: fp8_dispatch is not supported (FP8 rows need "
                         "per-token scaling factors this API does not carry)")
    settings = _hb.HybridSettings(num_local_experts, num_sms_dispatch_api, num_sms_combine_api)
    _hb.manager_for(group).init(hidden_dim, seq_len, settings)


def reset_hybrid_ep_buffer():
    """Reset the HybridEP buffers (every group); the next dispatch makes a new one."""
    global _hybrid_ep_buffer
    _hb.reset_all()
    _hybrid_ep_buffer = None


class HybridEPDispatch(torch.autograd.Function):
    """Fused dispatch operation for permute + dispatch a2a + permute using the HybridEP backend.

    forward(x [T, H] bf16, routing_map [T, E] bool, probs [T, E] fp32, group,
    num_local_experts, ...) -> (tokens [N, H] grouped by local expert and padded to
    pad_multiple, probs [N] fp32, scaling_factor, tokens_per_expert [L] int64, handle).
    With num_permuted_tokens the call is sync-free: N = num_permuted_tokens and
    tokens_per_expert stays on the GPU; ``handle[10]`` is the overflow flag.
    """

    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None):
        """Forward pass of fused dispatch of the HybridEP backend."""
        settings = _hb.HybridSettings(num_local_experts, num_sms_dispatch_api,
                                      num_sms_combine_api)
        mgr = _hb.manager_for(group)
        buffer = mgr.get(x.shape[-1], x.shape[-2], settings, strict=False)
        # The seed's combine reads the module-level buffer: point it at the one used here
        # (it may predate this module's import, e.g. made by the hybridep backend).
        _on_hybrid_buffer(buffer)
        out = _hb.dispatch_with_permute(buffer, x, routing_map, probs, num_local_experts,
                                        pad_multiple=pad_multiple,
                                        num_permuted_tokens=num_permuted_tokens)
        ctx.buffer, ctx.handle, ctx.pad_multiple = buffer, out[4], pad_multiple
        return out

    @staticmethod
    def backward(ctx, grad_x, grad_probs, grad_scaling_factor, grad_tokens_per_expert,
                 grad_handle):
        """Backward pass of fused dispatch of the HybridEP backend."""
        g_p = grad_probs.float().contiguous() if grad_probs is not None else None
        g_x, g_probs = _hb.combine_with_unpermute(ctx.buffer, grad_x.contiguous(), ctx.handle,
                                                  g_p, pad_multiple=ctx.pad_multiple)
        return g_x, None, g_probs, None, None, None, None, None, None


class HybridEPCombine(torch.autograd.Function):
    """Fused combine operation for permute + combine a2a + permute using the HybridEP backend.

    forward(x [N, H] bf16 expert-grouped rows, handle, ...) -> [T, H].
    Backward = dispatch_with_permute of the grad along the cached handle.
    """

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Forward pass of fused combine of the HybridEP backend."""
        buffer = _hybrid_ep_buffer
        if buffer is None:
            raise RuntimeError("hybrid_ep_combine: no HybridEP buffer; call hybrid_ep_dispatch "
                               "(or init_hybrid_ep_buffer) first")
        combined, _ = _hb.combine_with_unpermute(buffer, x.contiguous(), handle,
                                                 pad_multiple=pad_multiple)
        ctx.buffer, ctx.handle, ctx.pad_multiple = buffer, handle, pad_multiple
        # The cached dispatch in backward must produce as many rows as x had.
        ctx.num_rows = num_permuted_tokens if num_permuted_tokens is not None else x.shape[0]
        return combined

    @staticmethod
    def backward(ctx, grad_x):
        """Backward pass of fused combine of the HybridEP backend."""
        g, _, _, _, _ = _hb.dispatch_with_permute(
            ctx.buffer, grad_x.contiguous(), None, None, None, pad_multiple=ctx.pad_multiple,
            num_permuted_tokens=ctx.num_rows, handle=ctx.handle)
        return g, None, None, None


def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                       num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None):
    """Perform fused dispatch for permute + dispatch a2a + permute using the HybridEP backend."""
    _require_hybrid()
    return HybridEPDispatch.apply(x, routing_map, probs, group, num_local_experts,
                                  num_sms_dispatch_api, num_sms_combine_api, num_permuted_tokens,
                                  pad_multiple)


def hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None):
    """Perform fused combine for unpermute + combine a2a + unpermute using the HybridEP backend."""
    _require_hybrid()
    return HybridEPCombine.apply(x, handle, num_permuted_tokens, pad_multiple)


def _require_hybrid() -> None:
    if not HAVE_HYBRIDEP:
        raise ImportError(_hb.hybrid_reason() or "deep_ep.HybridEPBuffer is unavailable")


# --------------------------------------------------------------------------------------
# UCCL-EP


def get_uccl_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the UCCL-EP ``Buffer`` of ``group`` (NVLink-only when the whole group is
    on one host)."""
    return _get_v1_buffer(_v1.UCCL, group, hidden_bytes)


class UCCLFusedDispatch(torch.autograd.Function):
    """Fused dispatch using UCCL-EP instead of DeepEP (same contract as ``FusedDispatch``)."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        return _fused_dispatch_forward(_v1.UCCL, ctx, x, token_indices, token_probs,
                                       num_experts, group, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert,
                 grad_handle):
        return _fused_dispatch_backward(ctx, grad_output, grad_token_probs)


class UCCLFusedCombine(torch.autograd.Function):
    """Fused combine using UCCL-EP instead of DeepEP (same contract as ``FusedCombine``)."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        return _fused_combine_forward(_v1.UCCL, ctx, x, group, handle, async_finish,
                                      allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, _grad_event=None):
        return _fused_combine_backward(ctx, grad_output)


def uccl_fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                        allocate_on_comm_stream=False):
    """Perform fused dispatch using UCCL-EP."""
    _require(HAVE_UCCL_EP, _v1.UCCL)
    return UCCLFusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts,
                                   group, async_finish, allocate_on_comm_stream)


def uccl_fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Perform fused combine using UCCL-EP."""
    _require(HAVE_UCCL_EP, _v1.UCCL)
    return UCCLFusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_uccl_num_sms(num_sms):
    """Sets the number of SMs to use for UCCL-EP (even)."""
    _v1.UCCL.load().set_num_sms(num_sms)


def availability() -> dict:
    """{"deep_ep" | "hybrid_ep" | "uccl": "available" or the reason (what to install)}."""
    out = {}
    for name, reason in (("deep_ep", _v1.DEEP_EP.reason()), ("hybrid_ep", _hb.hybrid_reason()),
                         ("uccl", _v1.UCCL.reason())):
        out[name] = "available" if reason is None else reason
    return out
