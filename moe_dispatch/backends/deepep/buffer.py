"""DeepEP-V1-style communication buffers: one owner per (library, process group).

DeepEP V1 (``deep_ep.Buffer``, tag v1.2.1) and UCCL-EP (a DeepEP-V1-compatible ``Buffer``)
share one Python API: ``get_dispatch_layout``, ``dispatch``, ``combine``,
``get_dispatch_config`` / ``get_combine_config``, ``set_num_sms``, ``capture``. This module
holds what the ``deepep`` and ``uccl`` backends and ``moe_dispatch.fused_a2a`` share:

* ``V1Library``: which module provides the ``Buffer`` class and what to install if it is
  missing. It never substitutes one library for another. UCCL-EP's Python ``Buffer`` can
  be named by ``$MOE_DISPATCH_UCCL_MODULE`` (a module, or a package directory).
* ``V1BufferManager``: owns the ``Buffer`` of one process group; sizes it from the
  library's own size hints, rebuilds it (collectively) when a larger hidden size needs
  more room, and frees it before process-group teardown.
* ``v1_dispatch`` / ``v1_combine`` / ``v1_cached_dispatch``: the three calls every user
  makes, with the ``async_finish`` / ``allocate_on_comm_stream`` event protocol done once;
  ``v1_dispatch`` can carry a one-bit per-rank flag to every rank inside the per-expert
  counts (``flag_offset`` / ``is_flagged``), which the backends use for sync-free input
  validation.
* ``V1Dispatch`` / ``V1Combine``: autograd Functions over them (combine is dispatch's
  adjoint and the cached dispatch is combine's), used by the backends.

Buffers are process-global state (their memory is mapped by the peer ranks), so managers
live in a module-level table keyed by library and group, never on a class.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ... import comm
from ..common import import_optional

log = logging.getLogger("moe_dispatch")

# Intranode kernels of DeepEP V1 are instantiated for these group sizes only; larger groups
# (multiples of 8) need the internode kernels, i.e. a build with NVSHMEM.
INTRANODE_SIZES = (2, 4, 8)
NUM_MAX_NVL_PEERS = 8
# Mirrors of DeepEP's Config::get_nvl_buffer_size_hint assumptions (csrc/config.hpp).
_MAX_TOPK = 128
_MAX_SCALES = 128
_SOURCE_META_BYTES = 8  # internode::get_source_meta_bytes(): two ints


# --------------------------------------------------------------------------------------
# Which library provides the Buffer


@dataclass(frozen=True)
class V1Library:
    """A provider of a DeepEP-V1-compatible ``Buffer`` class.

    name:        "deep_ep" or "uccl" (the key under which its buffers are owned).
    candidates:  modules to look in, in order, for a ``Buffer`` with the V1 Python API.
    hint:        what to install when none is importable (shown in errors).
    env:         name of an environment variable that, when set, replaces ``candidates``
                 by the one module it names: a module name on ``sys.path``, or the path
                 of a package directory (imported under the directory's name). Nothing
                 else is tried then.
    """

    name: str
    candidates: Tuple[str, ...]
    hint: str
    env: Optional[str] = None

    def modules(self) -> Tuple[str, ...]:
        override = os.environ.get(self.env, "").strip() if self.env else ""
        return (override,) if override else self.candidates

    def load(self):
        """The ``Buffer`` class; raises ``ImportError`` naming what to install."""
        errors = []
        for mod_name in self.modules():
            try:
                mod = _import_module_or_path(mod_name, self.hint)
            except ImportError as exc:
                errors.append(f"cannot import {mod_name} ({exc.__cause__ or exc})")
                continue
            cls = getattr(mod, "Buffer", None)
            missing = [m for m in _V1_METHODS if not hasattr(cls, m)] if cls else ["Buffer"]
            if not missing:
                return cls
            errors.append(f"{mod_name}.Buffer lacks the DeepEP-V1 Python API "
                          f"({', '.join(missing)})")
        where = f" (from ${self.env})" if self.env and self.modules() != self.candidates else ""
        raise ImportError(f"{self.name}{where}: {'; '.join(errors)}; {self.hint}")

    def reason(self) -> Optional[str]:
        try:
            self.load()
        except ImportError as exc:
            return str(exc)
        return None


def _import_module_or_path(spec: str, hint: str):
    """Import a module by name, or a package from its directory path (``/x/pkg`` is
    imported as module ``pkg``, so its relative imports work)."""
    if os.sep not in spec and not spec.endswith(".py"):
        return import_optional(spec, hint)
    path = os.path.abspath(spec)
    name = os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]
    hit = sys.modules.get(name)
    if hit is not None and os.path.abspath(getattr(hit, "__file__", "") or "").startswith(path):
        return hit
    init = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
    try:
        if not os.path.exists(init):
            raise FileNotFoundError(f"{init} does not exist")
        loc = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[path] if os.path.isdir(path) else None)
        mod = importlib.util.module_from_spec(loc)
        sys.modules[name] = mod
        try:
            loc.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return mod
    except Exception as exc:
        raise ImportError(f"{spec} is not importable ({type(exc).__name__}: {exc}); {hint}") \
            from exc


_V1_METHODS = ("get_dispatch_layout", "dispatch", "combine", "get_dispatch_config",
               "get_combine_config", "set_num_sms", "capture")

DEEP_EP = V1Library(
    "deep_ep", ("deep_ep",),
    "install DeepEP V1 (the deep_ep package, deepseek-ai/DeepEP tag v1.2.1, built from source "
    "for your GPU arch)")

UCCL_MODULE_ENV = "MOE_DISPATCH_UCCL_MODULE"

UCCL = V1Library(
    "uccl", ("uccl.ep.buffer", "uccl.ep"),
    "install UCCL-EP with its DeepEP-compatible Python Buffer (pip install 'moe-dispatch[uccl]' "
    "gives uccl>=0.1.1, whose wheel ships only the native uccl.ep runtime; the Python Buffer "
    "is UCCL's ep/bench/buffer.py + utils.py (packaged as ep/deep_ep_wrapper): point "
    f"${UCCL_MODULE_ENV} at that package's directory or module name)",
    env=UCCL_MODULE_ENV)


def library_for_module(module: str) -> V1Library:
    """A library that takes its ``Buffer`` from ``module`` (explicit choice, e.g. tests
    that run the UCCL adapter over ``deep_ep.Buffer``). Buffers are owned under the
    module's name, so they never mix with another library's."""
    if module == "deep_ep":
        return DEEP_EP
    if module in ("uccl", "uccl.ep"):
        return UCCL
    return V1Library(module, (module,), f"install a package providing {module}.Buffer "
                                        "(DeepEP-V1-compatible)")


# --------------------------------------------------------------------------------------
# Sizing


def nvl_size_hint(num_sms: int, num_max_nvl_chunked_recv_tokens: int, hidden_bytes: int,
                  num_ranks: int, nvshmem: bool = False) -> int:
    """Bytes of NVLink buffer one config needs: a Python mirror of DeepEP V1's
    ``Config.get_nvl_buffer_size_hint`` (csrc/config.hpp, v1.2.1), for explaining sizes and
    testing; the managers use the library's own hint.

    Per channel (num_sms / 2) and NVLink peer: queue heads/tails, then a ring of
    ``num_max_nvl_chunked_recv_tokens`` slots, each holding one token's hidden bytes,
    top-k ids (int64) and weights (float32) for up to 128 slots, and 128 FP8 scales;
    with NVSHMEM also an 8-byte source record. Rounded up to 128 bytes.
    """
    num_rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
    num_nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
    ch = num_sms // 2
    slots = ch * num_nvl_ranks * num_max_nvl_chunked_recv_tokens
    n = ch * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
    n += slots * hidden_bytes
    if nvshmem:
        n += slots * _SOURCE_META_BYTES
    n += slots * _MAX_TOPK * 8
    n += slots * _MAX_TOPK * 4
    n += slots * _MAX_SCALES * 4
    return -(-n // 128) * 128


def configs_for(buffer_cls, num_ranks: int, num_sms: Optional[int] = None):
    """(dispatch_config, combine_config) for ``num_ranks``; with ``num_sms`` given, the
    library's recommended configs with that SM count instead of the class-wide one.

    The recommended tables read the class attribute ``Buffer.num_sms``; it is swapped only
    for the duration of the two calls, so ``set_num_sms`` users are unaffected.
    """
    if num_sms is None:
        return buffer_cls.get_dispatch_config(num_ranks), buffer_cls.get_combine_config(num_ranks)
    saved = buffer_cls.num_sms
    try:
        buffer_cls.num_sms = num_sms
        return buffer_cls.get_dispatch_config(num_ranks), buffer_cls.get_combine_config(num_ranks)
    finally:
        buffer_cls.num_sms = saved


def rdma_supported(buffer_cls) -> bool:
    """Whether the library was built with internode (NVSHMEM / RDMA) support.

    Asked of the library itself: its RDMA size hint raises when internode support was
    compiled out. (``is_sm90_compiled()`` is not a proxy for this: an SM90 build
    without NVSHMEM reports True.)"""
    try:
        cfg = buffer_cls.get_dispatch_config(16)
        cfg.get_rdma_buffer_size_hint(7168 * 2, 16)
        return True
    except Exception:
        return False


def required_bytes(buffer_cls, num_ranks: int, hidden_bytes: int, num_sms: Optional[int] = None,
                   with_rdma: bool = False) -> Tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes): the max of the library's hints over the dispatch and
    combine configs (how DeepEP's own tests and Megatron size the buffer)."""
    nvl = rdma = 0
    for cfg in configs_for(buffer_cls, num_ranks, num_sms):
        nvl = max(nvl, int(cfg.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)))
        if with_rdma:
            rdma = max(rdma, int(cfg.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)))
    return nvl, rdma


