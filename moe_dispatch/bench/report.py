"""Output of a benchmark run: the stdout table, the JSON file, the PNG chart, the ratios.

Also runnable on its own to re-render a saved run (e.g. on a machine with matplotlib):
``python -m moe_dispatch.bench.report RUN.json [--plot RUN.png]``.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import List, Optional

SCHEMA = "moe_dispatch.bench/1"

# Which reference each of our rows is compared with, in the order the goals name them.
REFERENCES = (
    ("deepep-direct+permute", "DeepEP Buffer direct + permute"),
    ("deepep-direct", "DeepEP Buffer direct"),
    ("megatron-a2a", "Megatron-Core alltoall"),
)
NATIVE = "nvshmem"
# --budget's MoELayer rows: their layer time includes token_dispatcher's router, which no
# reference row runs, so they get no ratio.
MOELAYER_SUFFIXES = ("-layer-eager", "-layer-graph")


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = int(fmt.split(".")[0] or 0)
        return "-".rjust(width)  # keeps the columns aligned
    return format(v, fmt)


SPREAD_NOTE = 1.15  # p90/p10 above which a timed phase is listed as noisy


def spread(samples: List[float]) -> Optional[float]:
    """p90 / p10 of one rank's samples (nearest rank), or None with fewer than 5."""
    if len(samples) < 5:
        return None
    v = sorted(samples)
    lo, hi = (v[round(q * (len(v) - 1))] for q in (0.1, 0.9))
    return hi / lo if lo > 0 else None


def noisy(rows: List[dict], limit: float = SPREAD_NOTE) -> List[str]:
    """One line per (row, phase) whose worst rank has p90/p10 over ``limit``."""
    out = []
    for r in rows:
        for key in ("dispatch_us", "combine_us", "layer_ms"):
            per_rank = (r.get("samples") or {}).get(key)
            if not per_rank:
                continue
            worst = [(spread(s), k) for k, s in enumerate(per_rank)]
            worst = [w for w in worst if w[0] is not None]
            if worst:
                sp, k = max(worst)
                if sp > limit:
                    out.append(f"  {r['name']} {key.split('_')[0]}: p90/p10 = {sp:.2f} "
                               f"(rank {k})")
    return out


def ratios(rows: List[dict]) -> List[dict]:
    """Speed-ups of our backends over the references: reference time / our time (> 1 means
    ours is faster), per phase, only where both rows have numbers."""
    by = {r["name"]: r for r in rows if r.get("status") == "ok"}
    out = []
    for r in rows:
        if r.get("kind") != "backend" or r.get("status") != "ok" or r.get("fp8") \
                or r["name"].endswith(MOELAYER_SUFFIXES):
            continue
        for ref_name, label in REFERENCES:
            ref = by.get(ref_name)
            if ref is None:
                continue
            item = {"ours": r["name"], "ref": ref_name, "label": f"{r['name']} vs {label}"}
            for key in ("dispatch_us", "combine_us", "layer_ms"):
                a, b = r.get(key), ref.get(key)
                if a and b:
                    item[key.split("_")[0]] = b / a
            if len(item) > 3:
                if r["name"] == NATIVE and ref_name.startswith("deepep"):
                    item["label"] = f"native ({NATIVE}) vs {label}"
                out.append(item)
    return out


def budget_alarms(rows: List[dict]) -> List[dict]:
    """The budget rows whose dispatch status was nonzero (rows dropped, bad input): their
    numbers time a dispatch that lost rows."""
    return [dict(name=r["name"], budget_rows=r.get("budget_rows"), status=r["budget_status"],
                 text=r.get("budget_status_text", ""),
                 per_rank=(r.get("per_rank") or {}).get("budget_status"))
            for r in rows if r.get("budget_status")]


