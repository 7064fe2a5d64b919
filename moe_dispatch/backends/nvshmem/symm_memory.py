"""Symmetric-memory plumbing of the ``nvshmem`` backend: transports and the buffer arena.

A transport gives the engine what it needs from an EP group: symmetric allocations (this
rank's bytes plus every rank's base address, reachable over NVLink), a device barrier on
a few channels, and a host max used only to size buffers. ``SymmTransport`` runs on torch
symmetric memory (``torch.distributed._symmetric_memory``); ``LocalTransport`` is a group
of one. An ``Arena`` lays one generation of buffers out as regions of one allocation.
Used by ``engine.py`` and ``graph.py`` beside it only; kept apart so the engine holds the
dispatch/combine logic.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

# Barrier channels: 0 before a push (only when needed), 1 after staging, 2 after a pull,
# 3 after a push.
CH_PRE_PUSH, CH_STAGED, CH_PULLED, CH_PUSHED = 0, 1, 2, 3
NUM_CH = 4
ALIGN = 256


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m

# =============================================================================== transports


class Window:
    """One symmetric allocation: this rank's bytes and every rank's base address."""

    def __init__(self, local: torch.Tensor, ptrs: List[int], peer_fn=None):
        self.local = local
        self.ptrs = ptrs
        self._peer_fn = peer_fn

    def peer_bytes(self, s: int) -> torch.Tensor:
        """uint8 tensor aliasing rank s's allocation (torch impl only)."""
        return self._peer_fn(s)


class Transport:
    """What the engine needs from the group: symmetric allocations, a device barrier,
    and a host max (used only to size buffers). Shared by every backend instance of one
    group, so all layers share one set of symmetric buffers."""

    rank: int
    world: int
    device: torch.device

    def __init__(self):
        self.arena: Optional[Arena] = None
        self.arenas: List[Arena] = []  # never freed: freeing NVSHMEM memory is collective
        self._last_pull: Optional[bool] = None
        self.status = None

    def alloc(self, nbytes: int) -> Window:
        raise NotImplementedError

    def barrier(self, channel: int) -> None:
        raise NotImplementedError

    def host_max(self, vals: List[int]) -> List[int]:
        raise NotImplementedError

    def capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def note_op(self, was_pull: bool) -> None:
        self._last_pull = (was_pull, self.capturing())

    def need_pre_push_barrier(self) -> bool:
        # A push overwrites peers' receive areas, which they may still be summing from
        # an earlier push. Any pull in between already ordered that (it has barriers
        # after every rank's earlier reads), as long as both ran under the same capture
        # state (a captured graph may replay after anything).
        return self._last_pull != (True, self.capturing())


