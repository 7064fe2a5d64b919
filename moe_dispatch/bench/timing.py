"""Timing of one operation across an EP group.

On CUDA every iteration is bracketed by CUDA events on the current stream; on CPU by
``time.perf_counter``. Before each timed call the ranks are aligned (a one-element
all-reduce on the stream, or a barrier on CPU) so that a rank does not time its wait for
a slower peer, and on CUDA the L2 cache is overwritten (256 MB, as DeepEP's ``bench``
does once) so that no call reads its input from cache. The input set rotates too. Work
done in ``setup`` (e.g. the dispatch whose handle a timed combine needs) is not timed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist


@dataclass
class Timing:
    """Per-iteration seconds measured on this rank, and their median."""

    seconds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


class Clock:
    """Times callables on ``device`` with the ranks of ``group`` aligned per iteration.

    device:   the bench device (CUDA events are used when it is a CUDA device).
    group:    the process group to align (None when not distributed).
    flush_l2: overwrite a 256 MB buffer before each timed call (CUDA only).
    """

    def __init__(self, device: torch.device, group=None, flush_l2: bool = True):
        self.device = device
        self.group = group
        self.cuda = device.type == "cuda"
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

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[int], object], iters: int, warmup: int,
            setup: Optional[Callable[[int], object]] = None) -> Timing:
        """Call ``setup(i)`` (untimed, its result passed to ``fn``) and time ``fn(i, s)``
        for ``warmup`` + ``iters`` iterations; return the ``iters`` timed ones."""
        for i in range(warmup):
            s = setup(i) if setup else None
            fn(i, s)
        self.sync()
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        out: List[float] = []
        for i in range(iters):
            s = setup(warmup + i) if setup else None
            if self._flush is not None:
                self._flush.zero_()
            self.align()
            if self.cuda:
                starts[i].record()
                r = fn(warmup + i, s)
                ends[i].record()
            else:
                t0 = time.perf_counter()
                r = fn(warmup + i, s)
                out.append(time.perf_counter() - t0)
            del r, s
        self.sync()
        if self.cuda:
            out = [a.elapsed_time(b) / 1e3 for a, b in zip(starts, ends)]
        return Timing(out)
