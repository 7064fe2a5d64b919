"""The benchmark CLI (CPU smoke run with real gloo ranks), its byte count and the auto rule."""
from __future__ import annotations

import json
import statistics
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dispatch.auto import Topology, rule
from moe_dispatch.bench import workload as wl
from moe_dispatch.bench.report import ratios

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ bytes

def _pairs_by_loops(idx, num_experts, ep_size):
    """Independent count: for every token, the set of ranks owning one of its experts."""
    per_rank = num_experts // ep_size
    sent = [0] * ep_size
    for row in idx.tolist():
        for r in {e // per_rank for e in row if e >= 0}:
            sent[r] += 1
    return sent


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_rows_sent_matches_loops(ep_size):
    E, K, T = 16, 5, 97
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[torch.rand(T, K) < 0.2] = -1                      # masked slots
    idx[3] = -1                                           # a token routed nowhere
    got = wl.rows_sent_per_rank(idx, E, ep_size)
    assert got.tolist() == _pairs_by_loops(idx, E, ep_size)
    assert got.sum() <= (idx >= 0).sum()                  # never more than expert rows


def test_rows_received_is_column_sum_and_counts_local_rows():
    # 3 ranks, each sends to every rank including itself.
    R, E, T, K = 3, 6, 11, 2
    sends = []
    for r in range(R):
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        sends.append(wl.rows_sent_per_rank(idx, E, R))
    sent_RR = torch.stack(sends)
    recv = wl.rows_received(sent_RR)
    for dst in range(R):
        assert recv[dst] == sum(int(sends[src][dst]) for src in range(R))
    assert recv.sum() == sent_RR.sum()


def test_same_expert_rank_counts_once_and_bytes():
    # Token 0: experts 0, 1 (both on rank 0) -> one row to rank 0; token 1: experts 1, 2
    # (ranks 0 and 1) -> a row to each; token 2: fully masked -> nothing.
    idx = torch.tensor([[0, 1], [1, 2], [-1, -1]])
    assert wl.rows_sent_per_rank(idx, 4, 2).tolist() == [2, 1]
    assert wl.bytes_per_row(7168, 2) == 7168 * 2
    # DeepEP's FP8 factor: (1 + 4/128) / 2 of the BF16 bytes.
    assert wl.bytes_per_row(7168, 2, fp8=True) == pytest.approx(7168 * 2 * (1 + 4 / 128) / 2)
    assert wl.gbps(1000, 7168, 2, 1e-3) == pytest.approx(1000 * 7168 * 2 / 1e-3 / 1e9)


def test_anchor_byte_count_at_deepep_shape():
    """anchors.md: at EP4, 4096 tokens, top-8 of 256, a token reaches ~3.6 ranks."""
    shape = wl.Shape(**wl.SHAPES["deepep"])
    idx, probs = wl.make_routing(shape, rank=0, seed=1)
    assert idx.shape == (4096, 8) and probs.shape == (4096, 8)
    assert all(len(set(r)) == 8 for r in idx[:64].tolist())        # distinct experts
    assert torch.allclose(probs.sum(1), torch.ones(4096))
    per_token = wl.rows_sent_per_rank(idx, 256, 4).sum().item() / 4096
    assert 3.5 < per_token < 3.7


def test_zipf_is_skewed_but_spread_over_ranks():
    shape = wl.Shape(tokens=2048, hidden=8, topk=4, experts=32, routing="zipf")
    idx, _ = wl.make_routing(shape, rank=0, seed=3)
    counts = torch.bincount(idx.flatten(), minlength=32).float()
    assert counts.max() > 4 * counts.median()
    idx1, _ = wl.make_routing(shape, rank=1, seed=3)
    # Same popularity on every rank (shared permutation), different draws.
    assert counts.argmax() == torch.bincount(idx1.flatten(), minlength=32).argmax()
    assert not torch.equal(idx, idx1)


# ------------------------------------------------------------------------------ auto rule

AV = "available"


def _avail(*names):
    allb = ("alltoall", "allgather", "deepep", "hybridep", "uccl", "nvshmem")
    return {n: (AV if n in names else "not installed") for n in allb}


@pytest.mark.parametrize("topo, want", [
    (Topology("cpu", 4, available=_avail("alltoall", "allgather")), "alltoall"),
    (Topology("cpu", 4, available=_avail("alltoall", "deepep", "nvshmem")), "alltoall"),
    (Topology("cuda", 4, 1, 4, True, available=_avail("alltoall", "deepep", "nvshmem")), "nvshmem"),
    (Topology("cuda", 4, 1, 4, True, available=_avail("alltoall", "deepep")), "deepep"),
    (Topology("cuda", 4, 1, 4, None, available=_avail("alltoall", "deepep")), "deepep"),
    (Topology("cuda", 4, 1, 4, True, available=_avail("alltoall", "allgather")), "alltoall"),
    (Topology("cuda", 4, 1, 4, False, available=_avail("alltoall", "deepep", "nvshmem")), "alltoall"),
    (Topology("cuda", 16, 2, 8, True, True, available=_avail("alltoall", "deepep", "nvshmem")), "deepep"),
    (Topology("cuda", 16, 2, 8, True, False, available=_avail("alltoall", "deepep", "nvshmem")), "alltoall"),
    (Topology("cuda", 16, 2, 8, True, True, available=_avail("alltoall")), "alltoall"),
    (Topology("cuda", 1, 1, 1, True, available=_avail("alltoall", "deepep", "nvshmem")), "alltoall"),
])
def test_auto_rule(topo, want):
    name, why = rule(topo)
    assert name == want
    assert why and isinstance(why, str)
    assert topo.available.get(name) == AV or name == "alltoall"


def test_auto_rule_never_picks_an_unavailable_backend():
    names = ("alltoall", "allgather", "deepep", "hybridep", "uccl", "nvshmem")
    rng = random.Random(0)
    for _ in range(200):
        chosen = {n for n in names if rng.random() < 0.5} | {"alltoall"}
        topo = Topology(rng.choice(["cpu", "cuda"]), rng.choice([1, 2, 4, 8, 16]),
                        rng.choice([1, 2]), 8, rng.choice([True, False, None]),
                        rng.choice([True, False]), _avail(*chosen))
        name, _ = rule(topo)
        assert name in chosen


def _facts(host, lws, avail, peer=True, internode=True, gpus=8):
    return dict(host=host, gpus=gpus, local_world=lws, peer=peer, available=avail,
                deepep_internode=internode)


def test_combine_facts_nodes_and_peer_access():
    from moe_dispatch.auto import combine_facts
    av = _avail("alltoall", "deepep", "nvshmem")
    # 16 ranks on two hosts: two nodes; fused intranode kernels are out, DeepEP internode in.
    facts = [_facts(f"h{r // 8}", 8, av) for r in range(16)]
    topo = combine_facts(facts, "cuda")
    assert (topo.group_size, topo.num_nodes, topo.peer_access) == (16, 2, True)
    assert rule(topo)[0] == "deepep"
    # Same hostname everywhere (containers) but LOCAL_WORLD_SIZE 8 of 16: still two nodes.
    facts = [_facts("same", 8, av) for r in range(16)]
    assert combine_facts(facts, "cuda").num_nodes == 2
    # One host; one rank saw a pair without peer access: alltoall on every rank, with why.
    facts = [_facts("h", 4, av, peer=(r != 2)) for r in range(4)]
    topo = combine_facts(facts, "cuda")
    assert topo.peer_access is False
    name, why = rule(topo)
    assert name == "alltoall" and "peer" in why
    # One GPU visible per process: peer access unknown, the fused path is still tried.
    facts = [_facts("h", 4, av, peer=None, gpus=1) for r in range(4)]
    topo = combine_facts(facts, "cuda")
    assert topo.peer_access is None and rule(topo)[0] == "nvshmem"
    # CPU group: facts about GPUs do not matter.
    assert rule(combine_facts([_facts("h", 2, av, peer=None, gpus=0)] * 2, "cpu"))[0] == "alltoall"


def test_combine_facts_backend_must_be_available_on_every_rank():
    from moe_dispatch.auto import combine_facts
    facts = [_facts("h", 2, _avail("alltoall", "deepep", "nvshmem")) for r in range(2)]
    facts[1]["available"]["nvshmem"] = "no NVSHMEM here"
    topo = combine_facts(facts, "cuda")
    assert topo.available["nvshmem"] == "no NVSHMEM here"
    assert rule(topo)[0] == "deepep"
    # A DeepEP without internode kernels on any rank rules out deepep across nodes.
    facts = [_facts(f"h{r}", 1, _avail("alltoall", "deepep"), internode=(r == 0))
             for r in range(2)]
    assert rule(combine_facts(facts, "cuda"))[0] == "alltoall"


def test_host_peer_access_uses_the_local_ranks_devices(monkeypatch):
    from moe_dispatch import auto
    asked = []
    monkeypatch.setattr(auto, "_peer_access", lambda devs: asked.append(devs) or False)
    assert auto._host_peer_access(gpus=8, local_world=4) is False and asked == [[0, 1, 2, 3]]
    assert auto._host_peer_access(gpus=1, local_world=4) is None     # not all visible
    assert auto._host_peer_access(gpus=8, local_world=1) is True     # nothing to reach


def test_choose_backend_single_process_cpu():
    from moe_dispatch.auto import choose_backend
    name, why = choose_backend(None, torch.device("cpu"))
    assert name == "alltoall" and "CPU" in why


def test_ratios_are_reference_over_ours():
    rows = [
        dict(name="nvshmem", kind="backend", status="ok", dispatch_us=400.0, combine_us=500.0,
             layer_ms=None),
        dict(name="deepep-direct", kind="reference", status="ok", dispatch_us=500.0,
             combine_us=600.0, layer_ms=None),
        dict(name="megatron-a2a", kind="reference", status="FAILED"),
    ]
    out = ratios(rows)
    assert len(out) == 1
    assert out[0]["dispatch"] == pytest.approx(1.25) and out[0]["combine"] == pytest.approx(1.2)
    assert out[0]["label"].startswith("native")


# ------------------------------------------------------------------------------ CPU smoke

def test_cpu_smoke_run_two_ranks(tmp_path):
    """The real CLI, 2 gloo ranks spawned by itself, --check on, JSON validated."""
    out = tmp_path / "run.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "moe_dispatch.bench", "--device", "cpu", "--nproc", "2",
           "--tokens", "48", "--hidden", "64", "--topk", "3", "--experts", "8",
           "--routing", "zipf", "--iters", "3", "--warmup", "1", "--ffn", "32",
           "--backends", "alltoall,allgather,deepep", "--check", "--json", str(out),
           "--timeout", "120"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["schema"] == "moe_dispatch.bench/1"
    cfg = res["config"]
    assert cfg["world_size"] == 2 and cfg["device"] == "cpu" and cfg["check"] is True
    assert cfg["shape"] == dict(tokens=48, hidden=64, topk=3, experts=8, routing="zipf",
                                dtype="fp32", zipf_s=1.2)
    assert res["complete"] is True
    # The auto rule ran on the real 2-rank gloo group (topology gathered from both ranks).
    assert cfg["auto"]["choice"] == "alltoall" and "CPU" in cfg["auto"]["reason"]
    assert cfg["auto"]["num_nodes"] == 1
    rows = {r["name"]: r for r in res["rows"]}
    for name in ("alltoall", "allgather"):
        r = rows[name]
        assert r["status"] == "ok" and r["check"] == "passed", r
        for key in ("dispatch_us", "combine_us", "dispatch_gbps", "combine_gbps", "layer_ms",
                    "layer_tokens_per_s"):
            assert r[key] is not None and r[key] > 0, (name, key, r[key])
        # GB/s is recomputable from the rows received and the per-rank medians.
        want = sum(n * 64 * 4 / (us * 1e-6) / 1e9 for n, us in
                   zip(r["per_rank"]["rows_recv"], r["per_rank"]["dispatch_us"])) / 2
        assert r["dispatch_gbps"] == pytest.approx(want, rel=1e-9)
        # Every timed iteration is kept per rank; each rank's median is the one reported.
        for key, unit in (("dispatch", "us"), ("combine", "us"), ("layer", "ms")):
            got = r["samples"][f"{key}_{unit}"]
            n = cfg["layer_iters"] if key == "layer" else cfg["iters"]
            assert len(got) == 2 and all(len(g) == n for g in got)
            assert [statistics.median(g) for g in got] == pytest.approx(
                r["per_rank"][f"{key}_{unit}"], rel=1e-3)
            assert all(t > 1e9 for t in r["samples"][f"{key}_started"])  # wall-clock stamps
    # Rows received, independently recounted from the same routing of both ranks.
    shape = wl.Shape(48, 64, 3, 8, "zipf", "fp32")
    nsets = cfg["num_sets"]
    recv = [0.0, 0.0]
    for s in range(nsets):
        sent = torch.tensor([_pairs_by_loops(wl.make_routing(shape, r, 0, s)[0], 8, 2)
                             for r in range(2)])
        for dst in range(2):
            recv[dst] += sent[:, dst].sum().item() / nsets
    assert rows["alltoall"]["per_rank"]["rows_recv"] == pytest.approx(recv)
    # Unavailable backends and CPU-less references are rows with a reason, not crashes.
    assert rows["deepep"]["status"] == "skipped" and rows["deepep"]["reason"]
    for ref in ("deepep-direct", "megatron-a2a"):
        assert rows[ref]["status"] == "skipped" and "CUDA" in rows[ref]["reason"]
    assert "alltoall" in proc.stdout and "passed" in proc.stdout


def test_check_catches_a_wrong_backend():
    """A backend that returns rows in the wrong order must fail the comparison."""
    from moe_dispatch.bench.check import Expected, compare

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tokens = torch.randn(10, 8, generator=g)
    probs = torch.rand(10, generator=g)
    tpe = torch.tensor([4, 6])
    y = torch.randn(5, 8, generator=g)
    exp = Expected(tokens, probs, tpe, y)
    assert compare(tokens, tpe, probs, y, exp, torch.float32) == []
    swapped = tokens[torch.tensor([1, 0] + list(range(2, 10)))]
    assert any("rows differ" in e for e in compare(swapped, tpe, probs, y, exp, torch.float32))
    assert any("tokens_per_expert" in e
               for e in compare(tokens, torch.tensor([5, 5]), probs, y, exp, torch.float32))
    assert any("combine" in e for e in compare(tokens, tpe, probs, y * 1.1, exp, torch.float32))


BROKEN = '''
import dataclasses
import torch
from moe_dispatch.backends.alltoall import AllToAllBackend


class SwappedRows(AllToAllBackend):
    """Fast and wrong: the first two dispatched rows trade places."""
    name = "swapped"

    def dispatch(self, x_TH, idx_TK, probs_TK, check):
        res = super().dispatch(x_TH, idx_TK, probs_TK, check)
        n = res.tokens_NH.shape[0]
        order = torch.arange(n)
        if n >= 2:
            order[0], order[1] = 1, 0
        return dataclasses.replace(res, tokens_NH=res.tokens_NH[order])
'''


def test_check_fails_a_wrong_backend_end_to_end(tmp_path):
    """A wrong backend through the real CLI (one gloo rank, torchrun-style env): it is
    reported FAILED with no numbers, the run exits non-zero, alltoall still gets numbers."""
    (tmp_path / "broken_backend.py").write_text(BROKEN)
    out = tmp_path / "run.json"
    script = (
        "import sys; from moe_dispatch.registry import register_backend; "
        "register_backend('swapped', 'broken_backend:SwappedRows'); "
        "from moe_dispatch.bench.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 2000),
               PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path),
                                           os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", script, "--device", "cpu", "--tokens", "40", "--hidden", "32",
           "--topk", "2", "--experts", "4", "--iters", "2", "--warmup", "0", "--no-layer",
           "--backends", "alltoall,swapped", "--check", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["swapped"]["status"] == "FAILED" and rows["swapped"]["check"] == "FAILED"
    assert rows["swapped"]["dispatch_us"] is None and "rows differ" in rows["swapped"]["reason"]
    assert rows["alltoall"]["status"] == "ok" and rows["alltoall"]["dispatch_us"] > 0
    assert "FAILED" in proc.stdout


# ------------------------------------------------------------------------------ budget mode

def _cli_env(extra_path=()):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *map(str, extra_path), os.environ.get("PYTHONPATH", "")]))


