"""Compare the loss curves of two or more ``moe-train`` runs (their ``metrics.jsonl``).

    python benchmarks/scripts/compare_curves.py BASE/metrics.jsonl OTHER/metrics.jsonl ... \
        [--labels bf16,fp8] [--last 100] [--tol 0.02] [--json OUT.json] [--groups 3,3]

The first file is the baseline. Printed: the loss of every run at each step all runs logged,
each other run's relative difference from the baseline there, ``(loss - base) / base``;
then per run the largest and the mean |relative difference| over all those steps and over
the last ``--last`` steps, the signed mean over the last steps (a bias shows there), the
final loss and the median tokens/s. ``--json`` writes all of it. ``--tol X``: a verdict per
run, whether it stays within X (relative) of the baseline at every common step; the exit
code is 1 when one does not (2: unreadable input). A rerun of the baseline's command as a
third file shows the run-to-run spread the other runs' differences compare with.

``--groups N1,N2,...``: the files are repeated runs, taken in consecutive groups of those
sizes (the first group the baseline); each group is compared as one curve, its per-step
mean loss (median tokens/s), labelled by ``--labels`` (one name per group). Printed as well:
how far each run of the baseline group lies from that group's mean (the spread a single run
has, against which the groups' difference reads).
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


def mean_curve(runs: List[Curve]) -> Curve:
    """One curve from repeated runs: at every step all of them logged, the mean loss and
    the median tokens/s (None where no run has it)."""
    steps = sorted(set.intersection(*(set(c) for c in runs)))
    if not steps:
        raise ValueError("the runs of a group have no logged step in common")
    out: Curve = {}
    for s in steps:
        tps = [float(c[s]["tokens_per_s"]) for c in runs
               if c[s].get("tokens_per_s") is not None]
        out[s] = dict(step=s, loss=sum(float(c[s]["loss"]) for c in runs) / len(runs),
                      tokens_per_s=statistics.median(tps) if tps else None)
    return out


def group_spread(runs: Dict[str, Curve], last: int) -> dict:
    """Each run of a group against the group's mean curve: label -> {all, last} stats of
    the relative difference (as ``compare``'s runs)."""
    labels = list(runs)
    res = compare({"mean": mean_curve(list(runs.values())), **runs}, last)
    return {k: {"all": res["runs"][k]["all"], "last": res["runs"][k]["last"]} for k in labels}


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
    ap.add_argument("--groups", help="sizes of consecutive groups of repeated runs, e.g. 3,3 "
                    "(each group compared as its mean curve)")
    args = ap.parse_args(argv)
    if len(args.metrics) < 2:
        ap.error("give at least two metrics.jsonl files")
    sizes = _group_sizes(ap, args)
    n_curves = len(sizes) if sizes else len(args.metrics)
    labels = args.labels.split(",") if args.labels else (
        [f"group{i}" for i in range(n_curves)] if sizes else default_labels(args.metrics))
    if len(labels) != n_curves or len(set(labels)) != len(labels):
        ap.error(f"--labels needs {n_curves} distinct names, got {labels}")
    try:
        runs = [read_metrics(p) for p in args.metrics]
        spread = None
        if sizes:
            groups = _split(runs, sizes)
            curves = {k: mean_curve(g) for k, g in zip(labels, groups)}
            spread = group_spread({f"{labels[0]}#{i}": c for i, c in enumerate(groups[0])},
                                  args.last) if sizes[0] > 1 else None
        else:
            curves = dict(zip(labels, runs))
        res = compare(curves, args.last, args.tol)
    except (OSError, ValueError) as exc:
        print(f"compare_curves: error: {exc}", file=sys.stderr)
        return 2
    res["files"] = args.metrics if sizes else dict(zip(labels, args.metrics))
    if sizes:
        res["groups"] = dict(zip(labels, sizes))
        res["baseline_spread"] = spread
    print(format_report(res))
    if spread:
        print(f"runs of {labels[0]} against their mean:")
        for k, v in spread.items():
            print(f"  {k}: max|rel| all {v['all']['max_abs']:.3%}, mean|rel| all "
                  f"{v['all']['mean_abs']:.3%}, mean|rel| last {v['last']['mean_abs']:.3%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if res.get("within_tol") is False else 0


def _group_sizes(ap, args) -> Optional[List[int]]:
    if not args.groups:
        return None
    try:
        sizes = [int(v) for v in args.groups.split(",")]
    except ValueError:
        ap.error(f"--groups takes comma-separated sizes, got {args.groups!r}")
    if len(sizes) < 2 or min(sizes) < 1 or sum(sizes) != len(args.metrics):
        ap.error(f"--groups {args.groups}: at least two groups of at least one run, "
                 f"{len(args.metrics)} files in all")
    return sizes


def _split(runs: List[Curve], sizes: List[int]) -> List[List[Curve]]:
    out, start = [], 0
    for n in sizes:
        out.append(runs[start:start + n])
        start += n
    return out


if __name__ == "__main__":
    sys.exit(main())
