"""NeMo AutoModel's ``nemo_automodel.components.moe.megatron.fused_a2a``, as a drop-in.

Code written against that module (the "seed") runs unchanged on this one: the same names,
signatures and defaults, and the same observable behaviour, so callers that test names for
None, read or assign the module globals, patch ``get_buffer`` or catch the seed's errors get
the seed's outcomes. This module follows the seed, not this project's own conventions; the
project's API (``MoETokenDispatcher``, the backends, ``available_backends()``) keeps its
one-line "what to install" errors.

Names (all bound at import, as the seed binds them):

* DeepEP V1 (``deep_ep.Buffer``): ``get_hidden_bytes``, ``get_buffer``, ``free_buffer``,
  ``_is_nvshmem_available``, ``FusedDispatch`` / ``FusedCombine``; ``fused_dispatch``,
  ``fused_combine``, ``set_deepep_num_sms`` (None when DeepEP is missing).
* HybridEP (``deep_ep.HybridEPBuffer``): ``init_hybrid_ep_buffer``,
  ``reset_hybrid_ep_buffer``, ``HybridEPDispatch`` / ``HybridEPCombine``;
  ``hybrid_ep_dispatch``, ``hybrid_ep_combine`` (None when HybridEP is missing).
* UCCL-EP (a DeepEP-V1-compatible ``Buffer``): ``get_uccl_buffer``, ``UCCLFusedDispatch`` /
  ``UCCLFusedCombine``; ``uccl_fused_dispatch``, ``uccl_fused_combine``,
  ``set_uccl_num_sms`` (None when UCCL-EP is missing). At import the UCCL SM count is set
  from ``$UCCL_EP_SM_NUMS`` (else ``$DEEP_EP_SM_NUMS``, else 20), as the seed does.
* The libraries' own names, re-exported when they import: ``Buffer``, ``EventHandle``,
  ``EventOverlap`` (DeepEP), ``HybridEPBuffer``, ``UCCLBuffer``, ``UCCLEventHandle``,
  ``UCCLEventOverlap`` (UCCL-EP). Absent when their library is missing.
* Data: ``HAVE_DEEP_EP``, ``HAVE_HYBRIDEP``, ``HAVE_UCCL_EP``; ``_buffer``,
  ``_uccl_buffer``, ``_hybrid_ep_buffer``, ``_nvshmem_available``: the live state the
  functions read and write. An assigned buffer is used by the next call if it suits
  (same group, large enough), ``free_buffer()`` destroys whatever ``_buffer`` holds (a
  failing ``destroy()`` is swallowed), ``reset_hybrid_ep_buffer()`` drops
  ``_hybrid_ep_buffer``.

Buffers are owned per (library, process group) by ``backends/deepep/buffer.py`` and
``backends/hybridep/buffer.py``, shared with the ``deepep``, ``uccl`` and ``hybridep``
backends, so one process holds one buffer per group whichever API made it. The globals
follow those owners: a buffer they make becomes the global (unless one assigned from outside
is there), one they destroy stops being it. Deliberate differences from the seed, each
because the seed's behaviour there is a failure or a leak:

* Without its library, a function the seed defines anyway (``get_buffer``,
  ``get_uccl_buffer``, ``_is_nvshmem_available``, ``init_hybrid_ep_buffer``, the Functions'
  ``apply``) raises ``ImportError`` naming what to install; the seed's raises ``NameError``.
* ``_is_nvshmem_available()`` asks DeepEP's RDMA size hint, not ``is_sm90_compiled()``: an
  SM90 build without NVSHMEM says True there, and the seed's ``get_buffer`` then fails.
* A buffer that must grow is destroyed (collectively) before the larger one is made, and
  each group keeps its own buffer; the seed drops the old one without ``destroy()``. All
  are made with ``explicitly_destroy=True`` (the seed's UCCL ones are not), and
  ``free_buffer()`` frees every DeepEP buffer of the process, the backends' included.
* HybridEP backward uses the buffer its forward used (the seed re-reads the global, which
  cannot hold that handle's state if it was replaced in between).
"""
from __future__ import annotations

