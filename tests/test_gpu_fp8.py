"""The FP8-wire parity scenarios of ``test_fp8_wire.py`` on GPUs with NCCL, one process per GPU.

Run on a machine with GPUs:  torchrun --nproc-per-node 2 -m pytest -q tests/test_gpu_fp8.py
(and 4). Skipped without CUDA or outside torchrun. The rows cross NCCL as uint8 wire rows and
the Triton kernels quantise and dequantise (hardware conversions); every rank checks its own
results against the CPU references and the ranks agree on pass/fail, so none hangs.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
    pytest.skip("needs CUDA GPUs under torchrun (WORLD_SIZE >= 2)", allow_module_level=True)

from fp8_workers import run_fp8_vs_plain  # noqa: E402
from moe_dispatch.testing import make_case  # noqa: E402
from test_fp8_wire import SCENARIOS, check_fp8  # noqa: E402
from test_gpu_parity import _agree, _init, _scenario, _shared_seed  # noqa: E402


@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("mode", ["exact", "budget"])
@pytest.mark.parametrize("scenario", list(SCENARIOS) + ["large_zipf"])
def test_gpu_fp8_parity(backend, mode, scenario):
    rank, world = _init()
    seed = _shared_seed()
    tokens, case_kw, opts = _scenario(scenario, SCENARIOS)
    kw = dict(hidden=512, num_experts=8 * world, topk=4, seed=seed)
    kw.update(case_kw)
    case = make_case(world, tokens(world), **kw)
    if mode == "budget":
        opts = dict(opts, max_rows_per_rank=4 * max(tokens(world)) * world + 16)
    results = [None] * world
    msg = ""
    try:
        results[rank] = run_fp8_vs_plain(rank, world, case, backend, dict(opts, device="cuda"))
    except Exception as exc:  # keep ranks in step: report, then agree
        msg = f"rank {rank}: {type(exc).__name__}: {exc}"
    _agree(not msg, msg)
    try:
        check_fp8(results, case, opts, ranks=[rank], tol=1e-4)
    except AssertionError as exc:
        msg = f"rank {rank}: {exc}"
    _agree(not msg, msg)
