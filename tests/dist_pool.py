"""A pool of real gloo processes that stays up across tests.

Spawning a process group costs seconds (each rank imports torch), so each world size gets
one pool per test session; tests send it a function name and arguments, every rank runs
it, and the results come back ordered by rank. A task that does not finish in time fails
its test (the pool is then restarted) instead of hanging the suite.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from datetime import timedelta


class RankError(Exception):
    """A rank raised; ``kind`` is the exception's class name."""

    def __init__(self, rank, kind, message, tb):
        super().__init__(f"rank {rank}: {kind}: {message}\n{tb}")
        self.rank, self.kind, self.message = rank, kind, message


def _worker(rank, world, init_file, tasks, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    while True:
        item = tasks.get()
        if item is None:
            break
        module, fn, args = item
        try:
            out = ("ok", getattr(importlib.import_module(module), fn)(rank, world, *args))
        except BaseException as exc:  # report everything; the test decides
            out = ("err", type(exc).__name__, str(exc), traceback.format_exc())
        results.put((rank, out))
    dist.destroy_process_group()


class GlooPool:
    def __init__(self, world: int):
        self.world = world
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="moe_dispatch_pool_")
        init_file = os.path.join(self._dir, "init")
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, init_file, self.tasks[r],
                                                        self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.broken = False

    def run_raw(self, module: str, fn: str, *args, timeout: float = 120.0):
        """Run ``module.fn(rank, world, *args)`` on every rank; list of ('ok', value) or
        ('err', kind, message, traceback) ordered by rank."""
        for q in self.tasks:
            q.put((module, fn, args))
        out = [None] * self.world
        for _ in range(self.world):
            try:
                rank, res = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                raise TimeoutError(f"{fn} did not finish on all {self.world} ranks in {timeout}s")
            out[rank] = res
        return out

    def run(self, module: str, fn: str, *args, timeout: float = 120.0):
        """Like ``run_raw`` but raises the first rank's error."""
        res = self.run_raw(module, fn, *args, timeout=timeout)
        for rank, r in enumerate(res):
            if r[0] == "err":
                if r[1] not in ("ValueError", "TypeError", "DispatchInputError"):
                    self.broken = True
                raise RankError(rank, *r[1:])
        return [r[1] for r in res]

    def close(self):
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
