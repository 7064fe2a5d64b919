"""End-to-end MoE language-model training with expert parallelism.

    moe-train RECIPE [--steps N] [--dispatcher NAME] [--ep N] [--seed N] [--out DIR]
                     [--data PATH] [--nproc N] [--resume] [--set KEY=VALUE ...]
    python -m token_dispatcher.train RECIPE ...
    torchrun --nproc-per-node 4 -m token_dispatcher.train recipes/gpu_small.yaml

Under ``torchrun`` the ranks come from the environment (NCCL on GPUs, gloo on CPUs).
Started directly, the command spawns ``nproc`` ranks itself (gloo on CPU, NCCL on GPUs).

Parallel layout: ranks [g*ep, (g+1)*ep) form EP group g and split the experts; every rank
reads its own share of the global batch. Gradients of non-expert weights are averaged over
all ranks; an expert's gradient is summed over its replica group (the ranks holding the
same experts, one per EP group) and divided by the world size, which is the gradient of
the mean loss over all ranks.

Outputs in ``--out DIR``: ``metrics.jsonl`` (one JSON object per logged step),
``plot.png`` (loss and expert load), ``checkpoint/`` (resume with ``--resume``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .data import ByteBatches, load_corpus
from .model import ModelConfig, MoETransformer, lm_loss

DISPATCHERS = ("alltoall", "allgather", "deepep", "hybridep", "uccl", "nvshmem", "auto")


# ----------------------------------------------------------------------------- recipes

class RecipeError(ValueError):
    """A recipe (or a command-line override) is invalid; the message names the key."""


@dataclass
class TrainConfig:
    """The ``train:`` section.

    steps:            optimizer steps.
    batch_size:       sequences per step over all ranks (divisible by the world size).
    lr:               peak learning rate (AdamW).
    min_lr_ratio:     cosine decay floor as a fraction of ``lr``.
    warmup_steps:     linear warmup steps.
    weight_decay:     AdamW weight decay on matrices (norm gains are not decayed).
    beta1, beta2, eps: AdamW.
    grad_clip:        max global gradient norm (0 = off).
    precision:        "fp32" or "bf16" (autocast; experts run grouped GEMMs in bf16 on GPUs).
    log_every:        write a metrics line every this many steps (and at the first/last).
    checkpoint_every: save a resumable checkpoint every this many steps (0 = only at the end).
    plot:             write DIR/plot.png at the end (needs matplotlib).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"
    log_every: int = 10
    checkpoint_every: int = 0
    plot: bool = True


@dataclass
class DataConfig:
    """The ``data:`` section. path: UTF-8 text file; None = ``pydoc_data.topics``."""

    path: Optional[str] = None


@dataclass
class Recipe:
    """A training recipe (YAML). Top-level keys:

    name:            label for logs (default: the file name).
    seed:            init + data order seed.
    device:          "auto" | "cpu" | "cuda".
    nproc:           ranks to spawn when not started by torchrun.
    dispatcher:      alltoall | allgather | deepep | hybridep | uccl | nvshmem | auto.
    ep:              expert-parallel size (divides the world size and num_experts);
                     None = the whole world.
    capacity_factor: per-rank expert capacity factor (None = dropless).
    capacity_policy: which overflow slots to drop: "probs" (lowest probs) or "position"
                     (latest tokens).
    pad_multiple:    pad each expert's rows to a multiple of this (None = no padding).
    backend_options: dict passed to the dispatcher backend.
    out:             output directory (default runs/<recipe name>).
    model / train / data: sections, see ``ModelConfig``, ``TrainConfig``, ``DataConfig``.
    """

    name: str = ""
    seed: int = 0
    device: str = "auto"
    nproc: int = 2
    dispatcher: str = "alltoall"
    ep: Optional[int] = None
    capacity_factor: Optional[float] = None
    capacity_policy: str = "probs"
    pad_multiple: Optional[int] = None
    backend_options: Dict[str, Any] = field(default_factory=dict)
    out: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def _coerce(where: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(where, value, inner)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where} must be a string, got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise RecipeError(f"{where} must be a mapping, got {value!r}")
    return value