def test_cpu_budget_rows_and_host_times(tmp_path):
    """--budget on CPU (2 gloo ranks): eager budget rows checked against the exact mode with
    B and status recorded, MoELayer eager timed, graph rows skipped with a reason; every
    timed phase also has its host time."""
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "moe_dispatch.bench", "--device", "cpu", "--nproc", "2",
           "--tokens", "48", "--hidden", "64", "--topk", "3", "--experts", "8", "--iters", "3",
           "--warmup", "1", "--ffn", "32", "--backends", "alltoall,allgather", "--check",
           "--budget", "--no-references", "--json", str(out), "--timeout", "120"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_cli_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    B = 256                                             # round_up(1.25 * 48 * 3, 256)
    assert res["config"]["budget"] is True and res["config"]["budget_rows"] == B
    assert res["budget_alarms"] == []
    rows = {r["name"]: r for r in res["rows"]}
    for name in ("alltoall", "allgather"):
        r = rows[f"{name}-budget"]
        assert r["status"] == "ok" and r["check"] == "passed", r
        assert r["budget_rows"] == B and r["budget_status"] == 0
        assert r["per_rank"]["budget_status"] == [0, 0]
        for base in (name, f"{name}-budget"):               # exact and budget rows alike
            row = rows[base]
            for key, unit in (("dispatch", "us"), ("combine", "us"), ("layer", "ms")):
                assert row[f"{key}_host_{unit}"] > 0, (base, key)
                host = row["samples"][f"{key}_host_{unit}"]
                n = res["config"]["layer_iters"] if key == "layer" else res["config"]["iters"]
                assert len(host) == 2 and all(len(h) == n for h in host)
                assert [statistics.median(h) for h in host] == pytest.approx(
                    row["per_rank"][f"{key}_host_{unit}"], rel=1e-3)
        assert rows[name]["budget_rows"] is None and rows[name]["budget_status"] is None
        lay = rows[f"{name}-layer-eager"]
        assert lay["status"] == "ok" and lay["budget_status"] == 0 and lay["budget_rows"] == B
        assert lay["layer_ms"] > 0 and lay["layer_host_ms"] > 0 and lay["dispatch_us"] is None
        for graph in (f"{name}-budget-graph", f"{name}-layer-graph"):
            assert rows[graph]["status"] == "skipped" and "CUDA" in rows[graph]["reason"]
            assert rows[graph]["budget_rows"] == B
    assert "host us" in proc.stdout and "alltoall-budget-graph" in proc.stdout
    # MoELayer rows run a router the references do not: no ratio for them.
    assert not any(it["ours"].endswith("-layer-eager") for it in res["ratios"])


