"""Resumable checkpoints: every rank's model, optimizer and RNG state at a step.

Layout under ``OUT/checkpoint/``: ``step_NNNNNNN/rankRRRRR.pt`` (one file per rank, since
each rank holds different experts) and ``latest.json`` naming the complete one. Only the
newest step is kept. A checkpoint restores only onto the same world size and EP size.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist


def checkpoint_root(out: str) -> str:
    """The checkpoint directory of the run writing to ``out``."""
    return os.path.join(out, "checkpoint")


def save_checkpoint(out: str, rank: int, world: int, ep: int, step: int, model, optim,
                    device: torch.device) -> None:
    """Write this rank's state after ``step`` optimizer steps (collective: every rank calls
    it with the same ``step``)."""
    root = checkpoint_root(out)
    d = os.path.join(root, f"step_{step:07d}")
    os.makedirs(d, exist_ok=True)
    state = {
        "step": step, "world": world, "ep": ep,
        "model": model.state_dict(), "optim": optim.state_dict(),
        # The data stream is a function of the step, so the next step index is the position.
        "data_position": step,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
    }
    tmp = os.path.join(d, f"rank{rank:05d}.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(d, f"rank{rank:05d}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        # "latest" is written last: a checkpoint is complete only once every rank's file is.
        with open(os.path.join(root, "latest.json.tmp"), "w") as f:
            json.dump({"step": step, "world": world, "ep": ep, "dir": os.path.basename(d)}, f)
        os.replace(os.path.join(root, "latest.json.tmp"), os.path.join(root, "latest.json"))
        for old in os.listdir(root):
            if old.startswith("step_") and old != os.path.basename(d):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(out: str, rank: int, world: int, ep: int, model, optim,
                    device: torch.device) -> int:
    """Restore this rank's state; returns the number of steps already done (0 if none)."""
    meta_path = os.path.join(checkpoint_root(out), "latest.json")
    if not os.path.exists(meta_path):
        return 0
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["world"] != world or meta["ep"] != ep:
        raise RuntimeError(f"checkpoint in {out} was written by world={meta['world']} "
                           f"ep={meta['ep']}; this run has world={world} ep={ep}")
    path = os.path.join(checkpoint_root(out), meta["dir"], f"rank{rank:05d}.pt")
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    return int(state["data_position"])
