"""transformers MoE models made expert-parallel, on GPUs: the scenarios of tests/test_hf.py
(tests/hf_workers.py) with NCCL, one process per GPU.

    torchrun --standalone --nproc-per-node N -m pytest -q tests/test_gpu_hf.py   # N = 1, 2, 4, 8

Skipped without CUDA; plain ``pytest`` (no torchrun) runs it as one rank. For every family,
every dispatcher backend (run where the registry says it is available here, else skipped
with its reason; ``MOE_GPU_BACKENDS=a,b`` picks some) and fp32 and bf16: the EP model's
logits, loss, aux loss and every gradient against the unsharded transformers model on the
same batches (``hf_workers.dtype_parity``). Also a checkpoint round trip on the GPU.
``MOE_GPU_HF_RECORD=PATH``: rank 0 appends one JSON line per parity case (its errors, or
why it was skipped), for the record.

How the comparison works: bf16 cannot match bit for bit (the EP model sums in another order),
so both the EP model and the unsharded model in the same dtype are measured against the
unsharded model in float64 (the truth); the EP model's relative error may be at most
NOISE_RATIO times the unsharded model's (the dtype's own rounding noise on this model and
batch) plus a small floor (``hf_workers.check_dtype_parity``). Backends that move rows in
BF16 whatever the model's dtype (DeepEP V1's family, at EP > 1) get a larger floor in fp32,
BF16_ROWS_FLOOR: no unsharded model rounds just those rows to measure that noise against.
A wrong route, weight slice or lost gradient gives errors of order 1. fp32 runs without TF32.

Every rank checks its own results and the ranks agree on pass/fail (and on skips), so a
failure on one rank fails every rank instead of leaving the others waiting.
"""
import json
import os
import shutil
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA GPUs", allow_module_level=True)
transformers = pytest.importorskip("transformers")

import moe_dispatch  # noqa: E402
from hf_workers import (FAMILIES, NOISE_FLOOR, NOISE_RATIO, check_dtype_parity,  # noqa: E402
                        checkpoint_roundtrip, dtype_parity)
from moe_dispatch.registry import backend_names  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fp32 model, rows rounded to BF16 on the wire: a few BF16 roundings of the expert rows'
# share of each gradient; far below the order-1 error of a fault.
BF16_ROWS_FLOOR = 5e-2
NUM_EXPERTS = 8  # every tiny config in hf_workers.FAMILIES


def _free_port() -> int:
    """A TCP port free on this host now (the one-rank group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init():
    """(rank, world): torchrun's ranks, or a one-rank group when started without it."""
    # The fp32 bounds assume full-precision matmuls (another test may have enabled TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        # A rank that raised before a collective the others are in would leave them
        # waiting: the timeout bounds that wait.
        kw = dict(backend="nccl", device_id=torch.device("cuda", local),
                  timeout=timedelta(minutes=5))
        if "RANK" not in os.environ:  # plain pytest: one rank
            kw.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(**kw)
    return dist.get_rank(), dist.get_world_size()


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    t = torch.tensor([1 if flag else 0], device="cuda")
    dist.all_reduce(t)
    return t.item() > 0


def _agree(msg: str):
    """Fail on every rank if ``msg`` (this rank's failure, "" if none) is set on any."""
    assert not _any_rank(bool(msg)), msg or "another rank failed"


def _skip_unless_runnable(backend: str, world: int, case: dict):
    """Skip on every rank alike: a backend unavailable on some rank, or a world size that
    does not split the experts. ``case``: the test's parameters, for the record."""
    if NUM_EXPERTS % world:
        pytest.skip(f"{NUM_EXPERTS} experts do not split over {world} ranks")
    reason = moe_dispatch.available_backends().get(backend, "unknown backend")
    unavailable = reason != "available"
    if _any_rank(unavailable):
        why = reason if unavailable else "unavailable on another rank"
        _record(dict(test="parity", **case, world=world, skipped=why))
        pytest.skip(f"backend {backend!r}: {why}")