def test_cpu_fp8_rows_use_the_fp8_wire(tmp_path):
    """--fp8 adds a `<backend>-fp8` row running ``wire_dtype=float8_e4m3fn`` where the
    backend supports it (alltoall, allgather), counted with FP8 bytes."""
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "moe_dispatch.bench", "--device", "cpu", "--nproc", "2",
           "--tokens", "16", "--hidden", "128", "--topk", "2", "--experts", "4", "--iters", "2",
           "--warmup", "1", "--no-layer", "--backends", "alltoall,allgather", "--fp8",
           "--no-references", "--json", str(out), "--timeout", "120"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_cli_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("alltoall", "allgather"):
        r = rows[f"{name}-fp8"]
        assert r["status"] == "ok" and r["fp8"] and r["dispatch_us"] > 0, r


def test_budget_overflow_is_loud(tmp_path):
    """A budget too small for the rows: the row keeps its numbers but its status is in the
    JSON (row and budget_alarms), printed with '!!!', and the exit status is 4."""
    out = tmp_path / "run.json"
    env = dict(_cli_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(31500 + os.getpid() % 2000))
    cmd = [sys.executable, "-m", "moe_dispatch.bench", "--device", "cpu", "--tokens", "40",
           "--hidden", "32", "--topk", "2", "--experts", "4", "--iters", "2", "--warmup", "0",
           "--no-layer", "--no-references", "--backends", "alltoall", "--budget",
           "--budget-rows", "32", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    r = {r["name"]: r for r in res["rows"]}["alltoall-budget"]
    assert r["status"] == "ok" and r["dispatch_us"] > 0
    assert r["budget_rows"] == 32 and r["budget_status"] & 1          # STATUS_ROWS_DROPPED
    assert "rows dropped" in r["budget_status_text"]
    assert [a["name"] for a in res["budget_alarms"]] == ["alltoall-budget"]
    assert "!!! BUDGET STATUS" in proc.stdout and "!!! STATUS 1" in proc.stdout


def test_budget_flags_are_validated():
    from moe_dispatch.bench.cli import parse_args
    a = parse_args(["--budget", "--budget-rows", "512", "--backends", "alltoall"])
    assert a.budget and a.budget_rows == 512
    assert parse_args(["--backends", "alltoall"]).budget is False
    for bad in (["--budget-rows", "512"],                               # needs --budget
                ["--budget", "--budget-rows", "0"],
                ["--budget", "--backends", "alltoall", "--variant",
                 "alltoall-budget=alltoall:x=1"]):                     # label taken
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_check_of_kept_rows():
    """Budget-mode output: the kept rows must equal the exact rows, the rest be unused."""
    from moe_dispatch.bench.check import Expected, compare

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tokens, probs = torch.randn(10, 8, generator=g), torch.rand(10, generator=g) + 0.1
    tpe, y = torch.tensor([4, 6]), torch.randn(5, 8, generator=g)
    exp = Expected(tokens, probs, tpe, y)

    def budget(t, p, B=16):
        return torch.cat([t, t.new_zeros(B - len(t), 8)]), torch.cat([p, p.new_zeros(B - len(p))])

    t16, p16 = budget(tokens, probs)
    assert compare(t16, tpe, p16, y, exp, torch.float32, kept_rows=True) == []
    # The exact-layout comparison would reject the extra rows.
    assert any("shape" in e for e in compare(t16, tpe, p16, y, exp, torch.float32))
    bad = t16.clone()
    bad[12, 3] = 1.0                                                  # junk in an unused row
    assert any("unused rows" in e for e in compare(bad, tpe, p16, y, exp, torch.float32,
                                                   kept_rows=True))
    badp = p16.clone()
    badp[11] = 0.5
    assert any("nonzero probs" in e for e in compare(t16, tpe, badp, y, exp, torch.float32,
                                                     kept_rows=True))
    swapped, _ = budget(tokens[torch.tensor([1, 0] + list(range(2, 10)))], probs)
    assert any("rows differ" in e for e in compare(swapped, tpe, p16, y, exp, torch.float32,
                                                   kept_rows=True))
    assert any("tokens has 8 rows" in e for e in compare(tokens[:8], tpe, probs[:8], y, exp,
                                                         torch.float32, kept_rows=True))


def test_clock_keeps_host_time_per_call():
    from moe_dispatch.bench.timing import Clock
    t = Clock(torch.device("cpu"), None).run(lambda i, s: sum(range(1000)), iters=4, warmup=1)
    assert len(t.host_seconds) == 4 and all(h > 0 for h in t.host_seconds)
    assert t.host_median == statistics.median(t.host_seconds)


# ------------------------------------------------------------------------------ warm-up


def test_warmup_lasts_at_least_min_warmup_s():
    """Warm-up runs until min_warmup_s has passed, then exactly ``iters`` timed calls."""
    import time

    from moe_dispatch.bench.timing import Clock

    stamps = []

    def fn(i, s):
        assert s == ("setup", i)
        stamps.append((time.perf_counter(), i))
        time.sleep(0.004)

    clock = Clock(torch.device("cpu"), None, min_warmup_s=0.08)
    t = clock.run(fn, iters=3, warmup=2, setup=lambda i: ("setup", i))
    assert len(t.seconds) == 3 and t.started > 1e9
    warm = stamps[:-3]
    assert len(warm) >= 2 + 1  # more than the counted warm-up
    # The first timed call starts no earlier than min_warmup_s after the first warm-up call.
    assert stamps[-3][0] - warm[0][0] >= 0.08 * 0.95
    # Without it (the CPU default), exactly warmup + iters calls.
    stamps.clear()
    t = Clock(torch.device("cpu"), None).run(fn, iters=3, warmup=2,
                                               setup=lambda i: ("setup", i))
    assert len(stamps) == 5 and len(t.seconds) == 3


def test_warmup_call_count_is_agreed_across_ranks(gloo_pool):
    """Ranks of different speed make the same number of calls (in the bench every call
    may be a collective, so unequal counts would hang)."""
    got = gloo_pool(2).run("dist_workers", "timed_warmup", [0.001, 0.01], 0.06)
    assert got[0] == got[1], got
    calls, timed = got[0]
    assert timed == 3
    # The fast rank wants ~60 warm-up calls (fewer when sleeps overshoot on a loaded
    # machine, but at least 0.06 s / its real call time), the slow one ~6: the max wins.
    assert calls >= 3 + 10, got


def test_spread_and_noisy_phases():
    from moe_dispatch.bench import report
    assert report.spread([1.0] * 4) is None               # too few samples
    assert report.spread([1.0] * 10) == pytest.approx(1.0)
    s = [1.0] * 8 + [2.0, 2.0]                             # p10 1.0, p90 2.0
    assert report.spread(s) == pytest.approx(2.0)
    rows = [dict(name="a", samples=dict(dispatch_us=[[1.0] * 10, s],
                                        combine_us=[[1.0] * 10, [1.0] * 10])),
            dict(name="b", samples={}), dict(name="c")]
    got = report.noisy(rows)
    assert got == ["  a dispatch: p90/p10 = 2.00 (rank 1)"]
    assert report.noisy(rows, limit=2.5) == []


def test_table_keeps_columns_aligned_for_missing_values():
    from moe_dispatch.bench import report
    assert report._num(None, "10.2f") == " " * 9 + "-"
    assert report._num(float("nan"), "8.1f") == " " * 7 + "-"
    assert report._num(1.5, "8.1f") == "     1.5"