def check_group_size(num_ranks: int, rdma: bool, library: str) -> None:
    """Raise ``ValueError`` if the V1 kernels cannot serve a group of ``num_ranks``."""
    if num_ranks in INTRANODE_SIZES:
        return
    if num_ranks > NUM_MAX_NVL_PEERS and num_ranks % NUM_MAX_NVL_PEERS == 0:
        if rdma:
            return
        raise ValueError(
            f"{library}: an EP group of {num_ranks} ranks needs the internode kernels, but this "
            f"build has no NVSHMEM/RDMA support; rebuild it with NVSHMEM or use an EP size "
            f"of {INTRANODE_SIZES} within one node")
    raise ValueError(f"{library}: DeepEP-V1 kernels support EP sizes {INTRANODE_SIZES} within a "
                     f"node or multiples of {NUM_MAX_NVL_PEERS} across nodes, got {num_ranks}")


def same_host(group) -> bool:
    """True when every rank of ``group`` runs on this host (one all_gather_object)."""
    if comm.group_size(group) == 1:
        return True
    names: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return all(n == names[0] for n in names)


# --------------------------------------------------------------------------------------
# Ownership


class V1BufferManager:
    """Owns the ``Buffer`` of one (library, process group).

    ``get(hidden_bytes)`` returns a buffer at least that large, building or rebuilding it
    as needed; every rank of the group must make the same calls (construction and
    ``destroy()`` are collective). Buffers are made with ``explicitly_destroy=True`` so
    ``free()`` can release them before ``destroy_process_group`` (which can hang while a
    buffer's IPC / NVSHMEM state is alive).
    """

    def __init__(self, library: V1Library, buffer_cls, group):
        self.library = library
        self.buffer_cls = buffer_cls
        self.group = group
        self.num_ranks = comm.group_size(group)
        self.buffer = None
        self.rebuilds = 0
        self._rdma = None
        self._intranode = None
        self._sizes: Dict[Any, Tuple[int, int]] = {}

    @property
    def rdma(self) -> bool:
        if self._rdma is None:
            self._rdma = rdma_supported(self.buffer_cls)
        return self._rdma

    def intranode(self) -> bool:
        """Whether the whole group is on this host (UCCL then runs NVLink-only)."""
        if self._intranode is None:
            self._intranode = same_host(self.group)
        return self._intranode

    def sizes(self, hidden_bytes: int, num_sms: Optional[int] = None) -> Tuple[int, int]:
        # Cached: every dispatch and combine asks, and the library builds its whole
        # recommended-config table each time it is consulted.
        key = (hidden_bytes, num_sms, getattr(self.buffer_cls, "num_sms", None))
        hit = self._sizes.get(key)
        if hit is None:
            with_rdma = self.rdma and self.num_ranks > NUM_MAX_NVL_PEERS
            if self.takes_intranode and self.intranode():
                with_rdma = False
            hit = self._sizes[key] = required_bytes(self.buffer_cls, self.num_ranks,
                                                    hidden_bytes, num_sms, with_rdma)
        return hit

    def get(self, hidden_bytes: int, num_sms: Optional[int] = None):
        nvl, rdma = self.sizes(hidden_bytes, num_sms)
        buf = self.buffer
        if buf is not None and buf.num_nvl_bytes >= nvl and buf.num_rdma_bytes >= rdma:
            return buf
        if buf is not None:
            log.info("moe_dispatch: growing %s buffer of group size %d: NVL %d -> %d bytes, "
                     "RDMA %d -> %d bytes (hidden_bytes=%d)", self.library.name,
                     self.num_ranks, buf.num_nvl_bytes, max(nvl, buf.num_nvl_bytes),
                     buf.num_rdma_bytes, max(rdma, buf.num_rdma_bytes), hidden_bytes)
            nvl, rdma = max(nvl, buf.num_nvl_bytes), max(rdma, buf.num_rdma_bytes)
            self._destroy()
            self.rebuilds += 1
        self.buffer = self._build(nvl, rdma)
        _notify(self.library.name, self.buffer)
        return self.buffer

    @property
    def takes_intranode(self) -> bool:
        """UCCL-EP's Buffer takes ``is_intranode`` (NVLink-only mode, no RDMA bytes);
        DeepEP's does not. Asked of the class itself, whichever module provided it."""
        try:
            return "is_intranode" in inspect.signature(self.buffer_cls.__init__).parameters
        except (TypeError, ValueError):
            return False

    def _build(self, nvl: int, rdma: int):
        kwargs = dict(explicitly_destroy=True)
        if self.takes_intranode:
            kwargs["is_intranode"] = self.intranode()
        return self.buffer_cls(self.group, nvl, rdma, **kwargs)

    def _destroy(self) -> None:
        buf, self.buffer = self.buffer, None
        if buf is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        try:
            buf.destroy()  # collective (DeepEP barriers the NVLink peers inside)
        except Exception as exc:  # best effort: teardown must go on
            log.warning("moe_dispatch: %s Buffer.destroy() failed: %s", self.library.name, exc)

    def free(self) -> None:
        self._destroy()
        _notify(self.library.name, None)


