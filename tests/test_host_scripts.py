"""The CPU host-time scripts (``benchmarks/scripts/host_python_cpu.py``, ``launch_key_cpu.py``)
keep working as the package changes: the device runs call them on the GPU host's CPU.

Two source trees (a copy of this one and this one) load side by side, each from its own
folder, every launch replays what was recorded (the script raises when a call replays a
different number of launches), and the step timers and the launch-cache figure come out.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from triton_mode import needs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "benchmarks", "scripts")

pytestmark = needs_triton


def _copy_tree(tmp_path):
    tree = tmp_path / "tree"
    for pkg in ("moe_dispatch", "token_dispatcher"):
        shutil.copytree(os.path.join(ROOT, pkg), tree / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return str(tree)


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_host_python_cpu_two_trees_and_steps(tmp_path):
    copy = _copy_tree(tmp_path)
    out = tmp_path / "hp.json"
    _run([os.path.join(SCRIPTS, "host_python_cpu.py"), "--backends", "alltoall",
          "--modes", "exact", "--iters", "3", "--sections", "--trees", f"{copy},{ROOT}",
          "--json", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert set(res["packages"]) == {copy, ROOT}
    for tree, pkg in res["packages"].items():
        assert pkg == os.path.join(tree, "moe_dispatch", "kernels")
    runs = res["results"]["alltoall-exact"]
    # Same code in both trees: the same launches replayed.
    assert runs[copy]["launches"] == runs[ROOT]["launches"] >= 4
    for r in runs.values():
        assert r["dispatch"]["median"] > 0 and r["combine"]["median"] > 0
    for steps in res["alltoall_exact_steps"].values():
        assert {"read_tables", "pack_rows", "exact_receive_plan",
                "AllToAllBackend.dispatch (all)"} <= set(steps)
        assert steps["read_tables"]["median"] < steps["AllToAllBackend.dispatch (all)"]["median"]


def test_launch_key_cpu(tmp_path):
    out = tmp_path / "lk.json"
    text = _run([os.path.join(SCRIPTS, "launch_key_cpu.py"), "--iters", "200", "--rounds", "1",
                 "--json", str(out)], tmp_path)
    res = json.loads(out.read_text())["per_launch_us"]
    assert list(res) == ["installed"] and res["installed"]["median"] > 0
    assert "per cached launch" in text


@pytest.mark.parametrize("script", ["host_python_cpu.py", "launch_key_cpu.py"])
def test_scripts_refuse_a_tree_without_the_package(tmp_path, script):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), "--trees",
                        str(tmp_path), "--iters", "1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "loaded from elsewhere" in r.stderr
