"""``python -m moe_dispatch.bench``: every backend side by side, with reference rows.

Under ``torchrun`` (one process per GPU, NCCL) it benchmarks the ranks it was started with.
Started plainly it spawns ``--nproc`` ranks itself (default 2): NCCL on GPUs when there are
enough of them, else gloo on the CPU (a smoke run: the numbers are not meaningful, the
code path and the checks are).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import socket
import sys
import traceback
from typing import List, Optional

import torch
import torch.distributed as dist

from .common import Ctx, Row, agree
from .timing import Clock
from .workload import SHAPES, Shape, build_sets, num_sets_for, routing_stats

ALL_BACKENDS = ("alltoall", "allgather", "deepep", "hybridep", "uccl", "nvshmem")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m moe_dispatch.bench",
        description="Time dispatch, combine and MoE-layer fwd+bwd of every available backend, "
                    "next to DeepEP's Buffer and Megatron-Core's alltoall dispatcher.")
    ap.add_argument("--backends", default="all",
                    help="comma-separated backend names, or 'all' (default: every registered "
                         "backend; unavailable ones are listed as skipped with the reason)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="preset: deepep (4096 tok/rank, H 7168, top-8 of 256), small (128 tok/rank, "
                         "H 7168, top-8 of 256), mid (4096 tok/rank, H 2048, top-6 of 64); "
                         "explicit flags override it (default: deepep)")
    ap.add_argument("--tokens", type=int, help="tokens per rank (T)")
    ap.add_argument("--hidden", type=int, help="hidden size (H)")
    ap.add_argument("--topk", type=int, help="experts per token (K)")
    ap.add_argument("--experts", type=int, help="global number of experts (E)")
    ap.add_argument("--routing", choices=("uniform", "zipf"), default="uniform",
                    help="uniform: top-k of |randn|+1 scores (DeepEP's draw); zipf: skewed expert "
                         "popularity")
    ap.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent for --routing zipf")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="token dtype (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--fp8", action="store_true",
                    help="also time FP8 dispatch where a backend (or DeepEP direct) supports it")
    ap.add_argument("--iters", type=int, default=50, help="timed iterations per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    ap.add_argument("--layer-iters", type=int, default=None,
                    help="timed iterations of the MoE-layer fwd+bwd (default: --iters // 2, >= 1)")
    ap.add_argument("--no-layer", action="store_true", help="skip the MoE-layer fwd+bwd timing")
    ap.add_argument("--ffn", type=int, default=None,
                    help="expert MLP hidden size for the layer timing (default min(H, 1024) // 2)")
    ap.add_argument("--sets", type=int, default=None,
                    help="rotating input sets (default: enough to exceed 128 MB, 2..8)")
    ap.add_argument("--no-l2-flush", action="store_true",
                    help="do not overwrite the L2 cache before each timed call (CUDA)")
    ap.add_argument("--check", action="store_true",
                    help="verify every backend against alltoall (and alltoall against a dense "
                         "reference) before timing; a failing one gets no numbers")
    ap.add_argument("--no-references", action="store_true",
                    help="skip the DeepEP-direct and Megatron-Core reference rows")
    ap.add_argument("--deepep-sms", type=int, default=24,
                    help="SMs for DeepEP (direct and our deepep backend); anchors used 24")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--nproc", type=int, default=2,
                    help="ranks to spawn when not started by torchrun (default 2)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA when available (NCCL), else CPU (gloo)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds before a stuck collective aborts the run")
    args = ap.parse_args(argv)
    preset = dict(SHAPES[args.shape or "deepep"])
    for k in ("tokens", "hidden", "topk", "experts"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
        setattr(args, k, preset[k])
    if args.layer_iters is None:
        args.layer_iters = max(1, args.iters // 2)
    if args.ffn is None:
        args.ffn = max(1, min(args.hidden, 1024) // 2)
    for k in ("tokens", "hidden", "topk", "experts", "iters", "ffn"):
        if getattr(args, k) <= 0:
            ap.error(f"--{k} must be positive")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.topk > args.experts:
        ap.error(f"--topk ({args.topk}) must not exceed --experts ({args.experts})")
    names = ALL_BACKENDS if args.backends == "all" else tuple(
        b.strip() for b in args.backends.split(",") if b.strip())
    from ..registry import backend_names
    known = set(backend_names())
    bad = [b for b in names if b not in known]
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {sorted(known)}")
    args.backend_list = [b for b in names if b in known] if args.backends != "all" else \
        [b for b in backend_names()]
    return args


# ----------------------------------------------------------------------------- launching

def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _want_cuda(args) -> bool:
    if args.device == "cpu":
        return False
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        return True
    return torch.cuda.is_available()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if _under_torchrun():
        return _worker(args)
    use_cuda = _want_cuda(args)
    if use_cuda and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, "
                         f"{torch.cuda.device_count()} visible; use torchrun or --device cpu")
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_spawned, args=(args, args.nproc, port), nprocs=args.nproc, join=True,
                       start_method="spawn")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, args, nproc: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc))
    rc = _worker(args)
    if rc:
        raise SystemExit(rc)


def _init(args):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    timeout = _dt.timedelta(seconds=args.timeout)
    if _want_cuda(args):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        try:
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        except TypeError:  # older torch without device_id
            dist.init_process_group("nccl", timeout=timeout)
    else:
        device = torch.device("cpu")
        # One thread per rank: the smoke run shares a few cores between ranks.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        dist.init_process_group("gloo", timeout=timeout)
    return rank, world, local_rank, local_world, device


def _worker(args) -> int:
    rank, world, local_rank, local_world, device = _init(args)
    try:
        result = run(args, rank, world, local_rank, local_world, device)
        if rank == 0:
            from . import report
            print(report.table(result), flush=True)
            if args.json:
                report.write_json(result, args.json)
                print(f"JSON written to {args.json}", flush=True)
            if args.plot:
                msg = report.plot(result, args.plot)
                print(msg or f"chart written to {args.plot}", flush=True)
        bad = [r for r in result["rows"] if r["status"] == "FAILED"]
        return 3 if bad else 0
    finally:
        _teardown()


def _teardown():
    # DeepEP buffers must go before the process group, or destroy_process_group can hang.
    try:
        from .. import fused_a2a
        free = getattr(fused_a2a, "free_buffer", None)
        if free is not None:
            free()
    except Exception:
        pass
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the run

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (gloo)"


def run(args, rank: int, world: int, local_rank: int, local_world: int,
        device: torch.device) -> dict:
    """Run the whole benchmark on this rank; every rank returns the same result dict."""
    from .. import available_backends

    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    shape = Shape(args.tokens, args.hidden, args.topk, args.experts, args.routing, dtype,
                  args.zipf_s)
    if shape.experts % world:
        raise SystemExit(f"--experts {shape.experts} is not divisible by the {world} ranks")
    group = dist.group.WORLD
    hosts = _gather_obj(socket.gethostname(), world)
    num_nodes = len(set(hosts))
    nsets = num_sets_for(shape, device, args.sets)
    sets = build_sets(shape, rank, world, args.seed, nsets, device, group)
    clock = Clock(device, group, flush_l2=not args.no_l2_flush)
    ctx = Ctx(args, shape, rank, world, local_rank, local_world, num_nodes, device, group,
              sets, clock)
    ctx.log(f"moe_dispatch.bench: {world} rank(s) on {num_nodes} node(s), {_device_name(device)}, "
            f"shape {shape.as_dict()}, {nsets} input sets")

    avail = available_backends()
    rows: List[Row] = []
    experts = None
    if not args.no_layer:
        from .experts import build_experts
        L = shape.experts // world
        experts, experts_label = build_experts(shape.experts, L, rank * L, shape.hidden,
                                               args.ffn, shape.torch_dtype, device)
    else:
        experts_label = None

    from . import runners
    dense, a2a = runners.check_references(ctx) if args.check else (None, None)
    for name in args.backend_list:
        exp = dense if (name == "alltoall" or a2a is None) else a2a
        rows.extend(runners.bench_backend(ctx, name, avail.get(name, "not registered"),
                                          experts, exp))
    expected = a2a if a2a is not None else dense

    if not args.no_references:
        from . import deepep_ref, megatron_ref
        rows.extend(deepep_ref.run(ctx))
        rows.extend(megatron_ref.run(ctx, experts, expected))

    from . import report
    rows_d = [r.as_dict() for r in rows]
    import platform
    result = dict(
        schema=report.SCHEMA,
        config=dict(
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            command="python -m moe_dispatch.bench " + " ".join(sys.argv[1:]),
            hosts=sorted(set(hosts)), world_size=world, num_nodes=num_nodes,
            local_world_size=local_world, device=device.type, device_name=_device_name(device),
            torch=torch.__version__, cuda=torch.version.cuda,
            nccl=".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
            python=platform.python_version(),
            shape=shape.as_dict(), iters=args.iters, warmup=args.warmup,
            layer_iters=args.layer_iters, num_sets=nsets, l2_flush=not args.no_l2_flush,
            ffn=args.ffn, experts_impl=experts_label, check=args.check, fp8=args.fp8,
            deepep_sms=args.deepep_sms, seed=args.seed,
            available_backends=avail),
        routing=routing_stats(sets, shape),
        rows=rows_d,
        ratios=report.ratios(rows_d),
    )
    return result


def _gather_obj(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