_MANAGERS: Dict[Tuple[str, int], Tuple[Any, V1BufferManager]] = {}
_LISTENERS: List[Callable[[str, Any], None]] = []


def _group_key(group) -> int:
    return id(group if group is not None else dist.group.WORLD)


def manager_for(library: V1Library, group, buffer_cls=None) -> V1BufferManager:
    """The manager of ``library``'s buffer for ``group`` (made on first use)."""
    key = (library.name, _group_key(group))
    hit = _MANAGERS.get(key)
    if hit is not None:
        return hit[1]
    mgr = V1BufferManager(library, buffer_cls or library.load(), group)
    # Keep the group object alive with its manager, so its id cannot be reused.
    _MANAGERS[key] = (group, mgr)
    return mgr


def managers(library_name: Optional[str] = None) -> List[V1BufferManager]:
    return [m for (name, _), (_, m) in _MANAGERS.items()
            if library_name is None or name == library_name]


def free_all(library_name: Optional[str] = None) -> None:
    """Destroy every buffer of ``library_name`` (all libraries if None), on every group.
    Call on all ranks before ``torch.distributed.destroy_process_group``."""
    for key in [k for k in _MANAGERS if library_name is None or k[0] == library_name]:
        _MANAGERS.pop(key)[1].free()


def add_listener(fn: Callable[[str, Any], None]) -> None:
    """``fn(library_name, buffer_or_None)`` is called whenever a buffer is made or freed
    (``moe_dispatch.fused_a2a`` mirrors the newest one in its ``_buffer`` globals)."""
    _LISTENERS.append(fn)