def table(result: dict) -> str:
    """The human-readable table (what rank 0 prints)."""
    cfg = result["config"]
    sh = cfg["shape"]
    lines = [
        f"moe_dispatch.bench  {cfg['world_size']} ranks ({cfg['num_nodes']} node(s)) on "
        f"{cfg['device_name']}  |  {cfg.get('preset') or 'custom'}: T={sh['tokens']}/rank H={sh['hidden']} K={sh['topk']} "
        f"E={sh['experts']} {sh['routing']} {sh['dtype']}  |  iters={cfg['iters']} "
        f"warmup={cfg['warmup']} sets={cfg['num_sets']}",
        f"rows received per rank (distinct token x rank pairs, local included): "
        f"{result['routing']['rows_recv']:.0f}  (a token reaches "
        f"{result['routing']['ranks_per_token']:.2f} ranks; {result['routing']['expert_rows']} "
        f"token-expert pairs per rank)",
    ]
    if result.get("complete") is False:
        lines.append("INCOMPLETE: the run stopped before every row was measured "
                     "(the rows below are those finished)")
    hdr = (f"{'path':<26}{'kind':<10}{'check':<9}{'dispatch us':>12}{'host us':>9}{'GB/s':>8}"
           f"{'combine us':>12}{'host us':>9}{'GB/s':>8}{'layer ms':>10}{'host ms':>9}"
           f"{'tok/s/GPU':>12}  note")
    lines += [hdr, "-" * len(hdr)]
    for r in result["rows"]:
        name = r["name"] + (" [fp8]" if r.get("fp8") and "fp8" not in r["name"] else "")
        if r["status"] != "ok":
            lines.append(f"{name:<26}{r['kind']:<10}{r['check']:<9}  {r['status']}: {r['reason']}")
            continue
        note = r.get("note", "")
        if r.get("budget_status"):
            note = f"!!! STATUS {r['budget_status']} ({r.get('budget_status_text', '')}) " + note
        lines.append(
            f"{name:<26}{r['kind']:<10}{r['check']:<9}{_num(r['dispatch_us'], '12.1f')}"
            f"{_num(r.get('dispatch_host_us'), '9.1f')}"
            f"{_num(r['dispatch_gbps'], '8.1f')}{_num(r['combine_us'], '12.1f')}"
            f"{_num(r.get('combine_host_us'), '9.1f')}"
            f"{_num(r['combine_gbps'], '8.1f')}{_num(r['layer_ms'], '10.2f')}"
            f"{_num(r.get('layer_host_ms'), '9.2f')}"
            f"{_num(r['layer_tokens_per_s'], '12.0f')}  {note}")
    lines.append("(host us / host ms: time the host spends inside the call, median, no sync; "
                 + ("the other times are CUDA-event times)" if cfg.get("device") == "cuda"
                    else "on the CPU it is the call's time itself)"))
    alarms = budget_alarms(result["rows"])
    if alarms:
        lines.append("")
        lines.append("!!! BUDGET STATUS NONZERO: these budget rows dropped rows (or saw bad "
                     "input); their numbers time a dispatch that lost rows. Raise --budget-rows.")
        for a in alarms:
            lines.append(f"!!!   {a['name']}: status {a['status']} ({a['text']}), "
                         f"B={a['budget_rows']}, per rank {a['per_rank']}")
    if any(r["name"].endswith("-layer-graph") and r["status"] == "ok" for r in result["rows"]):
        lines.append("")
        lines.append("NOTE: the *-layer-graph rows run MoELayer captured as CUDA graphs "
                     "(capture_layers), which is EXPERIMENTAL: a time, not a check (the "
                     "gradients are compared with eager by "
                     "benchmarks/scripts/graph_grad_check.py). The *-layer-eager/-graph rows run "
                     "token_dispatcher's MoELayer (its router included), so compare them with "
                     "each other, not with the other layer column.")
    spread_lines = noisy(result["rows"])
    if spread_lines:
        lines.append("")
        lines.append(f"noisy phases (per-iteration p90/p10 > {SPREAD_NOTE}; a single run's ratio "
                     "is then less certain: compare several runs; samples are in the JSON):")
        lines += spread_lines
    rat = result.get("ratios") or []
    if rat:
        lines.append("")
        lines.append("speed-up (reference time / ours; > 1 = ours faster):")
        for it in rat:
            parts = [f"{k} {it[k]:.2f}x" for k in ("dispatch", "combine", "layer") if k in it]
            lines.append(f"  {it['label']:<52} " + "  ".join(parts))
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def plot(result: dict, path: str) -> Optional[str]:
    """Write a PNG bar chart; return None, or a message saying why no chart was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return ("no chart: matplotlib is not installed (pip install 'moe-dispatch[plot]'); "
                f"re-render later with python -m moe_dispatch.bench.report RUN.json --plot {path}")
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    cfg, sh = result["config"], result["config"]["shape"]
    fig, axes = plt.subplots(1, 3, figsize=(16, max(3.0, 0.45 * len(rows) + 1.5)))
    names = [r["name"] + (" [fp8]" if r.get("fp8") and "fp8" not in r["name"] else "") for r in rows]
    ypos = list(range(len(rows)))
    for ax, key, title in ((axes[0], "dispatch_us", "dispatch (µs, lower is better)"),
                           (axes[1], "combine_us", "combine (µs, lower is better)"),
                           (axes[2], "layer_tokens_per_s", "layer fwd+bwd (tokens/s per GPU)")):
        vals = [r.get(key) or 0.0 for r in rows]
        colors = ["tab:blue" if r["kind"] == "backend" else "tab:gray" for r in rows]
        ax.barh(ypos, vals, color=colors)
        ax.set_yticks(ypos)
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(rows))
        ax.invert_yaxis()
        if any(vals):
            ax.set_xlim(0, max(vals) * 1.35)   # room for the value labels
        ax.set_title(title, fontsize=10)
        for y, v, r in zip(ypos, vals, rows):
            gb = r.get(key.replace("_us", "_gbps")) if key.endswith("_us") else None
            if v:
                ax.text(v, y, f" {v:.0f}" + (f" ({gb:.0f} GB/s)" if gb else ""), va="center",
                        fontsize=7)
    fig.suptitle(f"{cfg['world_size']}x {cfg['device_name']}: T={sh['tokens']}/rank "
                 f"H={sh['hidden']} top-{sh['topk']} of {sh['experts']} experts, "
                 f"{sh['routing']}, {sh['dtype']}  (blue: ours, gray: references)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Re-render a saved benchmark run.")
    ap.add_argument("json", help="a JSON file written by python -m moe_dispatch.bench --json")
    ap.add_argument("--plot", help="write the PNG chart here")
    a = ap.parse_args(argv)
    with open(a.json) as f:
        result = json.load(f)
    if result.get("schema") != SCHEMA:
        raise SystemExit(f"{a.json}: not a {SCHEMA} file")
    print(table(result))
    if a.plot:
        msg = plot(result, a.plot)
        print(msg or f"chart written to {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