import importlib
import logging
import os
import weakref
from typing import Sequence

import torch

from .backends.deepep import buffer as _v1
from .backends.hybridep import buffer as _hb

log = logging.getLogger("moe_dispatch")


def _library_attr(modules: Sequence[str], name: str):
    """``name`` from the first importable module of ``modules`` that has it, else None."""
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # missing, or not a package (then it has no submodule)
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    return None


# --------------------------------------------------------------------------------------
# Library names and flags, bound once at import like the seed's (a reload re-binds them,
# and must not keep names of a library that has gone since).

for _name in ("Buffer", "EventHandle", "EventOverlap", "HybridEPBuffer", "UCCLBuffer",
              "UCCLEventHandle", "UCCLEventOverlap"):
    globals().pop(_name, None)
del _name

HAVE_DEEP_EP = _v1.DEEP_EP.reason() is None
if HAVE_DEEP_EP:
    Buffer = _v1.DEEP_EP.load()
    EventHandle = _library_attr(("deep_ep.utils", "deep_ep"), "EventHandle")
    EventOverlap = _library_attr(("deep_ep.utils", "deep_ep"), "EventOverlap")

HAVE_UCCL_EP = _v1.UCCL.reason() is None
if HAVE_UCCL_EP:
    UCCLBuffer = _v1.UCCL.load()
    # UCCL's Buffer module imports both from its package (uccl.ep).
    UCCLEventHandle = _library_attr((UCCLBuffer.__module__, "uccl.ep"), "EventHandle")
    UCCLEventOverlap = _library_attr((UCCLBuffer.__module__, "uccl.ep"), "EventOverlap")
    UCCLBuffer.set_num_sms(int(os.environ.get("UCCL_EP_SM_NUMS",
                                              os.environ.get("DEEP_EP_SM_NUMS", 20))))

HAVE_HYBRIDEP = _hb.hybrid_reason() is None
if HAVE_HYBRIDEP:
    HybridEPBuffer = _hb.load_hybrid_ep_buffer_class()

_buffer = None
_hybrid_ep_buffer = None
_nvshmem_available = None
_uccl_buffer = None


# --------------------------------------------------------------------------------------
# Keeping the globals truthful while the owners (shared with the backends) make and
# destroy buffers.

# Buffers an owner announced. A global holding one of these is dropped once its owner lets
# it go; one assigned from outside is never dropped behind the caller's back.
_owned = weakref.WeakSet()


def _is_owned(buffer) -> bool:
    try:
        return buffer in _owned
    except TypeError:  # unhashable or not weak-referenceable: cannot have been recorded
        return False


def _remember(buffer) -> None:
    try:
        _owned.add(buffer)
    except TypeError:
        pass


def _held_by_owner(library_name: str, buffer) -> bool:
    return any(m.buffer is buffer for m in _v1.managers(library_name))


def _on_v1_buffer(library_name: str, buffer) -> None:
    """An owner made ``buffer`` for ``library_name`` ("deep_ep" / "uccl"), or let one go
    (``buffer`` None): update ``_buffer`` / ``_uccl_buffer`` to match."""
    global _buffer, _uccl_buffer
    if library_name == _v1.DEEP_EP.name:
        _buffer = _follow(library_name, _buffer, buffer)
    elif library_name == _v1.UCCL.name:
        _uccl_buffer = _follow(library_name, _uccl_buffer, buffer)


def _follow(library_name: str, current, made):
    if made is not None:
        _remember(made)
        # The newest buffer is the module's, as the seed's get_buffer would leave it.
        return made if current is None or _is_owned(current) else current
    if current is not None and _is_owned(current) and not _held_by_owner(library_name, current):
        return None  # destroyed by its owner (freed, or replaced by a larger one)
    return current