def _notify(name: str, buffer) -> None:
    for fn in _LISTENERS:
        fn(name, buffer)


# --------------------------------------------------------------------------------------
# The three calls


def hidden_bytes_of(x: torch.Tensor) -> int:
    """Bytes per token row the buffer must hold: H * max(element size, 2)."""
    return x.size(1) * max(x.element_size(), 2)


def _begin(buffer_cls, async_finish: bool):
    # With async_finish the kernels wait on an event of the current stream instead of the
    # stream itself, so allocation can move to the communication stream.
    return buffer_cls.capture() if async_finish else None


def flag_offset(num_ranks: int) -> int:
    """What a flagging rank adds to each expert count it sends (see ``v1_dispatch``).

    A received per-expert count is the sum over source ranks, so with every rank flagging
    it is at most ``num_ranks * flag_offset + real count``, and half the int32 range stays
    for the real count. A count >= the offset is read as a flag: a set flag is never
    missed; real counts that large (>= 4M rows for one local expert at 256 ranks, 268M at
    4) only cost the exchange that finds nothing wrong."""
    return (2 ** 31 - 1) // (2 * num_ranks)


def is_flagged(counts, num_ranks: int) -> bool:
    """Whether a received per-expert count list carries some rank's flag."""
    off = flag_offset(num_ranks)
    return any(int(c) >= off for c in counts)