def _fill(cls, data: Any, where: str, source: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'the recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(f"{source}: unknown recipe key {full!r} (known keys"
                              f"{' in ' + where if where else ''}: {', '.join(names)})")
        if key in _SECTIONS and not where:
            kwargs[key] = _fill(_SECTIONS[key], value if value is not None else {}, key, source)
        else:
            kwargs[key] = _coerce(f"{source}: recipe key {full!r}", value, hints[key])
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def load_recipe(path: str, overrides: Optional[Dict[str, Any]] = None) -> Recipe:
    """Read and validate a recipe file.

    path:      YAML file.
    overrides: {"dotted.key": value} applied on top (command-line flags); validated the same.
    Raises ``RecipeError`` naming the offending key.
    """
    import yaml
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of keys, got {type(raw).__name__}")
    for k, v in (overrides or {}).items():
        _set_path(raw, k, v)
    r = _fill(Recipe, raw, "", path)
    if not r.name:
        r.name = os.path.splitext(os.path.basename(path))[0]
    validate_recipe(r, path)
    return r


def validate_recipe(r: Recipe, source: str = "recipe") -> None:
    def bad(key, msg):
        raise RecipeError(f"{source}: recipe key {key!r} {msg}")
    if r.dispatcher not in DISPATCHERS:
        bad("dispatcher", f"must be one of {', '.join(DISPATCHERS)}, got {r.dispatcher!r}")
    if r.device not in ("auto", "cpu", "cuda"):
        bad("device", f"must be auto, cpu or cuda, got {r.device!r}")
    if r.nproc < 1:
        bad("nproc", "must be >= 1")
    if r.ep is not None and r.ep < 1:
        bad("ep", "must be >= 1")
    if r.ep is not None and r.model.num_experts % r.ep:
        bad("ep", f"({r.ep}) must divide model.num_experts ({r.model.num_experts})")
    if r.capacity_factor is not None and r.capacity_factor <= 0:
        bad("capacity_factor", "must be > 0")
    if r.capacity_policy not in ("probs", "position"):
        bad("capacity_policy", f"must be probs or position, got {r.capacity_policy!r}")
    if r.train.precision not in ("fp32", "bf16"):
        bad("train.precision", f"must be fp32 or bf16, got {r.train.precision!r}")
    if r.train.steps < 1:
        bad("train.steps", "must be >= 1")
    if r.train.log_every < 1:
        bad("train.log_every", "must be >= 1")
    if r.model.score_func not in ("softmax", "sigmoid"):
        bad("model.score_func", f"must be softmax or sigmoid, got {r.model.score_func!r}")
    if r.model.expert_impl not in ("auto", "grouped_mm", "loop"):
        bad("model.expert_impl", f"must be auto, grouped_mm or loop, got {r.model.expert_impl!r}")
    try:
        r.model.validate()
    except ValueError as exc:
        raise RecipeError(f"{source}: {exc}") from None


# ----------------------------------------------------------------------------- helpers

