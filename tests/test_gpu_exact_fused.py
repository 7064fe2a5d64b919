"""The exact mode's fused path on GPUs:

    python3 -m pytest -q -s tests/test_gpu_exact_fused.py          # one GPU, one process
    torchrun --nproc-per-node 4 -m pytest -q tests/test_gpu_exact_fused.py   # NCCL ranks

* the path CUDA takes is the fused one (``BudgetPlan``s from ``exact.pack_rows`` /
  ``exact.receive_plan``), and after its host sync (the device-to-host copy of the routing
  messages) an exact dispatch launches at most ``MAX_AFTER_SYNC`` GPU operations (all of
  them printed with their names under ``-s``);
* a whole dispatch + combine + backward at the benchmark's shapes equals, bit for bit, the
  same step with the metadata and plans built by the torch reference (the permutes run the
  same kernels on both paths).
* under torchrun (WORLD_SIZE >= 2) instead: the same bit-for-bit comparison on every rank
  of uneven all-to-alls (a zero-token rank, padding, a narrower K, FP8 wire, skew).
``tests/test_exact_fused.py`` runs its kernel-level comparisons on the GPU too.
Skipped without CUDA or triton.
"""
import os

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
one_process = pytest.mark.skipif(WORLD > 1, reason="one process (run without torchrun)")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from triton_mode import HAS_TRITON  # noqa: E402

if not HAS_TRITON:
    pytest.skip("needs triton", allow_module_level=True)

from dist_workers import _exact_step  # noqa: E402
from moe_dispatch.backends import budget  # noqa: E402
from moe_dispatch.testing import make_case  # noqa: E402
from test_budget_kernels import force_paths  # noqa: E402
from test_exact_fused import assert_same, both_paths, exact_step  # noqa: E402
from token_dispatcher import MoETokenDispatcher  # noqa: E402

# (T, H, K, E) of benchmarks/scripts/budget_ep1.py.
PRESETS = {"small": (128, 7168, 8, 256), "mid": (4096, 2048, 6, 64)}
# After the sync, EP1: alltoall packs (1), permutes x (1), plans (2), permutes (1);
# allgather builds its rows with torch ops (3), plans (2), permutes (1). Padding adds the
# receive permute's zero fill.
MAX_AFTER_SYNC = {"alltoall": 5, "allgather": 6}


@one_process
@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("preset,pad", [("small", None), ("mid", 128)], ids=["small", "mid_pad128"])
def test_exact_dispatch_is_fused_and_launches_few_ops(backend, preset, pad):
    from moe_dispatch.bench.launch import device_ops
    T, H, K, E = PRESETS[preset]
    dev = torch.device("cuda")
    assert budget.fused_budget(torch.zeros(1, device=dev))
    d = MoETokenDispatcher(E, backend=backend, pad_multiple=pad)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    probs, idx = torch.topk(torch.rand(T, E, device=dev), K, 1)
    probs = probs.softmax(-1)
    with torch.no_grad():
        out = d.dispatch(x, topk_idx=idx, topk_probs=probs)  # compile
        assert type(out.handle.backend_handle.plan).__name__ == "BudgetPlan"
        ops = device_ops(lambda: d.dispatch(x, topk_idx=idx, topk_probs=probs))
    sync = max(i for i, name in enumerate(ops) if "DtoH" in name)
    after = ops[sync + 1:]
    print(f"\n{backend} {preset}: {len(ops)} GPU operations per exact dispatch, "
          f"{len(after)} after the sync: " + ", ".join(ops))
    assert "_layout_pos_kernel" in after, ops
    if backend == "alltoall":
        assert "_pack_meta_kernel" in after, ops
    assert len(after) <= MAX_AFTER_SYNC[backend] + (pad is not None), ops


@one_process
@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("preset,pad,wire", [("small", None, None), ("mid", 128, None),
                                             ("small", None, torch.float8_e4m3fn)],
                         ids=["small", "mid_pad128", "small_fp8"])
def test_fused_exact_step_matches_reference_on_device(monkeypatch, backend, preset, pad, wire):
    T, H, K, E = PRESETS[preset]
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    outs = both_paths(monkeypatch, exact_step, backend, seed, T=T, H=H, K=K, E=E, pad=pad,
                      wire=wire)
    assert outs[True]["plan"] == "BudgetPlan" and outs[False]["plan"] == "GroupPlan"
    assert_same(outs, seed)


# (tokens per rank as a function of R, H, top-k, dispatcher opts, case kwargs)
RANK_CASES = {
    "uneven_zipf": (lambda R: [96 + 40 * r for r in range(R)], 256, 8, {},
                    dict(mask_frac=0.1, skew="zipf")),
    "empty_pad": (lambda R: [0] + [64] * (R - 1), 256, 4, dict(pad_multiple=16), {}),
    "narrow_k": (lambda R: [50 + r for r in range(R)], 256, 6, dict(narrow_rank=1),
                 dict(mask_frac=0.3)),
    "fp8_hot": (lambda R: [128] * R, 512, 8, dict(wire=True, pad_multiple=32),
                dict(skew="one_expert")),
}


@pytest.mark.skipif(WORLD < 2, reason="needs torchrun with WORLD_SIZE >= 2")
@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("name", list(RANK_CASES))
def test_fused_exact_paths_match_across_gpus(backend, name):
    if not dist.is_initialized():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device="cuda")
    dist.broadcast(seed, 0)
    tokens, H, K, opts, kw = RANK_CASES[name]
    case = make_case(world, tokens(world), H, 8 * world, K, seed=int(seed.item()),
                     dtype=torch.bfloat16, **kw)
    outs = {}
    for fused in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            force_paths(mp, fused)
            outs[fused] = _exact_step(rank, case, backend, dict(opts, device="cuda"))
    try:
        assert outs[True]["plan"] == "BudgetPlan"
        assert_same(outs, (rank, name, int(seed.item())))
        ok, msg = True, ""
    except AssertionError as exc:
        ok, msg = False, str(exc)[:2000]
    flag = torch.tensor([0 if ok else 1], device="cuda")
    dist.all_reduce(flag)  # every rank fails together: none hangs in a later collective
    assert flag.item() == 0, msg or "another rank failed"