def v1_dispatch(buffer, x, topk_idx, topk_weights, num_experts: int, *, config=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False,
                flag=None, num_worst_tokens: int = 0):
    """Layout + dispatch. Returns (recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens_per_expert_list, handle).

    topk_idx: [T, K] int64 (-1 masked); topk_weights: [T, K] float32.
    recv_topk_idx holds local expert ids (-1 for slots on other ranks). The per-expert
    list is a host list: DeepEP's CPU waits for the counts (not CUDA-graph compatible).

    num_worst_tokens: 0, or N >= the rows this rank can receive: DeepEP then skips its
    host wait (intranode only) and returns N rows, of which only the received ones are
    written (recv_topk_idx is -1 in the others), and an empty per-expert list
    (``budget_mode.py`` relies on exactly this).

    flag: None, a host int 0/1, or a 0-dim device tensor, int 0/1 or bool (e.g.
    ``PendingCheck.device_bad``). A set flag adds ``flag_offset(R)`` to every per-expert
    count this rank sends (one launch: ``n_expert += flag * offset``). The library only sums
    these counts into the receivers' host lists (they steer no data), so every rank's
    list then shows the flag (``is_flagged``) right after the dispatch, with no extra
    collective or sync: the backends use it to make every rank raise for one rank's bad
    input.
    """
    prev = _begin(type(buffer), async_finish)
    n_rank, n_rdma, n_expert, in_rank, ev = buffer.get_dispatch_layout(
        topk_idx, num_experts, previous_event=prev, async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream)
    if flag is not None and not (isinstance(flag, int) and flag == 0):
        if async_finish:
            ev.current_stream_wait()  # the layout ran on the communication stream
        off = flag_offset(buffer.group_size)
        if isinstance(flag, torch.Tensor):
            # An int 0-dim tensor adds in n_expert's dtype without a conversion launch.
            n_expert.add_(flag if flag.dtype != torch.bool else flag.to(n_expert.dtype),
                          alpha=off)
        else:
            n_expert.add_(off)
        if async_finish:
            ev = _begin(type(buffer), True)
    # Passed only when set, so a Buffer without the argument still serves the exact mode.
    worst = dict(num_worst_tokens=num_worst_tokens) if num_worst_tokens else {}
    recv_x, recv_idx, recv_w, counts, handle, after = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=n_rank,
        num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=n_expert, config=config, previous_event=ev,
        async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream, **worst)
    if async_finish:
        after.current_stream_wait()
    return recv_x, recv_idx, recv_w, counts, handle