def rss_mb() -> float:
    """Resident set size of this process in MiB (current on Linux, peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class Progress:
    """A progress bar on stderr: tqdm when installed, else a one-line bar of our own
    (redrawn only on a terminal; in a log file the per-step log lines suffice)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.n, self.enabled = total, initial, enabled
        self._tqdm = None
        self._t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, postfix: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(1)
        elif self._tty:
            frac = self.n / max(self.total, 1)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            rate = self.n / max(time.perf_counter() - self._t0, 1e-9)
            sys.stderr.write(f"\r[{bar}] {self.n}/{self.total} {rate:.2f} step/s {postfix}\033[K")
            sys.stderr.flush()

    def write(self, line: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(line)
        else:
            if self.enabled and self._tty:
                sys.stderr.write("\r\033[K")
            print(line, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self._tty:
            sys.stderr.write("\n")


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Loss and expert load (max/mean tokens per expert, per layer) against step."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the training plot needs matplotlib: pip install matplotlib "
                           "(or set train.plot: false)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["loss"] for r in rows], label="LM loss")
    ax1.axhline(math.log(256), color="gray", ls=":", lw=1, label="ln 256 (uniform bytes)")
    ax1.set_xlabel("step"); ax1.set_ylabel("cross entropy (nats/byte)"); ax1.legend()
    ax1.set_title("loss")
    nl = len(rows[0].get("load_imbalance_per_layer", [])) if rows else 0
    for l in range(nl):
        ax2.plot(steps, [r["load_imbalance_per_layer"][l] for r in rows], lw=1,
                 label=f"layer {l}")
    ax2.axhline(1.0, color="gray", ls=":", lw=1)
    ax2.set_xlabel("step"); ax2.set_ylabel("max / mean tokens per expert")
    ax2.set_title("expert load"); ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _lr_at(t: TrainConfig, step: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, cosine to min_lr_ratio."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    frac = min(max(step - t.warmup_steps, 0) / span, 1.0)
    lo = t.lr * t.min_lr_ratio
    return lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(tensors: List[torch.Tensor], group, scale: float, size: int) -> None:
    """Sum ``tensors`` over ``group`` in one flat collective, then scale in place."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if size > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


@dataclass
class RunOptions:
    """Run-time options that are not part of the model/recipe.

    out:      output directory.
    resume:   continue from ``out/checkpoint`` if one is there.
    stop_at:  stop after this step (1-based) with a checkpoint, as an interruption would.
    progress: draw the progress bar (rank 0).
    quiet:    no per-step log lines.
    """

    out: str
    resume: bool = False
    stop_at: Optional[int] = None
    progress: bool = True
    quiet: bool = False


# ----------------------------------------------------------------------------- training

def _ckpt_root(out: str) -> str:
    return os.path.join(out, "checkpoint")


def _save_checkpoint(opts: RunOptions, rank: int, world: int, ep: int, step: int,
                     model, optim, device) -> None:
    root = _ckpt_root(opts.out)
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


def _load_checkpoint(opts: RunOptions, rank: int, world: int, ep: int, model, optim,
                     device) -> int:
    """Restore this rank's state; returns the number of steps already done (0 if none)."""
    meta_path = os.path.join(_ckpt_root(opts.out), "latest.json")
    if not os.path.exists(meta_path):
        return 0
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["world"] != world or meta["ep"] != ep:
        raise RuntimeError(f"checkpoint in {opts.out} was written by world={meta['world']} "
                           f"ep={meta['ep']}; this run has world={world} ep={ep}")
    path = os.path.join(_ckpt_root(opts.out), meta["dir"], f"rank{rank:05d}.pt")
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    return int(state["data_position"])


def train(recipe: Recipe, opts: RunOptions) -> List[Dict[str, Any]]:
    """Train on the current process group (or a single process without one).

    Every rank calls this; it returns the metrics rows (the same list on every rank).
    """
    rank, world = _world()
    m, t = recipe.model, recipe.train
    ep = recipe.ep or world
    if world % ep:
        raise RecipeError(f"ep={ep} does not divide the number of ranks ({world}): start a "
                          f"multiple of {ep} ranks (--nproc or torchrun) or change --ep")
    if m.num_experts % ep:
        raise RecipeError(f"ep={ep} must divide model.num_experts ({m.num_experts})")
    if t.batch_size % world:
        raise RecipeError(f"train.batch_size ({t.batch_size}) must be divisible by the "
                          f"number of ranks ({world})")
    # Checked on every rank (not just the plotting one) so that all ranks stop together.
    if t.plot and importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("the training plot needs matplotlib: pip install matplotlib "
                           "(or set train.plot: false)")
    if world > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    elif recipe.device == "cuda" or (recipe.device == "auto" and world == 1
                                     and torch.cuda.is_available()):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)

    # EP group g = ranks [g*ep, (g+1)*ep); replica group j = ranks {j, j+ep, ...}.
    # new_group is collective: every rank creates every group in the same order.
    ep_group = rep_group = None
    if world > 1:
        if ep == world:
            ep_group = dist.group.WORLD
        else:
            for g in range(world // ep):
                grp = dist.new_group(list(range(g * ep, (g + 1) * ep)))
                if rank // ep == g:
                    ep_group = grp
        if ep < world:
            if ep == 1:
                rep_group = dist.group.WORLD
            else:
                for j in range(ep):
                    grp = dist.new_group(list(range(j, world, ep)))
                    if rank % ep == j:
                        rep_group = grp
    from .dispatcher import MoETokenDispatcher
    disp = MoETokenDispatcher(num_experts=m.num_experts, ep_group=ep_group,
                              backend=recipe.dispatcher, capacity_factor=recipe.capacity_factor,
                              pad_multiple=recipe.pad_multiple,
                              capacity_policy=recipe.capacity_policy,
                              backend_options=recipe.backend_options or None)
    model = MoETransformer(m, disp, seed=recipe.seed).to(device)
    expert_ps = list(model.expert_parameters())
    dense_ps = list(model.dense_parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)

    corpus = load_corpus(recipe.data.path)
    data = ByteBatches(corpus, m.seq_len, t.batch_size, recipe.seed)
    os.makedirs(opts.out, exist_ok=True)
    start = _load_checkpoint(opts, rank, world, ep, model, optim, device) if opts.resume else 0
    if opts.resume and start == 0 and rank == 0 and not opts.quiet:
        print(f"no checkpoint in {_ckpt_root(opts.out)}: starting from step 0", flush=True)
    metrics_path = os.path.join(opts.out, "metrics.jsonl")
    rows: List[Dict[str, Any]] = []
    if start > 0 and os.path.exists(metrics_path):
        # Keep the lines up to the checkpoint; the resumed run writes the rest again.
        with open(metrics_path) as f:
            rows = [r for r in (json.loads(l) for l in f if l.strip()) if r["step"] <= start]
    if world > 1:
        dist.barrier()  # every rank has read the file before rank 0 rewrites it
    if rank == 0:
        with open(metrics_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if world > 1:
        dist.barrier()

    n_dense = sum(p.numel() for p in dense_ps)
    n_expert = sum(p.numel() for p in expert_ps) * ep
    per_tok = n_dense + n_expert * m.top_k // m.num_experts
    row_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    expert_impl = model.blocks[0].moe.experts.resolved_impl(
        torch.empty(0, m.hidden, device=device, dtype=row_dtype))
    bar = Progress(t.steps, start, opts.progress and rank == 0)
    if rank == 0 and not opts.quiet:
        bar.write(f"moe-train {recipe.name}: world={world} ep={ep} dispatcher={disp.backend_name} "
                  f"device={device.type} experts={expert_impl} params={(n_dense + n_expert) / 1e6:.2f}M "
                  f"(active/token {per_tok / 1e6:.2f}M) steps={t.steps} "
                  f"tokens/step={t.batch_size * m.seq_len}"
                  + (f" resuming at step {start}" if start else ""))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    last = t.steps if opts.stop_at is None else min(t.steps, opts.stop_at)
    interval_time, interval_tokens = 0.0, 0
    rep_size = dist.get_world_size(rep_group) if rep_group is not None else 1
    ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
    t_start = time.perf_counter()
    for step in range(start, last):
        t0 = time.perf_counter()
        batch = data.local_batch_at(step, rank, world).to(device, non_blocking=True)
        inp, tgt = batch[:, :-1], batch[:, 1:]
        lr = _lr_at(t, step)
        for g in optim.param_groups:
            g["lr"] = lr
        with amp:
            out = model(inp)
        loss_lm = lm_loss(out.logits_BSV, tgt)
        loss = loss_lm + out.aux_loss + out.z_loss
        optim.zero_grad(set_to_none=False)
        loss.backward()
        for p in model.parameters():
            if p.grad is None:  # keep every rank's collectives the same shape
                p.grad = torch.zeros_like(p)
        _all_reduce_([p.grad for p in dense_ps], None, 1.0 / world, world)
        _all_reduce_([p.grad for p in expert_ps], rep_group, 1.0 / world, rep_size)
        sq = torch.stack([p.grad.float().square().sum() for p in dense_ps]).sum()
        sq_e = torch.stack([p.grad.float().square().sum() for p in expert_ps]).sum()
        if ep_size > 1:  # experts are sharded over the EP group: add the other shards
            dist.all_reduce(sq_e, group=ep_group)
        gnorm = (sq + sq_e).sqrt()
        if t.grad_clip > 0:
            coef = torch.clamp(t.grad_clip / (gnorm + 1e-6), max=1.0)
            for p in model.parameters():
                p.grad.mul_(coef)
        optim.step()

        stats = torch.stack([loss_lm.detach().float(), out.aux_loss.detach().float(),
                             out.z_loss.detach().float()])
        counts_NE = out.tokens_per_expert_NE.detach().to(torch.float64)
        packed = torch.cat([stats.double(), counts_NE.reshape(-1)])
        if world > 1:
            dist.all_reduce(packed)
        stats = packed[:3] / world
        counts_NE = packed[3:].view_as(counts_NE)
        if m.score_bias:
            for l, router in enumerate(model.routers()):
                router.update_expert_bias(counts_NE[l], m.bias_update_rate)
        loss_v, aux_v, z_v = (float(x) for x in stats.tolist())  # host sync ends the step
        dt = time.perf_counter() - t0
        interval_time += dt
        interval_tokens += t.batch_size * m.seq_len
        done = step + 1
        # The same steps whether or not the run was interrupted and resumed.
        is_log = done % t.log_every == 0 or done == 1 or done == t.steps
        if is_log:
            counts_cpu = counts_NE.cpu()
            mean_l = counts_cpu.mean(1)
            imb = (counts_cpu.max(1).values / mean_l.clamp_min(1e-9)).tolist()
            rss = torch.tensor([rss_mb()], dtype=torch.float64, device=packed.device)
            if world > 1:
                dist.all_reduce(rss, op=dist.ReduceOp.MAX)
            row = {"step": done, "loss": loss_v, "aux_loss": aux_v, "z_loss": z_v,
                   "lr": lr, "grad_norm": float(gnorm),
                   "tokens_per_s": interval_tokens / max(interval_time, 1e-9),
                   "max_expert_load": float(counts_cpu.max()),
                   "mean_expert_load": float(mean_l.mean()),
                   "load_imbalance": float(sum(imb) / len(imb)),
                   "load_imbalance_per_layer": imb,
                   "rss_mb": float(rss.item()),
                   "elapsed_s": time.perf_counter() - t_start}
            if device.type == "cuda":
                row["gpu_mem_mb"] = torch.cuda.memory_allocated(device) / 2**20
                row["gpu_max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
            interval_time, interval_tokens = 0.0, 0
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if not opts.quiet:
                    bar.write(f"step {done:>5}/{t.steps} loss {loss_v:.4f} aux {aux_v:.4f} "
                              f"tok/s {row['tokens_per_s']:,.0f} load max/mean "
                              f"{row['load_imbalance']:.2f} rss {row['rss_mb']:.0f}MB"
                              + (f" gpu {row['gpu_max_mem_mb']:.0f}MB" if "gpu_max_mem_mb" in row
                                 else ""))
        bar.update(f"loss {loss_v:.3f}")
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == last:
            _save_checkpoint(opts, rank, world, ep, done, model, optim, device)
    bar.close()
    if rank == 0 and t.plot:
        plot_metrics(metrics_path, os.path.join(opts.out, "plot.png"))
    if rank == 0 and not opts.quiet and rows:
        first = rows[0]["loss"]
        print(f"done: steps {start + 1}-{last} in {time.perf_counter() - t_start:.1f}s, "
              f"loss {first:.4f} -> {rows[-1]['loss']:.4f}; "
              f"{metrics_path}" + (f", {os.path.join(opts.out, 'plot.png')}" if t.plot else ""),
              flush=True)
    return rows


# ----------------------------------------------------------------------------- launching

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, local_rank: int, recipe: Recipe, opts: RunOptions,
               init_method: str, use_cuda: bool) -> None:
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


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``moe-train``). Returns the process exit code."""
    import yaml
    args = _parse_args(argv)
    overrides: Dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            print(f"moe-train: error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
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
        print(f"moe-train: error: {exc}", file=sys.stderr)
        return 2
    if recipe.data.path is not None and not os.path.isfile(recipe.data.path):
        print(f"moe-train: error: data file {recipe.data.path} not found", file=sys.stderr)
        return 2
    opts = RunOptions(out=recipe.out or os.path.join("runs", recipe.name), resume=args.resume,
                      stop_at=args.stop_at, progress=not args.no_progress)
    use_cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        print("moe-train: error: recipe asks for device cuda but no GPU is visible",
              file=sys.stderr)
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        _rank_main(rank, world, local_rank, recipe, opts, "env://", use_cuda)
        return 0
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


if __name__ == "__main__":
    # Import through the package so spawned ranks find these functions by module name.
    from token_dispatcher.train import main as _main
    sys.exit(_main())