def _backends():
    names = os.environ.get("MOE_GPU_BACKENDS")
    return names.split(",") if names else backend_names()


def _shared_seed() -> int:
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device="cuda")
    dist.broadcast(seed, 0)
    return int(seed.item())


def _floor(backend: str, dtype: torch.dtype) -> float:
    """The error always allowed: the dtype's, or BF16_ROWS_FLOOR for an fp32 model on a
    backend that moves rows in BF16 whatever their dtype (DeepEP V1's family)."""
    wire = getattr(moe_dispatch.get_backend_class(backend), "wire_dtype", None)
    if wire is not None and wire != dtype:
        return BF16_ROWS_FLOOR
    return NOISE_FLOOR[dtype]


def _record(row: dict):
    """Append ``row`` to $MOE_GPU_HF_RECORD (rank 0; nothing when it is unset)."""
    path = os.environ.get("MOE_GPU_HF_RECORD")
    if path and dist.get_rank() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_ep_model_equals_transformers_model(family, backend, dtype):
    rank, world = _init()
    _skip_unless_runnable(backend, world, dict(family=family, backend=backend, dtype=dtype))
    seed = _shared_seed()
    res, msg = None, ""
    try:
        res = dtype_parity(rank, world, family, backend, seed, DTYPES[dtype])
    except Exception as exc:  # keep ranks in step: report, then agree
        msg = f"rank {rank}: {type(exc).__name__}: {exc}"
    _agree(msg)
    floor = _floor(backend, DTYPES[dtype])
    errs = check_dtype_parity(res, family, world, floor)
    losses = [None] * world
    dist.all_gather_object(losses, res["loss_value"])
    if world > 1 and len({round(v, 6) for v in losses}) != world:
        # Every rank has its own batch: equal losses would mean tokens never crossed ranks.
        errs.append(f"ranks' losses are not all different: {losses}")
    worst = max(res["errors"], key=lambda k: res["errors"][k][0] / (
        NOISE_RATIO * res["errors"][k][1] + floor))
    _record(dict(test="parity", family=family, backend=backend, dtype=dtype, world=world,
                 device=torch.cuda.get_device_name(), torch=torch.__version__,
                 transformers=transformers.__version__, passed=not errs, floor=floor,
                 worst=worst, worst_ep_err=res["errors"][worst][0],
                 worst_plain_err=res["errors"][worst][1],
                 loss_ep_err=res["errors"]["loss"][0], logits_ep_err=res["errors"]["logits"][0]))
    _agree((f"rank {rank}: " + " | ".join(errs)) if errs else "")


def _shared_tmpdir() -> str:
    """A fresh directory made by rank 0, its path handed to every rank (one host)."""
    box = [tempfile.mkdtemp(prefix="moe_hf_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, 0)
    return box[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_checkpoint_round_trip(family):
    """save_pretrained_ep -> plain from_pretrained gives the same weights (bitwise) and
    logits; an ordinary checkpoint -> load_ep_state gives the plain model's logits."""
    rank, world = _init()
    if NUM_EXPERTS % world:
        pytest.skip(f"{NUM_EXPERTS} experts do not split over {world} ranks")
    root = _shared_tmpdir()
    msg = ""
    try:
        r = checkpoint_roundtrip(rank, world, family, "alltoall", os.path.join(root, "ep"),
                                 os.path.join(root, "plain"), 5, device="cuda")
        bad = {k: r[k] for k in ("same_keys", "params_kept") if not r[k]}
        if r["weights"] != 0.0 or r["dtype"] != "torch.float32":
            bad.update(weights=r["weights"], dtype=r["dtype"])
        # fp32 on the GPU, no TF32: only the order of sums differs.
        bad.update({k: r[k] for k in ("saved_logits", "loaded_logits") if not r[k] < 1e-4})
        if bad:
            msg = f"rank {rank}: {bad}"
    except Exception as exc:  # keep ranks in step: report, then agree
        msg = f"rank {rank}: {type(exc).__name__}: {exc}"
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    _agree(msg)
