"""The ``moe-train`` command: read the flags and the recipe, start the ranks, train.

Under ``torchrun`` the ranks come from the environment (NCCL on GPUs, gloo on CPUs).
Started directly, the command spawns ``nproc`` ranks itself (gloo on CPU, NCCL on GPUs).

What can be known wrong before training (a recipe key, a missing data file or GPU, a
dispatcher backend that cannot run here) is refused in the process the user started, as
one line on stderr with exit code 2, before any rank starts: otherwise every rank would
fail on its own with a traceback.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml

from moe_dispatch.registry import BackendUnavailableError, get_backend_class

from .loop import RunOptions, train
from .recipe import DISPATCHERS, Recipe, RecipeError, load_recipe


class _Refused(Exception):
    """A reason not to start the run; ``main`` prints it as one line and exits 2."""


def _free_port() -> int:
    """A TCP port free on this host now, for the spawned ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, local_rank: int, recipe: Recipe, opts: RunOptions,
               init_method: str, use_cuda: bool) -> None:
    """One rank: join the process group, train, leave the group."""
    if use_cuda:
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        # Share the cores: one rank per core is faster than oversubscribed thread pools.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "gloo"
    kw = dict(backend=backend, init_method=init_method, timeout=timedelta(minutes=10))
    if init_method != "env://":
        kw.update(rank=rank, world_size=world)
    if use_cuda:
        kw["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kw)
    try:
        train(recipe, opts)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, recipe: Recipe, opts: RunOptions, port: int,
             use_cuda: bool) -> None:
    """``mp.spawn``'s entry point (module level, so the spawned process finds it by name)."""
    _rank_main(rank, world, rank, recipe, opts, f"tcp://127.0.0.1:{port}", use_cuda)


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="moe-train", description="Train a small MoE language model with expert "
        "parallelism. Flags override the recipe.")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_cpu.yaml")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--dispatcher", choices=DISPATCHERS, help="dispatch backend")
    p.add_argument("--ep", type=int, help="expert-parallel size")
    p.add_argument("--seed", type=int, help="init and data seed")
    p.add_argument("--out", help="output directory (default runs/<recipe name>)")
    p.add_argument("--data", help="UTF-8 text file to train on (default: pydoc_data.topics)")
    p.add_argument("--nproc", type=int,
                   help="ranks to start when not under torchrun (recipe key nproc; "
                   "torchrun's --nproc-per-node decides under torchrun)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in the output directory")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after STEP with a checkpoint, as if interrupted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set model.hidden=128 (YAML value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file with the flags and ``--set`` overrides applied, checked."""
    overrides: Dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise _Refused(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    for flag, key in (("steps", "train.steps"), ("dispatcher", "dispatcher"), ("ep", "ep"),
                      ("seed", "seed"), ("data", "data.path"), ("nproc", "nproc"),
                      ("out", "out")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as exc:
        raise _Refused(str(exc)) from None
    if recipe.data.path is not None and not os.path.isfile(recipe.data.path):
        raise _Refused(f"data file {recipe.data.path} not found")
    return recipe


def _wants_cuda(recipe: Recipe) -> bool:
    """Whether the ranks run on GPUs; refuses a recipe asking for GPUs that are not here."""
    use_cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise _Refused("recipe asks for device cuda but no GPU is visible")
    return use_cuda


def _check_backend(name: str) -> None:
    """Refuse a dispatcher backend that cannot run on this machine, with the registry's
    reason (a missing library, no GPU, ...)."""
    if name == "auto":  # chooses among the backends once the ranks exist
        return
    try:
        get_backend_class(name)
    except BackendUnavailableError as exc:
        raise _Refused(str(exc)) from None


def _spawn(recipe: Recipe, opts: RunOptions, use_cuda: bool) -> int:
    """Start ``recipe.nproc`` ranks on this host, wait for them; returns the exit code."""
    world = recipe.nproc
    if use_cuda and world > torch.cuda.device_count():
        print(f"moe-train: error: nproc={world} but only {torch.cuda.device_count()} GPUs; "
              "use --nproc or torchrun", file=sys.stderr)
        return 2
    if world == 1:
        _rank_main(0, 1, 0, recipe, opts, f"tcp://127.0.0.1:{_free_port()}", use_cuda)
        return 0
    import torch.multiprocessing as mp
    try:
        mp.spawn(_spawned, args=(world, recipe, opts, _free_port(), use_cuda), nprocs=world,
                 join=True)
    except mp.ProcessRaisedException as exc:
        print(f"moe-train: a rank failed:\n{exc}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as exc:
        print(f"moe-train: a rank exited abnormally: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``moe-train``). Returns the process exit code."""
    args = _parse_args(argv)
    try:
        recipe = _recipe_from_args(args)
        use_cuda = _wants_cuda(recipe)
        _check_backend(recipe.dispatcher)
    except _Refused as exc:
        print(f"moe-train: error: {exc}", file=sys.stderr)
        return 2
    opts = RunOptions(out=recipe.out or os.path.join("runs", recipe.name), resume=args.resume,
                      stop_at=args.stop_at, progress=not args.no_progress)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        _rank_main(rank, world, local_rank, recipe, opts, "env://", use_cuda)
        return 0
    return _spawn(recipe, opts, use_cuda)