def _on_hybrid_buffer(buffer) -> None:
    global _hybrid_ep_buffer
    current = _hybrid_ep_buffer
    if buffer is not None:
        _remember(buffer)
        if current is None or _is_owned(current):
            _hybrid_ep_buffer = buffer
    elif current is not None and _is_owned(current):
        # HybridEP buffers keep their group: the reset was that group's owner's unless the
        # owner still holds it (another group's owner was reset).
        group = getattr(current, "group", None)
        if group is None or _hb.manager_for(group).buffer is not current:
            _hybrid_ep_buffer = None


# Registered once per process: a reload keeps this module's dict (so the flag), and the
# lambdas look the handlers up when called, so a reloaded module's handlers take over.
if not globals().get("_listening", False):
    _v1.add_listener(lambda library_name, buffer: _on_v1_buffer(library_name, buffer))
    _hb.add_listener(lambda buffer: _on_hybrid_buffer(buffer))
    _listening = True


# --------------------------------------------------------------------------------------
# DeepEP V1


def _is_nvshmem_available() -> bool:
    """Whether DeepEP was built with NVSHMEM (internode) support; cached in
    ``_nvshmem_available`` (an assigned value is returned as is)."""
    global _nvshmem_available
    if _nvshmem_available is None:
        _nvshmem_available = _v1.rdma_supported(_v1.DEEP_EP.load())
    return _nvshmem_available


def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes per row of ``x`` [T, H] the buffer must hold: H * max(element size, 2)."""
    return _v1.hidden_bytes_of(x)


def _suits(buffer, group, num_nvl_bytes: int, num_rdma_bytes: int) -> bool:
    # The seed's reuse test, applied to whatever the global holds (assigned ones included).
    return (buffer is not None and buffer.group == group
            and buffer.num_nvl_bytes >= num_nvl_bytes and buffer.num_rdma_bytes >= num_rdma_bytes)


def get_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the DeepEP ``Buffer`` for ``group`` with room for rows of
    ``hidden_bytes`` bytes (collective when it is made or grows).

    group:        the EP process group.
    hidden_bytes: bytes per token row (``get_hidden_bytes(x)``).

    Returns ``_buffer`` when it belongs to ``group`` and is large enough (also one assigned
    there); otherwise the group's owned buffer, made or grown as needed, which becomes
    ``_buffer``. Raises ``RuntimeError`` for more than 8 ranks without NVSHMEM support.
    """
    global _buffer
    mgr = _v1.manager_for(_v1.DEEP_EP, group)
    # The library's size hints first: DeepEP asserts on a group size it has no config for.
    num_nvl_bytes, num_rdma_bytes = mgr.sizes(hidden_bytes)
    if not _is_nvshmem_available() and mgr.num_ranks > _v1.NUM_MAX_NVL_PEERS:
        raise RuntimeError(
            f"get_buffer: DeepEP was built without NVSHMEM support, but an EP group of "
            f"{mgr.num_ranks} ranks (> {_v1.NUM_MAX_NVL_PEERS}) needs internode RDMA; rebuild "
            f"DeepEP with NVSHMEM or keep the EP group within one node")
    if not _suits(_buffer, group, num_nvl_bytes, num_rdma_bytes):
        _buffer = mgr.get(hidden_bytes)
    return _buffer


def free_buffer() -> None:
    """Destroy the DeepEP buffers and release their IPC / NVSHMEM state.

    Destroys whatever ``_buffer`` holds (also a buffer assigned there) and every DeepEP
    buffer the owners hold (all groups, the backends' included), then sets ``_buffer`` to
    None. A failing ``destroy()`` is swallowed (logged): teardown must go on. Call on every
    rank before ``torch.distributed.destroy_process_group``, which can hang while a buffer is
    alive. Safe to call when none exists.
    """
    global _buffer
    buffer, _buffer = _buffer, None
    # An owned buffer is destroyed by its owner below; destroying it here too would fail.
    if buffer is not None and not _held_by_owner(_v1.DEEP_EP.name, buffer):
        try:
            buffer.destroy()
        except Exception as exc:
            log.debug("moe_dispatch: free_buffer: destroy() failed: %s", exc)
    try:
        _v1.free_all(_v1.DEEP_EP.name)
    except Exception as exc:
        log.warning("moe_dispatch: free_buffer: %s", exc)


