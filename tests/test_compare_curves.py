"""benchmarks/scripts/compare_curves.py on small synthetic metrics.jsonl files."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "compare_curves", REPO / "benchmarks" / "scripts" / "compare_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cc = _module()

STEPS = [1, 10, 20, 30, 40, 50]
BASE = [5.0, 4.0, 3.0, 2.5, 2.0, 1.6]


def _write(path: Path, losses, steps=STEPS, tps=None):
    """A moe-train-like metrics.jsonl: step, loss, tokens/s (the first step's is slow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tps = tps or [100.0] + [1000.0 + 10 * i for i in range(len(steps) - 1)]
    with open(path, "w") as f:
        for s, l, t in zip(steps, losses, tps):
            f.write(json.dumps({"step": s, "loss": l, "aux_loss": 0.01,
                                "tokens_per_s": t}) + "\n")
    return str(path)


def test_relative_differences_and_windows(tmp_path):
    rel = [0.0, 0.01, -0.02, 0.005, 0.01, 0.015]
    base = _write(tmp_path / "bf16" / "metrics.jsonl", BASE)
    other = _write(tmp_path / "fp8" / "metrics.jsonl",
                   [b * (1 + r) for b, r in zip(BASE, rel)])
    curves = {k: cc.read_metrics(p) for k, p in zip(cc.default_labels([base, other]),
                                                      [base, other])}
    assert list(curves) == ["bf16", "fp8"]
    res = cc.compare(curves, last=25)
    run = res["runs"]["fp8"]
    assert res["steps"] == STEPS and res["baseline"] == "bf16"
    assert run["rel_diff"] == pytest.approx(rel)
    assert run["all"]["max_abs"] == pytest.approx(0.02)
    assert run["all"]["mean_abs"] == pytest.approx(sum(abs(r) for r in rel) / 6)
    # last 25 steps of 50: steps 30, 40, 50
    assert res["last_window_from"] == 30
    assert run["last"]["max_abs"] == pytest.approx(0.015)
    assert run["last"]["mean"] == pytest.approx((0.005 + 0.01 + 0.015) / 3)
    assert run["final_loss"] == pytest.approx(1.6 * 1.015)
    # the first logged step's tokens/s (start-up) is left out of the median
    assert run["median_tokens_per_s"] == pytest.approx(1020.0)
    assert "rel_diff" not in res["runs"]["bf16"]


def test_only_common_steps_are_compared(tmp_path):
    a = cc.read_metrics(_write(tmp_path / "a.jsonl", BASE))
    b = cc.read_metrics(_write(tmp_path / "b.jsonl", [4.0, 2.5, 1.6], steps=[10, 30, 50]))
    res = cc.compare({"a": a, "b": b}, last=100)
    assert res["steps"] == [10, 30, 50] and res["runs"]["b"]["all"]["max_abs"] == 0.0
    with pytest.raises(ValueError, match="no logged step in common"):
        cc.compare({"a": a, "c": cc.read_metrics(_write(tmp_path / "c.jsonl", [1.0],
                                                         steps=[7]))}, last=10)


def test_cli_prints_writes_json_and_judges_the_tolerance(tmp_path, capsys):
    base = _write(tmp_path / "bf16" / "metrics.jsonl", BASE)
    near = _write(tmp_path / "fp8" / "metrics.jsonl", [b * 1.01 for b in BASE])
    far = _write(tmp_path / "far" / "metrics.jsonl", [b * 1.05 for b in BASE])
    out = tmp_path / "cmp.json"
    assert cc.main([base, near, "--tol", "0.02", "--last", "20", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bf16" in text and "fp8" in text and "+1.000%" in text and "verdict" in text
    res = json.loads(out.read_text())
    assert res["within_tol"] is True and res["files"]["fp8"] == near
    assert res["runs"]["fp8"]["within_tol"] is True
    assert res["runs"]["fp8"]["last"]["max_abs"] == pytest.approx(0.01)
    # three runs, one off by 5 %: the verdict fails, exit code 1
    assert cc.main([base, near, far, "--labels", "b,n,f", "--tol", "0.02"]) == 1
    text = capsys.readouterr().out
    assert "n within 2.00% of b at every common step: yes" in text
    assert "f within 2.00% of b at every common step: NO" in text
    # without --tol there is no verdict and the exit code is 0
    assert cc.main([base, far]) == 0


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    good = _write(tmp_path / "a.jsonl", BASE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n')
    assert cc.main([good, str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert cc.main([good, str(tmp_path / "missing.jsonl")]) == 2
    with pytest.raises(SystemExit):
        cc.main([good, good, "--labels", "x,x"])


def test_reads_a_real_moe_train_metrics_file():
    """The format moe-train writes (a recorded GPU run)."""
    path = REPO / "benchmarks" / "runs" / "2026-11-26" / "train_gpu_alltoall_metrics.jsonl"
    curve = cc.read_metrics(str(path))
    res = cc.compare({"a": curve, "b": curve}, last=50)
    assert res["runs"]["b"]["all"]["max_abs"] == 0.0
    assert res["runs"]["a"]["median_tokens_per_s"] > 0


def test_groups_compare_mean_curves_and_report_the_baseline_spread(tmp_path, capsys):
    # Two baseline runs at BASE * (1 -/+ 4 %) average to BASE; the other group sits 1 % above.
    lo = [b * 0.96 for b in BASE]
    hi = [b * 1.04 for b in BASE]
    other = [b * 1.01 for b in BASE]
    files = [_write(tmp_path / n / "metrics.jsonl", v)
             for n, v in (("a", lo), ("b", hi), ("c", other), ("d", other))]
    out_json = tmp_path / "cmp.json"
    rc = cc.main(files + ["--groups", "2,2", "--labels", "bf16,fp8", "--tol", "0.02",
                          "--json", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert res["loss"]["bf16"] == pytest.approx(BASE)
    assert res["runs"]["fp8"]["all"]["max_abs"] == pytest.approx(0.01)
    # Each baseline run lies 4 % from the baseline mean.
    assert res["baseline_spread"]["bf16#0"]["all"]["max_abs"] == pytest.approx(0.04)
    assert res["groups"] == {"bf16": 2, "fp8": 2}
    assert "runs of bf16 against their mean" in capsys.readouterr().out
    # A group 3 % off fails a 2 % tolerance.
    far = [_write(tmp_path / f"e{i}" / "metrics.jsonl", [b * 1.03 for b in BASE])
           for i in range(2)]
    assert cc.main(files[:2] + far + ["--groups", "2,2", "--tol", "0.02"]) == 1


def test_groups_must_cover_the_files(tmp_path, capsys):
    files = [_write(tmp_path / n / "metrics.jsonl", BASE) for n in "abc"]
    with pytest.raises(SystemExit):
        cc.main(files + ["--groups", "2,2"])
    assert "--groups" in capsys.readouterr().err
