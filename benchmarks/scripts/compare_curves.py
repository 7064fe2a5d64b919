"""Compare the loss curves of two or more ``moe-train`` runs (their ``metrics.jsonl``).

    python benchmarks/scripts/compare_curves.py BASE/metrics.jsonl OTHER/metrics.jsonl ... \
        [--labels bf16,fp8] [--last 100] [--tol 0.02] [--json OUT.json]

The first file is the baseline. Printed: the loss of every run at each step all runs logged,
each other run's relative difference from the baseline there, ``(loss - base) / base``;
then per run the largest and the mean |relative difference| over all those steps and over
the last ``--last`` steps, the signed mean over the last steps (a bias shows there), the
final loss and the median tokens/s. ``--json`` writes all of it. ``--tol X``: a verdict per
run, whether it stays within X (relative) of the baseline at every common step; the exit
code is 1 when one does not (2: unreadable input). A rerun of the baseline's command as a
third file shows the run-to-run spread the other runs' differences compare with.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

Curve = Dict[int, dict]  # step -> that step's metrics row


def read_metrics(path: str) -> Curve:
    """step -> row of a ``metrics.jsonl`` (one JSON object per logged step, with at least
    ``step`` and ``loss``). Raises ``ValueError`` naming the file for anything else."""
    rows: Curve = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row  # a later line of a step wins (as moe-train's)
                float(row["loss"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a metrics row with step and loss "
                                 f"({type(exc).__name__}: {exc})") from None
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def default_labels(paths: List[str]) -> List[str]:
    """A label per file: its folder's name (moe-train writes OUT/metrics.jsonl), else its
    file name; made unique with the file's position where two agree."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) or os.path.basename(p)
             for p in paths]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def median_tokens_per_s(curve: Curve) -> Optional[float]:
    """Median tokens/s over the logged steps after the first (whose interval includes the
    start-up: first calls, allocations, compilation); None if no row has it."""
    steps = sorted(curve)
    rows = [curve[s] for s in (steps[1:] if len(steps) > 1 else steps)]
    vals = [float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s") is not None]
    return statistics.median(vals) if vals else None


def _abs_stats(rel: Dict[int, float], steps: List[int]) -> dict:
    vals = [rel[s] for s in steps]
    return dict(max_abs=max(abs(v) for v in vals), mean_abs=sum(abs(v) for v in vals) / len(vals),
                mean=sum(vals) / len(vals))


def compare(curves: Dict[str, Curve], last: int, tol: Optional[float] = None) -> dict:
    """The comparison of ``curves`` (label -> curve, the first one the baseline).

    curves: at least two; compared on the steps every one of them logged.
    last:   the window "last steps": common steps s with s > (last common step - last).
    tol:    if given, each run's ``within_tol`` says whether its |relative difference|
            stays <= tol at every common step, and the top-level one whether all do.
    Returns a JSON-able dict: baseline, steps, last_window_from, loss {label: [...]},
    runs {label: {rel_diff [...], all {max_abs, mean_abs, mean}, last {...}, final_loss,
    median_tokens_per_s, within_tol}}, and tol / within_tol when tol is given.
    """
    labels = list(curves)
    if len(labels) < 2:
        raise ValueError("compare needs at least two curves")
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not steps:
        raise ValueError(f"the runs {labels} have no logged step in common")
    window = [s for s in steps if s > steps[-1] - last] or steps[-1:]
    base = curves[labels[0]]
    out = dict(baseline=labels[0], steps=steps, last_window_from=window[0],
               loss={k: [float(c[s]["loss"]) for s in steps] for k, c in curves.items()},
               runs={})
    for label, curve in curves.items():
        run = dict(final_loss=float(curve[max(curve)]["loss"]),
                   median_tokens_per_s=median_tokens_per_s(curve))
        if label != labels[0]:
            b = {s: float(base[s]["loss"]) for s in steps}
            rel = {s: (float(curve[s]["loss"]) - b[s]) / b[s] for s in steps}
            run.update(rel_diff=[rel[s] for s in steps], all=_abs_stats(rel, steps),
                       last=_abs_stats(rel, window))
        out["runs"][label] = run
    if tol is not None:
        out["tol"] = tol
        for label in labels[1:]:
            run = out["runs"][label]
            run["within_tol"] = run["all"]["max_abs"] <= tol
        out["within_tol"] = all(out["runs"][k]["within_tol"] for k in labels[1:])
    return out


def format_report(res: dict) -> str:
    """The printed table and summary of a ``compare`` result."""
    labels = list(res["loss"])
    others = labels[1:]
    w = max(10, *(len(k) + 2 for k in labels))
    head = f"{'step':>6}" + "".join(f"{k:>{w}}" for k in labels) + \
        "".join(f"{'rel ' + k:>{w + 4}}" for k in others)
    lines = [f"loss per step (relative difference from {res['baseline']})", head]
    for i, s in enumerate(res["steps"]):
        lines.append(f"{s:>6}" + "".join(f"{res['loss'][k][i]:>{w}.4f}" for k in labels)
                     + "".join(f"{res['runs'][k]['rel_diff'][i]:>+{w + 4}.3%}" for k in others))
    lines.append("")
    lines.append(f"{'run':<{w}} {'final loss':>10} {'tok/s (median)':>15} "
                 f"{'max|rel| all':>13} {'mean|rel| all':>14} "
                 f"{'max|rel| last':>14} {'mean|rel| last':>15} {'mean rel last':>14}")
    for k in labels:
        r = res["runs"][k]
        tps = "-" if r["median_tokens_per_s"] is None else f"{r['median_tokens_per_s']:,.0f}"
        stats = "" if "all" not in r else (
            f" {r['all']['max_abs']:>13.3%} {r['all']['mean_abs']:>14.3%} "
            f"{r['last']['max_abs']:>14.3%} {r['last']['mean_abs']:>15.3%} "
            f"{r['last']['mean']:>+14.3%}")
        lines.append(f"{k:<{w}} {r['final_loss']:>10.4f} {tps:>15}{stats}")
    lines.append(f"(last = common steps {res['last_window_from']}-{res['steps'][-1]})")
    for k in others if "tol" in res else []:
        lines.append(f"verdict: {k} within {res['tol']:.2%} of {res['baseline']} at every "
                     f"common step: {'yes' if res['runs'][k]['within_tol'] else 'NO'}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files; the first is the baseline")
    ap.add_argument("--labels", help="comma-separated run names (default: each file's folder)")
    ap.add_argument("--last", type=int, default=100,
                    help="steps at the end summarised separately (default 100)")
    ap.add_argument("--tol", type=float,
                    help="relative tolerance for the verdict (exit 1 when exceeded)")
    ap.add_argument("--json", help="write the comparison here as JSON")
    args = ap.parse_args(argv)
    if len(args.metrics) < 2:
        ap.error("give at least two metrics.jsonl files")
    labels = args.labels.split(",") if args.labels else default_labels(args.metrics)
    if len(labels) != len(args.metrics) or len(set(labels)) != len(labels):
        ap.error(f"--labels needs {len(args.metrics)} distinct names, got {labels}")
    try:
        curves = {k: read_metrics(p) for k, p in zip(labels, args.metrics)}
        res = compare(curves, args.last, args.tol)
    except (OSError, ValueError) as exc:
        print(f"compare_curves: error: {exc}", file=sys.stderr)
        return 2
    res["files"] = dict(zip(labels, args.metrics))
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if res.get("within_tol") is False else 0


if __name__ == "__main__":
    sys.exit(main())