def _deep_ep_buffer(group, hidden_bytes: int):
    # Looked up when called, as the seed's Functions do: a patched get_buffer takes effect.
    return get_buffer(group, hidden_bytes)


def _uccl_ep_buffer(group, hidden_bytes: int):
    return get_uccl_buffer(group, hidden_bytes)


def _dispatch_forward(get, ctx, x, token_indices, token_probs, num_experts, group,
                      async_finish, allocate_on_comm_stream):
    """Layout + dispatch on ``get(group, hidden_bytes)``'s buffer (see ``FusedDispatch``)."""
    buffer = get(group, get_hidden_bytes(x))
    recv_x, recv_idx, recv_probs, counts, handle = _v1.v1_dispatch(
        buffer, x, token_indices, token_probs, num_experts, async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream)
    ctx.get, ctx.group, ctx.handle = get, group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
    # DeepEP hands the per-expert counts to the host already (its CPU waited for them).
    tokens_per_expert = torch.tensor(counts)
    return recv_x, recv_idx, recv_probs, tokens_per_expert, handle


def _dispatch_backward(ctx, grad_output, grad_token_probs):
    """Combine of the row and prob gradients: each token's sum over the ranks it reached."""
    buffer = ctx.get(ctx.group, get_hidden_bytes(grad_output))
    grad_w = grad_token_probs.float().contiguous() if grad_token_probs is not None else None
    grad_x, grad_probs = _v1.v1_combine(
        buffer, grad_output.contiguous(), ctx.handle, grad_w, async_finish=ctx.async_finish,
        allocate_on_comm_stream=ctx.allocate_on_comm_stream)
    return grad_x, None, grad_probs, None, None, None, None


def _combine_forward(get, ctx, x, group, handle, async_finish, allocate_on_comm_stream):
    buffer = get(group, get_hidden_bytes(x))
    combined_x, _ = _v1.v1_combine(buffer, x, handle, None, async_finish=async_finish,
                                   allocate_on_comm_stream=allocate_on_comm_stream)
    ctx.get, ctx.group, ctx.handle = get, group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
    return combined_x, None


def _combine_backward(ctx, grad_output):
    """Dispatch of the output gradient along the forward's cached layout."""
    buffer = ctx.get(ctx.group, get_hidden_bytes(grad_output))
    grad_x = _v1.v1_cached_dispatch(buffer, grad_output.contiguous(), ctx.handle,
                                    async_finish=ctx.async_finish,
                                    allocate_on_comm_stream=ctx.allocate_on_comm_stream)
    return grad_x, None, None, None, None


class FusedDispatch(torch.autograd.Function):
    """Fused dispatch operation for MoE routing combining computation and communication.

    forward(x [T, H] bf16, token_indices [T, K] int64 (-1 masked), token_probs [T, K] fp32,
    num_experts E, group, async_finish, allocate_on_comm_stream) ->
    (recv_x [N, H], recv_token_indices [N, K] local expert ids (-1 elsewhere),
    recv_token_probs [N, K], tokens_per_expert [E / R] int64 CPU, handle).
    The buffer comes from ``get_buffer`` (looked up at call time). Backward = DeepEP
    combine of the grads (to x and token_probs).
    """

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        """Forward pass of fused dispatch."""
        return _dispatch_forward(_deep_ep_buffer, ctx, x, token_indices, token_probs,
                                 num_experts, group, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert,
                 grad_handle):
        """Backward pass of fused dispatch."""
        return _dispatch_backward(ctx, grad_output, grad_token_probs)


