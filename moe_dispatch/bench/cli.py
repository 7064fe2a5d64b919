"""``python -m moe_dispatch.bench``: every backend side by side, with reference rows.

Under ``torchrun`` (one process per GPU, NCCL) it benchmarks the ranks it was started with.
Started plainly it spawns ``--nproc`` ranks itself (default 2): NCCL on GPUs when there are
enough of them, else gloo on the CPU (a smoke run: the numbers are not meaningful, the
code path and the checks are).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import socket
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

from .common import Ctx, Row
from .timing import Clock
from .workload import SHAPES, Shape, build_sets, num_sets_for, routing_stats

ALL_BACKENDS = ("alltoall", "allgather", "deepep", "hybridep", "uccl", "nvshmem")
# Rows --budget adds per backend: <backend>-<suffix> (see runners.bench_budget).
BUDGET_SUFFIXES = ("budget", "budget-graph", "layer-eager", "layer-graph")
# Exit statuses: a path FAILED its check; a budget row's dispatch status was nonzero.
EXIT_FAILED, EXIT_BUDGET_STATUS = 3, 4


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m moe_dispatch.bench",
        description="Time dispatch, combine and MoE-layer fwd+bwd of every available backend, "
                    "next to DeepEP's Buffer and Megatron-Core's alltoall dispatcher.")
    ap.add_argument("--backends", default="all",
                    help="comma-separated backend names, or 'all' (default: every registered "
                         "backend; unavailable ones are listed as skipped with the reason)")
    ap.add_argument("--shape", default=None,
                    help="preset(s), comma-separated to run several in one launch: deepep (4096 "
                         "tok/rank, H 7168, top-8 of 256), small (128 tok/rank, H 7168, top-8 of "
                         "256), mid (4096 tok/rank, H 2048, top-6 of 64); explicit --tokens/"
                         "--hidden/--topk/--experts override it (default: deepep)")
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
    ap.add_argument("--warmup-ms", type=float, default=None,
                    help="...and at least this much warm-up time per timed phase (default 300 "
                         "on CUDA, 0 on CPU): a GPU path timed right after host-only work "
                         "(its --check) was measured slower for its first tens of ms")
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
    ap.add_argument("--opt", action="append", default=[], metavar="BACKEND:KEY=VAL[,KEY=VAL]",
                    help="backend_options for one backend's row (repeatable), e.g. "
                         "--opt deepep:num_sms=20")
    ap.add_argument("--variant", action="append", default=[],
                    metavar="LABEL=BACKEND[:KEY=VAL,...]",
                    help="an extra row: BACKEND with these backend_options, shown as LABEL "
                         "(repeatable), e.g. --variant deepep-20sm=deepep:num_sms=20; under "
                         "--check a variant whose row layout differs is checked through "
                         "tokens_per_expert and combine (the budget mode is --budget)")
    ap.add_argument("--budget", action="store_true",
                    help="also time every selected backend in the budget mode "
                         "(MoETokenDispatcher(..., max_rows_per_rank=B)): rows <backend>-budget "
                         "(eager), <backend>-budget-graph (dispatch and combine each captured "
                         "as a CUDA graph; CUDA only) and, unless --no-layer, "
                         "<backend>-layer-eager / <backend>-layer-graph (token_dispatcher's "
                         "MoELayer, eager / captured as CUDA graphs: experimental). A nonzero "
                         "dispatch status (rows dropped) is printed, kept in the JSON and makes "
                         "the exit status 4")
    ap.add_argument("--budget-rows", type=int, default=None, metavar="B",
                    help="B for --budget (default round_up(1.25 * tokens * topk, 256))")
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
    shape_names = [n.strip() for n in (args.shape or "deepep").split(",") if n.strip()]
    for n in shape_names:
        if n not in SHAPES:
            ap.error(f"--shape {n!r}: choose from {sorted(SHAPES)}")
    if len(set(shape_names)) != len(shape_names):
        ap.error("--shape lists a preset twice")
    args.runs = []
    for n in shape_names:
        run_spec = dict(SHAPES[n])
        for k in ("tokens", "hidden", "topk", "experts"):
            if getattr(args, k) is not None:
                run_spec[k] = getattr(args, k)
            if run_spec[k] <= 0:
                ap.error(f"--{k} must be positive")
        if run_spec["topk"] > run_spec["experts"]:
            ap.error(f"--topk ({run_spec['topk']}) must not exceed --experts ({run_spec['experts']})")
        run_spec["ffn"] = args.ffn if args.ffn is not None else max(1, min(run_spec["hidden"], 1024) // 2)
        run_spec["name"] = n
        args.runs.append(run_spec)
    _apply_run(args, args.runs[0])
    if args.layer_iters is None:
        args.layer_iters = max(1, args.iters // 2)
    for k in ("iters", "ffn", "layer_iters"):
        if getattr(args, k) <= 0:
            ap.error(f"--{k.replace('_', '-')} must be positive")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.budget_rows is not None:
        if not args.budget:
            ap.error("--budget-rows is the B of the --budget rows: add --budget")
        if args.budget_rows <= 0:
            ap.error("--budget-rows must be positive")
    if args.warmup_ms is not None and not (args.warmup_ms >= 0 and args.warmup_ms < 1e6):
        ap.error("--warmup-ms must be a number of milliseconds >= 0")
    names = ALL_BACKENDS if args.backends == "all" else tuple(
        b.strip() for b in args.backends.split(",") if b.strip())
    from ..registry import backend_names
    known = set(backend_names())
    bad = [b for b in names if b not in known]
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {sorted(known)}")
    args.backend_list = [b for b in names if b in known] if args.backends != "all" else \
        [b for b in backend_names()]
    args.backend_opts = {}
    for item in args.opt:
        name, _, kv = item.partition(":")
        if name not in known or not kv:
            ap.error(f"--opt {item!r}: expected BACKEND:KEY=VAL[,KEY=VAL] with a known backend")
        args.backend_opts.setdefault(name, {}).update(_parse_kv(ap, kv, item))
    args.variants = []
    for item in args.variant:
        label, _, rest = item.partition("=")
        name, _, kv = rest.partition(":")
        if not label or name not in known:
            ap.error(f"--variant {item!r}: expected LABEL=BACKEND[:KEY=VAL,...] with a known backend")
        budget_labels = {f"{b}-{suffix}" for b in args.backend_list
                         for suffix in BUDGET_SUFFIXES} if args.budget else set()
        if label in known or label in [v[0] for v in args.variants] or label in budget_labels:
            ap.error(f"--variant {item!r}: label {label!r} is taken")
        args.variants.append((label, name, _parse_kv(ap, kv, item) if kv else {}))
    return args


def _parse_kv(ap, kv: str, item: str) -> dict:
    out = {}
    for part in kv.split(","):
        k, eq, v = part.partition("=")
        if not eq or not k:
            ap.error(f"{item!r}: {part!r} is not KEY=VAL")
        out[k.strip()] = _value(v.strip())
    return out


def _value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _apply_run(args, run_spec: dict) -> None:
    for k in ("tokens", "hidden", "topk", "experts", "ffn"):
        setattr(args, k, run_spec[k])
    args.shape_name = run_spec["name"]


def output_path(path: Optional[str], shape_name: str, several: bool) -> Optional[str]:
    """Where one shape's output goes: PATH itself for a single shape; with several shapes
    ``{shape}`` in PATH is replaced, or ``-<shape>`` is put before the extension."""
    if not path:
        return None
    if "{shape}" in path:
        return path.replace("{shape}", shape_name)
    if not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{shape_name}{ext}"


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
    try:
        mp.start_processes(_spawned, args=(args, args.nproc, port), nprocs=args.nproc,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException as exc:  # a rank exited non-zero (3: a check FAILED)
        return exc.exit_code or 1
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
    rc = 0
    try:
        several = len(args.runs) > 1
        for run_spec in args.runs:
            a = copy.copy(args)
            _apply_run(a, run_spec)
            path = output_path(args.json, a.shape_name, several)
            result = run(a, rank, world, local_rank, local_world, device, partial_json=path)
            if rank == 0:
                from . import report
                print(report.table(result), flush=True)
                if path:
                    report.write_json(result, path)
                    print(f"JSON written to {path}", flush=True)
                path = output_path(args.plot, a.shape_name, several)
                if path:
                    msg = report.plot(result, path)
                    print(msg or f"chart written to {path}", flush=True)
                print("", flush=True)
            if any(r["status"] == "FAILED" for r in result["rows"]):
                rc = EXIT_FAILED
            elif result["budget_alarms"] and rc == 0:
                rc = EXIT_BUDGET_STATUS
        return rc
    finally:
        _teardown()


def _teardown():
    # Communication buffers (DeepEP, UCCL, HybridEP) must go before the process group, or
    # destroy_process_group can hang. Each release hook is optional: only what was loaded.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    for module, fn in (("moe_dispatch.bench.megatron_ref", "teardown"),
                       ("moe_dispatch.backends.deepep.buffer", "free_all"),
                       ("moe_dispatch.fused_a2a", "free_buffer"),
                       ("moe_dispatch.fused_a2a", "reset_hybrid_ep_buffer")):
        mod = sys.modules.get(module)
        if mod is not None and callable(getattr(mod, fn, None)):
            try:
                getattr(mod, fn)()
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
        device: torch.device, partial_json: Optional[str] = None) -> dict:
    """Run the whole benchmark on this rank; every rank returns the same result dict.

    partial_json: rank 0 rewrites this file after every finished row (``"complete":
    false``), so a crash in one backend (a segfault in a native library takes the whole
    process group down) still leaves the rows measured before it.
    Execution order: the alltoall check reference, the reference rows, then the backends
    in the order asked for, each followed by its variants and (``--budget``) its budget
    rows; the table lists backends first.
    """
    from .. import available_backends
    from . import report

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
    clock = Clock(device, group, flush_l2=not args.no_l2_flush,
                  min_warmup_s=None if args.warmup_ms is None else args.warmup_ms / 1e3)
    ctx = Ctx(args, shape, rank, world, local_rank, local_world, num_nodes, device, group,
              sets, clock)
    ctx.log(f"moe_dispatch.bench: {world} rank(s) on {num_nodes} node(s), {_device_name(device)}, "
            f"{args.shape_name} shape {shape.as_dict()}, {nsets} input sets")

    from . import runners
    avail = available_backends()
    experts, experts_label = None, None
    if not args.no_layer:
        from .experts import build_experts
        L = shape.experts // world
        experts, experts_label = build_experts(shape.experts, L, rank * L, shape.hidden,
                                               args.ffn, shape.torch_dtype, device)
    # What backend="auto" would pick here, and the topology it saw (collective).
    from ..auto import detect_topology, rule
    topo = detect_topology(group, device)
    auto_name, auto_why = rule(topo)
    ctx.log(f"auto would choose {auto_name!r}: {auto_why}")
    import platform
    config = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command="python -m moe_dispatch.bench " + " ".join(sys.argv[1:]),
        hosts=sorted(set(hosts)), world_size=world, num_nodes=num_nodes,
        local_world_size=local_world, device=device.type, device_name=_device_name(device),
        torch=torch.__version__, cuda=torch.version.cuda,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        python=platform.python_version(),
        preset=args.shape_name, shape=shape.as_dict(), iters=args.iters, warmup=args.warmup,
        warmup_s=clock.min_warmup_s,
        layer_iters=args.layer_iters, num_sets=nsets, l2_flush=not args.no_l2_flush,
        ffn=args.ffn, experts_impl=experts_label, check=args.check, fp8=args.fp8,
        deepep_sms=args.deepep_sms, seed=args.seed, backend_options=args.backend_opts,
        budget=args.budget, budget_rows=runners.budget_rows(ctx) if args.budget else None,
        variants=[dict(label=l, backend=b, options=o) for l, b, o in args.variants],
        available_backends=avail,
        auto=dict(choice=auto_name, reason=auto_why, num_nodes=topo.num_nodes,
                  gpus_per_node=topo.gpus_per_node, peer_access=topo.peer_access,
                  deepep_internode=topo.deepep_internode))
    refs: List[Row] = []
    ours: List[Row] = []

    def result(complete: bool) -> dict:
        rows_d = [r.as_dict() for r in ours + refs]
        return dict(schema=report.SCHEMA, complete=complete, config=config,
                    routing=routing_stats(sets, shape), rows=rows_d,
                    ratios=report.ratios(rows_d), budget_alarms=report.budget_alarms(rows_d))

    def progress() -> None:
        if partial_json and rank == 0:
            report.write_json(result(False), partial_json)

    dense, a2a = runners.check_references(ctx) if args.check else (None, None)
    if not args.no_references:
        from . import deepep_ref, megatron_ref
        refs.extend(deepep_ref.run(ctx))
        progress()
        refs.extend(megatron_ref.run(ctx, experts, a2a if a2a is not None else dense))
        progress()
    for name in args.backend_list:
        exp = dense if (name == "alltoall" or a2a is None) else a2a
        ours.extend(runners.bench_backend(ctx, name, avail.get(name, "not registered"),
                                          experts, exp))
        progress()
        for label, vname, vopts in args.variants:
            if vname == name:
                ours.extend(runners.bench_backend(ctx, vname, avail.get(vname, "not registered"),
                                                  experts, exp, label=label, options=vopts))
                progress()
        if args.budget:
            ours.extend(runners.bench_budget(ctx, name, avail.get(name, "not registered"),
                                             experts, exp))
            progress()
    return result(True)


def _gather_obj(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
