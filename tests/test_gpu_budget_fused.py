"""The budget mode's fused kernels on a GPU, one process (no torchrun needed):

    python3 -m pytest -q -s tests/test_gpu_budget_fused.py

* the path CUDA takes is the fused one (``budget.fused_budget``), and one budget dispatch
  launches at most 15 GPU operations (printed with their names under ``-s``);
* a whole dispatch + combine + backward at the benchmark's shapes equals, bit for bit, the
  same step with the metadata and plans computed by the torch reference.
``tests/test_budget_kernels.py`` runs its kernel-level comparisons on the GPU too.
Skipped without CUDA or triton.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from triton_mode import HAS_TRITON  # noqa: E402

if not HAS_TRITON:
    pytest.skip("needs triton", allow_module_level=True)

from moe_dispatch.backends import budget  # noqa: E402
from moe_dispatch.protocol import STATUS_ROWS_DROPPED  # noqa: E402
from test_budget_kernels import budget_step, force_paths  # noqa: E402
from token_dispatcher import MoETokenDispatcher  # noqa: E402

# (T, H, K, E) of benchmarks/scripts/budget_ep1.py.
PRESETS = {"small": (128, 7168, 8, 256), "mid": (4096, 2048, 6, 64)}
MAX_OPS = 15


def _budget(T, K):
    return -(-int(1.25 * T * K) // 256) * 256


@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_budget_dispatch_is_fused_and_launches_few_ops(backend, preset):
    from moe_dispatch.bench.launch import device_ops
    T, H, K, E = PRESETS[preset]
    dev = torch.device("cuda")
    assert budget.fused_budget(torch.zeros(1, device=dev))
    d = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=_budget(T, K))
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    probs, idx = torch.topk(torch.rand(T, E, device=dev), K, 1)
    probs = probs.softmax(-1)
    with torch.no_grad():
        d.dispatch(x, topk_idx=idx, topk_probs=probs)  # agree the shapes, compile
        ops = device_ops(lambda: d.dispatch(x, topk_idx=idx, topk_probs=probs))
    print(f"\n{backend} {preset}: {len(ops)} GPU operations per budget dispatch: "
          + ", ".join(ops))
    assert "_pack_meta_kernel" in ops and "_layout_pos_kernel" in ops, ops
    assert len(ops) <= MAX_OPS, ops


@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("preset,pad,wire", [("small", None, None), ("mid", 128, None),
                                             ("small", None, torch.float8_e4m3fn)],
                         ids=["small", "mid_pad128", "small_fp8"])
@pytest.mark.parametrize("tight", [False, True], ids=["fits", "drops"])
def test_fused_step_matches_reference_on_device(monkeypatch, backend, preset, pad, wire,
                                                tight):
    T, H, K, E = PRESETS[preset]
    B = _budget(T, K) // (4 if tight else 1)
    if pad:
        B = -(-B // pad) * pad
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    outs = {}
    for fused in (False, True):
        with monkeypatch.context() as mp:
            force_paths(mp, fused)
            outs[fused] = budget_step(backend, seed, T=T, H=H, K=K, E=E, B=B, pad=pad,
                                      wire=wire)
    for k, ref in outs[False].items():
        got = outs[True][k]
        assert got.dtype == ref.dtype and torch.equal(got, ref), (seed, k)
    assert bool(int(outs[True]["status"]) & STATUS_ROWS_DROPPED) == tight, seed