class FusedCombine(torch.autograd.Function):
    """Fused combine operation for MoE output combining computation and communication.

    forward(x [N, H] bf16 rows in the received order, group, handle, ...) ->
    (combined [T, H], None). Backward = DeepEP dispatch of the grad along the cached handle.
    """

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused combine."""
        return _combine_forward(_deep_ep_buffer, ctx, x, group, handle, async_finish,
                                allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        """Backward pass of fused combine."""
        return _combine_backward(ctx, grad_output)


if HAVE_DEEP_EP:

    def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                       allocate_on_comm_stream=False):
        """Perform fused dispatch operation if deep_ep is available.

        x: [T, H] bf16. token_indices: [T, K] int64, -1 masked. token_probs: [T, K] fp32.
        num_experts: E. group: the EP process group. async_finish / allocate_on_comm_stream:
        DeepEP's event options. Returns ``FusedDispatch``'s outputs.
        """
        return FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts,
                                   group, async_finish, allocate_on_comm_stream)

    def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Perform fused combine operation if deep_ep is available.

        x: [N, H] bf16 rows in the received order. group: the EP process group. handle: from
        ``fused_dispatch``. Returns (combined [T, H], None).
        """
        return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)

    def set_deepep_num_sms(num_sms):
        """Sets the number of SMs to use for DeepEP (``num_sms`` even; class-wide)."""
        Buffer.set_num_sms(num_sms)

else:
    fused_dispatch = None
    fused_combine = None
    set_deepep_num_sms = None


# --------------------------------------------------------------------------------------
# HybridEP


def init_hybrid_ep_buffer(group: torch.distributed.ProcessGroup, hidden_dim: int, seq_len: int,
                          num_local_experts: int, num_sms_dispatch_api: int,
                          num_sms_combine_api: int, fp8_dispatch: bool) -> None:
    """Initialize the HybridEP buffer, including buffer allocation and metadata initialization.

    Makes a new buffer for ``group`` (collective) and stores it in ``_hybrid_ep_buffer``.
    A later request for more tokens or a larger hidden size reallocates inside the library.

    group:                the EP process group.
    hidden_dim:           H of the rows to dispatch.
    seq_len:              tokens per rank to size the buffer for.
    num_local_experts:    L, experts per rank.
    num_sms_dispatch_api / num_sms_combine_api: SMs of the two kernels.
    fp8_dispatch:         must be False (``AssertionError`` otherwise, as in the seed).
    """
    global _hybrid_ep_buffer
    if fp8_dispatch:
        raise AssertionError("HybridEP dispatcher does not support fp8 dispatch now")
    settings = _hb.HybridSettings(num_local_experts, num_sms_dispatch_api, num_sms_combine_api)
    _hybrid_ep_buffer = _hb.manager_for(group).init(hidden_dim, seq_len, settings)


def reset_hybrid_ep_buffer():
    """Reset the HybridEP buffer: drop ``_hybrid_ep_buffer`` (and the owners' buffers, every
    group); the next dispatch makes a new one."""
    global _hybrid_ep_buffer
    _hb.reset_all()
    _hybrid_ep_buffer = None


class HybridEPDispatch(torch.autograd.Function):
    """Fused dispatch operation for permute + dispatch a2a + permute using the HybridEP backend.

    forward(x [T, H] bf16, routing_map [T, E] bool, probs [T, E] fp32, group,
    num_local_experts L, num_sms_dispatch_api, num_sms_combine_api, num_permuted_tokens,
    pad_multiple) -> (tokens [N, H] grouped by local expert, each block padded to
    pad_multiple; probs [N] fp32; scaling_factor; tokens_per_expert [L]; handle).
    Uses ``_hybrid_ep_buffer``, made by ``init_hybrid_ep_buffer`` (looked up at call time)
    when None. With num_permuted_tokens the call is sync-free: N = num_permuted_tokens and
    tokens_per_expert stays on the GPU.
    """

    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None):
        """Forward pass of fused dispatch of the HybridEP backend."""
        if _hybrid_ep_buffer is None:
            seq_len, hidden_dim = x.shape[-2:]
            init_hybrid_ep_buffer(group, hidden_dim, seq_len, num_local_experts,
                                  num_sms_dispatch_api, num_sms_combine_api, False)
        buffer = _hybrid_ep_buffer
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

    forward(x [N, H] bf16 expert-grouped rows, handle, num_permuted_tokens, pad_multiple)
    -> [T, H], on ``_hybrid_ep_buffer`` (``AttributeError`` when it is None, as in the
    seed). Backward = dispatch_with_permute of the grad along the cached handle.
    """

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Forward pass of fused combine of the HybridEP backend."""
        buffer = _hybrid_ep_buffer
        if buffer is None:
            raise AttributeError("hybrid_ep_combine: _hybrid_ep_buffer is None; dispatch with "
                                 "hybrid_ep_dispatch (or call init_hybrid_ep_buffer) first")
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