class LocalTransport(Transport):
    """A group of one: plain device memory, nothing to synchronize."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.rank, self.world, self.device = 0, 1, device
        self.status = torch.zeros(1, dtype=torch.int32, device=device)

    def alloc(self, nbytes: int) -> Window:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return Window(buf, [buf.data_ptr()], lambda s: buf)

    def barrier(self, channel: int) -> None:
        pass

    def host_max(self, vals):
        return list(vals)


class SymmTransport(Transport):
    """torch symmetric memory over one process group (all ranks on one NVLink domain)."""

    def __init__(self, group, device: torch.device, barrier_impl: str = "auto",
                 symm_backend: Optional[str] = None):
        super().__init__()
        # Multicast objects can take a shared host's GPUs down; this path never needs them.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        import torch.distributed._symmetric_memory as symm_mem
        self._sm = symm_mem
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = device
        if symm_backend:
            symm_mem.set_backend(symm_backend)
        self.group_name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before torch 2.10, a deprecated no-op-ish after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    enable(self.group_name)
                except Exception:  # already enabled through another path
                    pass
        if barrier_impl == "auto":
            barrier_impl = "triton"
        if barrier_impl not in ("triton", "torch"):
            raise ValueError(f"nvshmem: backend_options['barrier'] must be 'auto', 'triton' or "
                             f"'torch', got {barrier_impl!r}")
        self.barrier_impl = barrier_impl
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        flags = self.alloc(NUM_CH * self.world * 4)
        flags.local.zero_()
        self.flags = flags
        self.flag_table = torch.tensor(flags.ptrs, dtype=torch.int64, device=device)
        # Every rank's flags must be zero before anyone signals into them.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group, device_ids=[device.index]) \
            if dist.get_backend(group) == "nccl" else dist.barrier(group=group)

    def alloc(self, nbytes: int) -> Window:
        sm = self._sm
        nbytes = round_up(max(nbytes, 16), ALIGN)
        buf = sm.empty(nbytes, dtype=torch.uint8, device=self.device)
        hdl = sm.rendezvous(buf, self.group_name)
        ptrs = list(hdl.buffer_ptrs)
        if any(p == 0 for p in ptrs):
            raise RuntimeError(
                "nvshmem backend: some EP ranks' symmetric buffers are not directly addressable "
                "from this GPU (peers on another node, or no P2P/NVLink); this backend needs "
                "every EP rank on one NVLink domain: use backend='alltoall' or 'deepep' across "
                "nodes")
        # buffer_ptrs may be the base of a larger (pooled) block: shift by our offset in it.
        off = buf.data_ptr() - ptrs[self.rank]
        ptrs = [p + off for p in ptrs]

        def peer(s, hdl=hdl, buf=buf, nbytes=nbytes):
            if s == self.rank:
                return buf
            own = hdl.get_buffer(self.rank, (nbytes,), torch.uint8, 0)
            delta = buf.data_ptr() - own.data_ptr()
            return hdl.get_buffer(s, (nbytes,), torch.uint8, delta)

        win = Window(buf, ptrs, peer)
        win.handle = hdl
        return win

    def barrier(self, channel: int) -> None:
        if self.barrier_impl == "torch":
            self.flags.handle.barrier(channel)
        else:
            from ...kernels import _triton
            _triton.barrier(self.flag_table, self.rank, channel, self.status)

    def host_max(self, vals):
        t = torch.tensor(vals, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()




# =============================================================================== arena


STAGED_REGIONS = ("x", "idx", "probs", "meta")


class Arena:
    """One generation of symmetric buffers, laid out as regions of one allocation.

    Staged by the sender, read by peers (two sets, alternating between pull-type ops):
      x:     [T_cap, H]   staged rows (tokens on dispatch, output grads on combine backward)
      idx:   [T_cap, K]   int32 staged expert ids (-1 beyond the staged tokens)
      probs: [T_cap, K]   float32 staged probs
      meta:  [16]         int64: tokens, check code, row bytes, K, fits
    Written by peers:
      gprob: [T_cap, K]   float32 prob gradients pushed back by the experts' ranks
      comb:  [R*T_cap, H] partial sums pushed by each rank (rows r*T_cap + t)

    Why two staging sets: op n's peers may still be reading set n % 2 when this rank
    returns; op n+1 stages into the other set and its after-staging barrier is passed by
    each rank only after its reads of op n (stream order), so op n+2 may overwrite set
    n % 2 with no barrier at the end of a pull.
    """

    STAGED = STAGED_REGIONS
    REGIONS = tuple(f"{n}{p}" for p in (0, 1) for n in STAGED_REGIONS) + ("gprob", "comb")

    def __init__(self, tr: Transport, T_cap: int, row_bytes: int, K_cap: int):
        self.T_cap, self.row_bytes, self.K_cap = T_cap, row_bytes, K_cap
        R = tr.world
        base = dict(x=T_cap * row_bytes, idx=T_cap * K_cap * 4, probs=T_cap * K_cap * 4,
                    meta=16 * 8)
        sizes = {f"{n}{p}": base[n] for p in (0, 1) for n in self.STAGED}
        sizes.update(gprob=T_cap * K_cap * 4, comb=R * T_cap * row_bytes)
        self.off, total = {}, 0
        for name in self.REGIONS:
            self.off[name] = total
            total += round_up(max(sizes[name], 1), ALIGN)
        self.win = tr.alloc(total)
        self.tables = {
            name: torch.tensor([p + self.off[name] for p in self.win.ptrs], dtype=torch.int64,
                               device=tr.device)
            for name in self.REGIONS}
        self.cur = 0  # staging set of the current pull-type op (same on every rank)
        self.device = tr.device
        self._scratch: Dict[str, torch.Tensor] = {}
        self._views: Dict[tuple, torch.Tensor] = {}

    def scratch(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A local work buffer kept for this arena's lifetime (not symmetric)."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._scratch[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def next_stage(self) -> None:
        """Start a pull-type op: switch to the other staging set."""
        self.cur ^= 1

    def _name(self, name: str) -> str:
        return f"{name}{self.cur}" if name in self.STAGED else name

    def table(self, name: str) -> torch.Tensor:
        """[R] int64 device addresses of region ``name`` on every rank."""
        return self.tables[self._name(name)]

    def local(self, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
        # Cached: building a view is three tensor ops of host time, on every call.
        key = (self._name(name), dtype, tuple(shape))
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._view(self.win.local, name, dtype, shape)
        return view

    def peer(self, s: int, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
        return self._view(self.win.peer_bytes(s), name, dtype, shape)

    def _view(self, raw, name, dtype, shape):
        n = 1
        for d in shape:
            n *= d
        esize = dtype.itemsize
        start = self.off[self._name(name)]
        return raw[start:start + n * esize].view(dtype).view(*shape)