def v1_combine(buffer, x, handle, topk_weights=None, *, config=None, async_finish: bool = False,
               allocate_on_comm_stream: bool = False):
    """Sum each token's rows back on its source rank. Returns (combined_x, combined_weights).
    x must be BF16 (V1 combine kernels reduce BF16 only)."""
    prev = _begin(type(buffer), async_finish)
    out, out_w, after = buffer.combine(
        x, handle=handle, topk_weights=topk_weights, config=config, previous_event=prev,
        async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after.current_stream_wait()
    return out, out_w


def v1_cached_dispatch(buffer, x, handle, *, config=None, async_finish: bool = False,
                       allocate_on_comm_stream: bool = False):
    """Dispatch ``x`` along a previous dispatch's layout (no layout, no CPU wait)."""
    prev = _begin(type(buffer), async_finish)
    recv_x, _, _, _, _, after = buffer.dispatch(
        x, handle=handle, config=config, previous_event=prev, async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after.current_stream_wait()
    return recv_x


# --------------------------------------------------------------------------------------
# Autograd over the calls (used by the backends)


@dataclass(frozen=True)
class V1Comm:
    """How one backend talks to its buffer.

    manager:                  owner of the group's buffer.
    num_experts:              E.
    dispatch_config / combine_config: library Config objects (None = library default).
    async_finish / allocate_on_comm_stream: DeepEP's event options (see ``v1_dispatch``).
    num_sms:                  SM count the configs were made for (None = class-wide).
    """

    manager: V1BufferManager
    num_experts: int
    dispatch_config: Any = None
    combine_config: Any = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    num_sms: Optional[int] = None

    def buffer(self, hidden_bytes: int):
        return self.manager.get(hidden_bytes, self.num_sms)

    def kw(self, config):
        return dict(config=config, async_finish=self.async_finish,
                    allocate_on_comm_stream=self.allocate_on_comm_stream)


class _Box:
    """Carries the non-tensor results of a Function's forward out to the caller."""
    __slots__ = ("counts", "handle")


class V1Dispatch(torch.autograd.Function):
    """(x_TH bf16, probs_TK fp32) -> (recv_x_NH, recv_probs_NK, recv_idx_NK); ``flag`` and
    ``num_worst_tokens`` as in ``v1_dispatch``.

    Backward: combine of the row gradients (and of the prob gradients as top-k weights),
    which sums each token's gradient over the ranks it was sent to.
    """

    @staticmethod
    def forward(ctx, x_TH, probs_TK, idx_TK, link: V1Comm, box: _Box, flag=None,
                num_worst_tokens: int = 0):
        buf = link.buffer(hidden_bytes_of(x_TH))
        recv_x, recv_idx, recv_p, counts, handle = v1_dispatch(
            buf, x_TH, idx_TK, probs_TK, link.num_experts, flag=flag,
            num_worst_tokens=num_worst_tokens, **link.kw(link.dispatch_config))
        box.counts, box.handle = counts, handle
        ctx.link, ctx.handle, ctx.hidden_bytes = link, handle, hidden_bytes_of(x_TH)
        ctx.recv_x_meta = (recv_x.shape, recv_x.dtype, recv_x.device)
        ctx.recv_p_shape = recv_p.shape
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_p, recv_idx

    @staticmethod
    def backward(ctx, g_recv_x, g_recv_p, _g_idx):
        link = ctx.link
        buf = link.buffer(ctx.hidden_bytes)
        if g_recv_x is None:
            shape, dtype, device = ctx.recv_x_meta
            g_recv_x = torch.zeros(shape, dtype=dtype, device=device)
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = (g_recv_p.float().contiguous() if g_recv_p is not None else
                   torch.zeros(ctx.recv_p_shape, dtype=torch.float32, device=g_recv_x.device))
        g_x, g_p = v1_combine(buf, g_recv_x.contiguous(), ctx.handle, g_w,
                              **link.kw(link.combine_config))
        return g_x, g_p, None, None, None, None, None


class V1Combine(torch.autograd.Function):
    """recv-side rows [N_recv, H] bf16 -> [T, H]: the sum over ranks of each token's rows.
    Backward: the cached dispatch of the output gradient along the same layout."""

    @staticmethod
    def forward(ctx, y_NH, handle, link: V1Comm):
        buf = link.buffer(hidden_bytes_of(y_NH))
        out, _ = v1_combine(buf, y_NH.contiguous(), handle, None, **link.kw(link.combine_config))
        ctx.link, ctx.handle, ctx.hidden_bytes = link, handle, hidden_bytes_of(y_NH)
        return out

    @staticmethod
    def backward(ctx, g_TH):
        link = ctx.link
        buf = link.buffer(ctx.hidden_bytes)
        g = v1_cached_dispatch(buf, g_TH.contiguous(), ctx.handle,
                               **link.kw(link.dispatch_config))
        return g, None, None


def new_box() -> _Box:
    return _Box()