if HAVE_HYBRIDEP:

    def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts,
                           num_sms_dispatch_api=24, num_sms_combine_api=24,
                           num_permuted_tokens=None, pad_multiple=None):
        """Perform fused dispatch for permute + dispatch a2a + permute using the HybridEP
        backend. Arguments and outputs as ``HybridEPDispatch.forward``."""
        return HybridEPDispatch.apply(x, routing_map, probs, group, num_local_experts,
                                      num_sms_dispatch_api, num_sms_combine_api,
                                      num_permuted_tokens, pad_multiple)

    def hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Perform fused combine for unpermute + combine a2a + unpermute using the HybridEP
        backend. Arguments and output as ``HybridEPCombine.forward``."""
        return HybridEPCombine.apply(x, handle, num_permuted_tokens, pad_multiple)

else:
    hybrid_ep_dispatch = None
    hybrid_ep_combine = None


# --------------------------------------------------------------------------------------
# UCCL-EP


def get_uccl_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create a UCCL-EP buffer for all-to-all communication.

    group: the EP process group. hidden_bytes: bytes per token row. As ``get_buffer``, with
    ``_uccl_buffer``; the buffer runs NVLink-only when the whole group is on one host.
    """
    global _uccl_buffer
    mgr = _v1.manager_for(_v1.UCCL, group)
    num_nvl_bytes, num_rdma_bytes = mgr.sizes(hidden_bytes)
    if not _suits(_uccl_buffer, group, num_nvl_bytes, num_rdma_bytes):
        _uccl_buffer = mgr.get(hidden_bytes)
    return _uccl_buffer


class UCCLFusedDispatch(torch.autograd.Function):
    """Fused dispatch using UCCL-EP instead of DeepEP (``FusedDispatch``'s contract, on
    ``get_uccl_buffer``'s buffer)."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        return _dispatch_forward(_uccl_ep_buffer, ctx, x, token_indices, token_probs,
                                 num_experts, group, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert,
                 grad_handle):
        return _dispatch_backward(ctx, grad_output, grad_token_probs)


class UCCLFusedCombine(torch.autograd.Function):
    """Fused combine using UCCL-EP instead of DeepEP (``FusedCombine``'s contract)."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        return _combine_forward(_uccl_ep_buffer, ctx, x, group, handle, async_finish,
                                allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, _grad_event=None):
        return _combine_backward(ctx, grad_output)


if HAVE_UCCL_EP:

    def uccl_fused_dispatch(x, token_indices, token_probs, num_experts, group,
                            async_finish=False, allocate_on_comm_stream=False):
        """Perform fused dispatch using UCCL-EP (arguments as ``fused_dispatch``)."""
        return UCCLFusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts,
                                       group, async_finish, allocate_on_comm_stream)

    def uccl_fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Perform fused combine using UCCL-EP (arguments as ``fused_combine``)."""
        return UCCLFusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)

    def set_uccl_num_sms(num_sms):
        """Sets the number of SMs to use for UCCL-EP (``num_sms`` even; class-wide)."""
        UCCLBuffer.set_num_sms(num_sms)

else:
    uccl_fused_dispatch = None
    uccl_fused_combine = None
    set_uccl_num_sms = None


def availability() -> dict:
    """{"deep_ep" | "hybrid_ep" | "uccl": "available" or the reason (what to install)}."""
    out = {}
    for name, reason in (("deep_ep", _v1.DEEP_EP.reason()), ("hybrid_ep", _hb.hybrid_reason()),
                         ("uccl", _v1.UCCL.reason())):
        out[name] = "available" if reason is None else reason
    return out
