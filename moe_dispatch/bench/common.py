"""What every part of the benchmark shares: the run context, result rows, rank agreement."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, asdict
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .timing import Clock, Timing
from .workload import InputSet, Shape, bytes_per_row


@dataclass
class Row:
    """One line of the result table (one backend or reference path).

    kind:   "backend" (ours, through ``MoETokenDispatcher``) or "reference".
    status: "ok", "FAILED" (wrong results under --check: no numbers), "skipped" (not
            available here; ``reason`` says why) or "error" (raised while running).
    check:  "passed", "FAILED" or "not run".
    Times are the mean over ranks of each rank's median (µs / ms), ``*_max`` the slowest
    rank's median; GB/s is the mean over ranks of rows received × bytes per row / median.
    layer_tokens_per_s is per GPU: tokens per rank / median forward+backward time.
    ``*_host_us`` / ``layer_host_ms``: the same for the host time inside each call
    (``Timing.host_seconds``: no sync; what the call costs the CPU).
    budget_rows:   budget-mode rows (``max_rows_per_rank`` = B); None for exact-mode rows.
    budget_status: OR over ranks (and the input sets) of the dispatch's ``status`` bits after
                   the run (``moe_dispatch.protocol.STATUS_*``; nonzero: rows were dropped or
                   input was bad, the numbers time a dispatch that lost rows); None when not
                   a budget row. Per rank in ``per_rank["budget_status"]``.
    """

    name: str
    kind: str
    status: str = "ok"
    reason: str = ""
    check: str = "not run"
    fp8: bool = False
    dispatch_us: Optional[float] = None
    dispatch_us_max: Optional[float] = None
    dispatch_gbps: Optional[float] = None
    combine_us: Optional[float] = None
    combine_us_max: Optional[float] = None
    combine_gbps: Optional[float] = None
    layer_ms: Optional[float] = None
    layer_tokens_per_s: Optional[float] = None
    dispatch_host_us: Optional[float] = None
    combine_host_us: Optional[float] = None
    layer_host_ms: Optional[float] = None
    budget_rows: Optional[int] = None
    budget_status: Optional[int] = None
    budget_status_text: str = ""
    note: str = ""
    per_rank: Dict[str, List[float]] = field(default_factory=dict)
    # Every timed iteration: {"dispatch_us": [[rank 0's samples in order], ...], ...},
    # {"dispatch_started": [time.time() per rank], ...} and on CUDA
    # {"dispatch_device_allocs": [cudaMalloc calls while timing, per rank]}: order, drift
    # and allocator effects stay visible.
    samples: Dict[str, List[Any]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@dataclass
class Ctx:
    """The run context on one rank."""

    args: Any
    shape: Shape
    rank: int
    world: int
    local_rank: int
    local_world: int
    num_nodes: int
    device: torch.device
    group: Any
    sets: List[InputSet]
    clock: Clock

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def log_exc(self, what: str) -> None:
        """Report the exception being handled (with its traceback, on stderr, rank 0): the
        row says what failed, the traceback says where."""
        if self.rank == 0:
            import sys
            import traceback
            print(f"{what}:", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()

    def barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            if dist.get_backend(self.group) == "nccl":
                dist.barrier(group=self.group, device_ids=[self.device.index])
            else:
                dist.barrier(group=self.group)

    @property
    def rows_recv(self) -> float:
        return sum(s.rows_recv for s in self.sets) / len(self.sets)

    def gather(self, obj) -> List[Any]:
        """All ranks' ``obj`` (every rank must call this)."""
        if not (dist.is_initialized() and self.world > 1):
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def make_row(self, name: str, kind: str, *, check: str = "not run",
                 dispatch: Optional[Timing] = None, combine: Optional[Timing] = None,
                 layer: Optional[Timing] = None, fp8: bool = False, note: str = "") -> Row:
        """Collective: combine this rank's timings with every other rank's into a Row."""
        mine = dict(rows=self.rows_recv,
                    d=dispatch.median if dispatch else None,
                    c=combine.median if combine else None,
                    l=layer.median if layer else None,
                    h={label: t.host_median for label, t in
                       (("dispatch", dispatch), ("combine", combine), ("layer", layer)) if t},
                    s={label: (t.seconds, t.started, t.device_allocs, t.host_seconds)
                       for label, t in
                       (("dispatch", dispatch), ("combine", combine), ("layer", layer)) if t})
        table = self.gather(mine)
        row = Row(name, kind, check=check, fp8=fp8, note=note)
        elem = torch.finfo(self.shape.torch_dtype).bits // 8
        bpr = bytes_per_row(self.shape.hidden, elem, fp8)
        rows_r = [t["rows"] for t in table]
        row.per_rank["rows_recv"] = rows_r
        for key, label in (("d", "dispatch"), ("c", "combine")):
            meds = [t[key] for t in table]
            if any(m is None for m in meds):
                continue
            row.per_rank[f"{label}_us"] = [m * 1e6 for m in meds]
            setattr(row, f"{label}_us", statistics.fmean(meds) * 1e6)
            setattr(row, f"{label}_us_max", max(meds) * 1e6)
            setattr(row, f"{label}_gbps",
                    statistics.fmean(r * bpr / m / 1e9 if m > 0 else float("nan")
                                     for r, m in zip(rows_r, meds)))
        for label, scale, unit in (("dispatch", 1e6, "us"), ("combine", 1e6, "us"),
                                   ("layer", 1e3, "ms")):
            if all(label in t["s"] for t in table):
                row.samples[f"{label}_{unit}"] = [[round(x * scale, 3) for x in t["s"][label][0]]
                                                  for t in table]
                row.samples[f"{label}_started"] = [t["s"][label][1] for t in table]
                if all(t["s"][label][2] is not None for t in table):
                    row.samples[f"{label}_device_allocs"] = [t["s"][label][2] for t in table]
                row.samples[f"{label}_host_{unit}"] = [
                    [round(x * scale, 3) for x in t["s"][label][3]] for t in table]
                hosts = [t["h"][label] for t in table]
                row.per_rank[f"{label}_host_{unit}"] = [m * scale for m in hosts]
                setattr(row, f"{label}_host_{unit}", statistics.fmean(hosts) * scale)
        meds = [t["l"] for t in table]
        if all(m is not None for m in meds):
            row.per_rank["layer_ms"] = [m * 1e3 for m in meds]
            row.layer_ms = statistics.fmean(meds) * 1e3
            row.layer_tokens_per_s = statistics.fmean(
                self.shape.tokens / m if m > 0 else float("nan") for m in meds)
        return row


def agree(ctx: Ctx, ok: bool, msg: str = "") -> "tuple[bool, str]":
    """Collective: (every rank ok, first non-empty message of a failing rank)."""
    table = ctx.gather((bool(ok), msg))
    all_ok = all(o for o, _ in table)
    if all_ok:
        return True, ""
    msgs = [f"rank {r}: {m}" if ctx.world > 1 else m for r, (o, m) in enumerate(table) if not o and m]
    first = msgs[0] if msgs else "failed on another rank"
    # Identical messages from every rank read better once.
    if len({m for o, m in table if not o}) == 1:
        first = next(m for o, m in table if not o) or first
    return False, first
