"""What a run reports: the metrics file, the progress bar, memory use and the plot.

``metrics.jsonl`` holds one JSON object per logged step; a resumed run keeps the lines up
to its checkpoint and appends the rest, so the file always reads as one uninterrupted run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

import torch.distributed as dist


_NO_MATPLOTLIB = ("the training plot needs matplotlib: pip install matplotlib "
                  "(or set train.plot: false)")


def restart_metrics(metrics_path: str, step: int, rank: int,
                    world: int) -> List[Dict[str, Any]]:
    """Start ``metrics_path`` over with its rows for steps ``<= step`` (step 0: empty).

    Collective over all ranks: every rank returns the kept rows; rank 0 rewrites the file.
    """
    rows: List[Dict[str, Any]] = []
    if step > 0 and os.path.exists(metrics_path):
        # Keep the lines up to the checkpoint; the resumed run writes the rest again.
        with open(metrics_path) as f:
            rows = [r for r in (json.loads(l) for l in f if l.strip()) if r["step"] <= step]
    if world > 1:
        dist.barrier()  # every rank has read the file before rank 0 rewrites it
    if rank == 0:
        with open(metrics_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if world > 1:
        dist.barrier()
    return rows


def append_metrics(metrics_path: str, row: Dict[str, Any]) -> None:
    """Add one logged step to ``metrics_path`` (rank 0 only)."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")


def rss_mb() -> float:
    """Resident set size of this process in MiB (current on Linux, peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class Progress:
    """A progress bar on stderr: tqdm when installed, else a one-line bar of our own
    (redrawn only on a terminal; in a log file the per-step log lines suffice)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.n, self.enabled = total, initial, enabled
        self._tqdm = None
        self._t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, postfix: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(1)
        elif self._tty:
            frac = self.n / max(self.total, 1)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            rate = self.n / max(time.perf_counter() - self._t0, 1e-9)
            sys.stderr.write(f"\r[{bar}] {self.n}/{self.total} {rate:.2f} step/s {postfix}\033[K")
            sys.stderr.flush()

    def write(self, line: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(line)
        else:
            if self.enabled and self._tty:
                sys.stderr.write("\r\033[K")
            print(line, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self._tty:
            sys.stderr.write("\n")


def check_plot_possible() -> None:
    """Raise before training, not after it, when ``plot_metrics`` could not run."""
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError(_NO_MATPLOTLIB)


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Loss and expert load (max/mean tokens per expert, per layer) against step."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(_NO_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["loss"] for r in rows], label="LM loss")
    ax1.axhline(math.log(256), color="gray", ls=":", lw=1, label="ln 256 (uniform bytes)")
    ax1.set_xlabel("step"); ax1.set_ylabel("cross entropy (nats/byte)"); ax1.legend()
    ax1.set_title("loss")
    nl = len(rows[0].get("load_imbalance_per_layer", [])) if rows else 0
    for l in range(nl):
        ax2.plot(steps, [r["load_imbalance_per_layer"][l] for r in rows], lw=1,
                 label=f"layer {l}")
    ax2.axhline(1.0, color="gray", ls=":", lw=1)
    ax2.set_xlabel("step"); ax2.set_ylabel("max / mean tokens per expert")
    ax2.set_title("expert load"); ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
