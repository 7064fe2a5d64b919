"""Timing of one operation across an EP group.

On CUDA every iteration is bracketed by CUDA events on the current stream; on CPU by
``time.perf_counter``. Before each timed call the ranks are aligned (a one-element
all-reduce on the stream, or a barrier on CPU) so that a rank does not time its wait for
a slower peer, and on CUDA the L2 cache is overwritten (256 MB, as DeepEP's ``bench``
does once) so that no call reads its input from cache. The input set rotates too. Work
done in ``setup`` (e.g. the dispatch whose handle a timed combine needs) is not timed.

Each timed call also gets its host time: ``perf_counter`` around the call alone, with no
sync, i.e. how long the call keeps the CPU busy (for a path that never waits for the GPU,
its launch cost; for one that syncs, it also includes the wait for the GPU work queued
before it: the L2 flush and the rank alignment).

Warm-up lasts at least ``min_warmup_s`` of wall time, not only ``warmup`` calls: after a
second of host-only work (a ``--check`` comparing outputs on the CPU, a sleep) the same
dispatch was measured up to 20 % slower on 4 H200s for its first tens of milliseconds
(BENCHMARKS.md, session 4), so a path timed right after its check looked slower than one
timed after another path's timing. The ranks agree on the extra call count (a MAX
all-reduce), since every call may be collective.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist


@dataclass
class Timing:
    """Per-iteration seconds measured on this rank, and their median.

    started: ``time.time()`` when the timed iterations began (after warm-up), so samples of
             different paths can be laid on one time line.
    host_seconds: per iteration, the host time inside the call (no sync).
    """

    seconds: List[float]
    started: float = float("nan")
    device_allocs: Optional[int] = None  # cudaMalloc calls during the timed iterations
    host_seconds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def host_median(self) -> float:
        return statistics.median(self.host_seconds) if self.host_seconds else float("nan")


class Clock:
    """Times callables on ``device`` with the ranks of ``group`` aligned per iteration.

    device:   the bench device (CUDA events are used when it is a CUDA device).
    group:    the process group to align (None when not distributed).
    flush_l2: overwrite a 256 MB buffer before each timed call (CUDA only).
    min_warmup_s: warm up for at least this many seconds (None: 0.3 on CUDA, 0 on CPU).
    """

    MAX_EXTRA_WARMUP = 5000  # calls; bounds the time-based warm-up of very short calls
    MAX_WARMUP_ROUNDS = 8    # rounds of it (each paced by the calls before it)

    def __init__(self, device: torch.device, group=None, flush_l2: bool = True,
                 min_warmup_s: "float | None" = None):
        self.device = device
        self.group = group
        self.cuda = device.type == "cuda"
        self.min_warmup_s = (0.3 if self.cuda else 0.0) if min_warmup_s is None \
            else float(min_warmup_s)
        self._dist = dist.is_initialized() and dist.get_world_size(group) > 1
        self._flush = torch.empty(64 << 20, dtype=torch.int32, device=device) \
            if (self.cuda and flush_l2) else None
        self._one = torch.zeros(1, device=device if self._nccl() else "cpu")

    def _nccl(self) -> bool:
        return dist.is_initialized() and dist.get_backend(self.group) == "nccl"

    def align(self) -> None:
        """Line the ranks up: on NCCL a tiny all-reduce on the stream (the next event fires
        when every rank got there), on gloo a barrier."""
        if not self._dist:
            return
        if self._nccl():
            dist.all_reduce(self._one, group=self.group)
        else:
            dist.barrier(group=self.group)

    def agree_max(self, n: int) -> int:
        """The largest ``n`` over the ranks (collective when distributed)."""
        if not self._dist:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self._one.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def extra_warmup(self, per_call_s: float, done: int) -> int:
        """Calls still needed after ``done`` calls of ``per_call_s`` each to reach
        ``min_warmup_s`` of warm-up (this rank's view; see ``agree_max``)."""
        if self.min_warmup_s <= 0:
            return 0
        want = math.ceil(self.min_warmup_s / max(per_call_s, 1e-7))
        return max(0, min(want - done, self.MAX_EXTRA_WARMUP))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[int], object], iters: int, warmup: int,
            setup: Optional[Callable[[int], object]] = None) -> Timing:
        """Call ``setup(i)`` (untimed, its result passed to ``fn``) and time ``fn(i, s)``
        for ``warmup`` + ``iters`` iterations; return the ``iters`` timed ones."""
        def call(i):
            fn(i, setup(i) if setup else None)

        t0 = time.perf_counter()
        for i in range(warmup):
            call(i)
        self.sync()
        if self.min_warmup_s > 0:
            # Time-based top-up, paced by the calls just made (at least one).
            done = warmup
            if done == 0:
                call(0)
                self.sync()
                done = 1
            # Rounds until every rank has warmed up for min_warmup_s: a round's count is paced
            # by the calls so far, so calls that ran slower than the estimate (a loaded
            # machine) get another round instead of a short warm-up. Each round's count is
            # agreed, so every rank makes the same calls.
            for _ in range(self.MAX_WARMUP_ROUNDS):
                extra = self.agree_max(self.extra_warmup((time.perf_counter() - t0) / done,
                                                         done))
                if extra == 0:
                    break
                for i in range(done, done + extra):
                    call(i)
                    self.sync()  # the GPU works through the warm-up as it goes
                done += extra
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        out: List[float] = []
        host: List[float] = []
        allocs0 = _device_allocs(self.device) if self.cuda else None
        started = time.time()
        for i in range(iters):
            s = setup(warmup + i) if setup else None
            if self._flush is not None:
                self._flush.zero_()
            self.align()
            if self.cuda:
                starts[i].record()
                h0 = time.perf_counter()
                r = fn(warmup + i, s)
                host.append(time.perf_counter() - h0)
                ends[i].record()
            else:
                t0 = time.perf_counter()
                r = fn(warmup + i, s)
                out.append(time.perf_counter() - t0)
                host.append(out[-1])
            del r, s
        self.sync()
        if self.cuda:
            out = [a.elapsed_time(b) / 1e3 for a, b in zip(starts, ends)]
        allocs = None if allocs0 is None else _device_allocs(self.device) - allocs0
        return Timing(out, started, allocs, host)


def _device_allocs(device: torch.device) -> int:
    """cudaMalloc calls made so far by the caching allocator on ``device`` (a timed call that
    makes one pays for it on the host)."""
    stats = torch.cuda.memory_stats(device)
    return int(stats.get("num_device_alloc", stats.get("segment.all.allocated", 0)))
