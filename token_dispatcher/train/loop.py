"""The training loop: ``train(recipe, opts)``, run by every rank of the process group.

Parallel layout: ranks [g*ep, (g+1)*ep) form EP group g and split the experts; every rank
reads its own share of the global batch. Gradients of non-expert weights are averaged over
all ranks; an expert's gradient is summed over its replica group (the ranks holding the
same experts, one per EP group) and divided by the world size, which is the gradient of
the mean loss over all ranks.

One step (``_step``): forward under autocast, backward, gradient reduction and global-norm
clipping, AdamW, then a single all-reduce of the loss terms and expert loads; reading the
loss back is the host sync that ends the step.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..data import ByteBatches, load_corpus
from ..dispatcher import MoETokenDispatcher
from ..model import ModelOutput, MoETransformer, lm_loss
from .budget import BudgetState, forward_checked
from .checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from .metrics import (Progress, append_metrics, check_plot_possible, plot_metrics,
                      restart_metrics, rss_mb)
from .recipe import WIRE_DTYPES, Recipe, RecipeError, TrainConfig
from .step_graph import capture_step


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


# ----------------------------------------------------------------------------- helpers

def _lr_at(t: TrainConfig, step: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, cosine to min_lr_ratio."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    frac = min(max(step - t.warmup_steps, 0) / span, 1.0)
    lo = t.lr * t.min_lr_ratio
    return lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def _world() -> tuple:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(tensors: List[torch.Tensor], group, scale: float, size: int) -> None:
    """Sum ``tensors`` over ``group`` in one flat collective, then scale in place."""
    if not tensors or (size == 1 and scale == 1.0):  # nothing to sum over, nothing to scale
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if size > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


# ----------------------------------------------------------------------------- setup

@dataclass
class _Layout:
    """This rank's place in the parallel layout (see the module docstring).

    ep_group:  the ranks that split the experts with this one (None: a single process).
    rep_group: the ranks holding the same experts as this one (None: no other rank does).
    ep_size, rep_size: their sizes (1 for None).
    """

    rank: int
    world: int
    ep: int
    ep_group: Any
    rep_group: Any
    ep_size: int
    rep_size: int


def _check_world(recipe: Recipe, world: int, ep: int) -> None:
    """The recipe checks that need the number of ranks (the rest ran at load time)."""
    m, t = recipe.model, recipe.train
    if world % ep:
        raise RecipeError(f"ep={ep} does not divide the number of ranks ({world}): start a "
                          f"multiple of {ep} ranks (--nproc or torchrun) or change --ep")
    if m.num_experts % ep:
        raise RecipeError(f"ep={ep} must divide model.num_experts ({m.num_experts})")
    if t.batch_size % world:
        raise RecipeError(f"train.batch_size ({t.batch_size}) must be divisible by the "
                          f"number of ranks ({world})")
    # Checked on every rank (not just the plotting one) so that all ranks stop together.
    if t.plot:
        check_plot_possible()


def _pick_device(recipe: Recipe, world: int) -> torch.device:
    """The device this rank trains on: its GPU under NCCL, else what the recipe asks."""
    if world > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if recipe.device == "cuda" or (recipe.device == "auto" and world == 1
                                   and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _make_layout(rank: int, world: int, ep: int) -> _Layout:
    """Create the EP and replica groups (collective: every rank calls it)."""
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
    return _Layout(rank, world, ep, ep_group, rep_group,
                   ep_size=dist.get_world_size(ep_group) if ep_group is not None else 1,
                   rep_size=dist.get_world_size(rep_group) if rep_group is not None else 1)


@dataclass
class _Run:
    """What every step reads, built once per run by ``_build``.

    dense_ps:  parameters every rank holds (averaged over all ranks).
    expert_ps: this rank's experts' parameters (averaged over the replica group).
    """

    recipe: Recipe
    opts: RunOptions
    layout: _Layout
    device: torch.device
    dispatcher: MoETokenDispatcher
    model: MoETransformer
    optim: torch.optim.Optimizer
    dense_ps: List[torch.nn.Parameter]
    expert_ps: List[torch.nn.Parameter]
    data: ByteBatches
    budget: BudgetState = None
    log: Any = print
    step_graph: Any = None  # the captured step (``train.cuda_graph_scope: step``), or None


def _build(recipe: Recipe, opts: RunOptions, layout: _Layout, device: torch.device) -> _Run:
    """Dispatcher, model, optimizer and data for this rank (call after seeding)."""
    m, t = recipe.model, recipe.train
    disp = MoETokenDispatcher(num_experts=m.num_experts, ep_group=layout.ep_group,
                              backend=recipe.dispatcher, capacity_factor=recipe.capacity_factor,
                              pad_multiple=recipe.pad_multiple,
                              capacity_policy=recipe.capacity_policy,
                              backend_options=recipe.backend_options or None,
                              max_rows_per_rank=recipe.max_rows_per_rank,
                              wire_dtype=WIRE_DTYPES[recipe.wire_dtype])
    if getattr(m, "hf", None):  # a transformers architecture (train/hf_model.py)
        from .hf_model import build_hf_model
        model = build_hf_model(m, disp, seed=recipe.seed).to(device)
    else:
        model = MoETransformer(m, disp, seed=recipe.seed).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    data = ByteBatches(load_corpus(recipe.data.path), m.seq_len, t.batch_size, recipe.seed)
    if t.cuda_graph and device.type != "cuda":
        raise RecipeError("train.cuda_graph needs CUDA GPUs (device: cuda)")
    quiet = opts.quiet or layout.rank != 0
    return _Run(recipe, opts, layout, device, disp, model, optim,
                dense_ps=list(model.dense_parameters()),
                expert_ps=list(model.expert_parameters()), data=data,
                budget=BudgetState(recipe.max_rows_per_rank, capture_pending=t.cuda_graph),
                log=(lambda line: None) if quiet else (lambda line: print(line, flush=True)))


def _resume(run: _Run) -> int:
    """Restore the checkpoint in ``opts.out``; the number of steps it had done (0: none)."""
    lay = run.layout
    start = load_checkpoint(run.opts.out, lay.rank, lay.world, lay.ep, run.model, run.optim,
                            run.device)
    if start == 0 and lay.rank == 0 and not run.opts.quiet:
        print(f"no checkpoint in {checkpoint_root(run.opts.out)}: starting from step 0",
              flush=True)
    return start


def _banner(run: _Run, start: int) -> str:
    """The run's first log line: layout, backend, parameter counts, work per step."""
    m, t, lay = run.recipe.model, run.recipe.train, run.layout
    n_dense = sum(p.numel() for p in run.dense_ps)
    n_expert = sum(p.numel() for p in run.expert_ps) * lay.ep  # every EP rank's share
    per_tok = n_dense + n_expert * m.top_k // m.num_experts
    row_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    expert_impl = run.model.blocks[0].moe.experts.resolved_impl(
        torch.empty(0, m.hidden, device=run.device, dtype=row_dtype))
    return (f"moe-train {run.recipe.name}: world={lay.world} ep={lay.ep} "
            f"dispatcher={run.dispatcher.backend_name}"
            f"{' wire=' + run.recipe.wire_dtype if run.recipe.wire_dtype else ''} "
            f"device={run.device.type} "
            f"experts={expert_impl} params={(n_dense + n_expert) / 1e6:.2f}M "
            f"(active/token {per_tok / 1e6:.2f}M) steps={t.steps} "
            f"tokens/step={t.batch_size * m.seq_len}"
            + (f" resuming at step {start}" if start else ""))


# ----------------------------------------------------------------------------- one step

@dataclass
class _StepResult:
    """One optimizer step's numbers, global over all ranks (the same on every rank).

    loss, aux_loss, z_loss: the mean over ranks of this step's loss terms (host floats).
    grad_norm:  0-dim tensor, the global gradient norm before clipping.
    counts_NE:  [layers, E] float64 slots routed to each expert, summed over ranks.
    """

    lr: float
    loss: float
    aux_loss: float
    z_loss: float
    grad_norm: torch.Tensor
    counts_NE: torch.Tensor


def _step(run: _Run, step: int, amp) -> _StepResult:
    """Optimizer step ``step`` (0-based) on this rank's share of its batch."""
    lay = run.layout
    # [B, S + 1] bytes per window: inputs and their next-byte targets.
    batch = run.data.local_batch_at(step, lay.rank, lay.world).to(run.device, non_blocking=True)
    inp_BS, tgt_BS = batch[:, :-1], batch[:, 1:]
    lr = _lr_at(run.recipe.train, step)
    for g in run.optim.param_groups:
        g["lr"] = lr
    forward = _model_forward(run, amp)
    if run.budget.capture_pending:  # first step, or the budget grew: capture again
        _capture(run, forward, inp_BS, tgt_BS, amp)
        run.budget.capture_pending = False
    out, loss_lm = _forward_backward(run, forward, inp_BS, tgt_BS)
    gnorm = _reduce_and_clip_grads(run)
    run.optim.step()
    (loss_v, aux_v, z_v), counts_NE = _global_stats(run, loss_lm, out)
    return _StepResult(lr, loss_v, aux_v, z_v, gnorm, counts_NE)


def _model_forward(run: _Run, amp):
    """(inp_BS, tgt_BS) -> (ModelOutput, lm loss, total loss): the model under ``amp``."""
    def forward(inp_BS, tgt_BS):
        with amp:
            out = run.model(inp_BS)
        loss_lm = lm_loss(out.logits_BSV, tgt_BS)
        return out, loss_lm, loss_lm + out.aux_loss + out.z_loss
    return forward


def _capture(run: _Run, forward, inp_BS, tgt_BS, amp) -> None:
    """CUDA graphs for the coming steps (``train.cuda_graph``): each MoE layer's
    (``cuda_graph_scope: layers``) or the whole forward + backward (``step``)."""
    if run.recipe.train.cuda_graph_scope == "step":
        run.step_graph = capture_step(run.model, forward, inp_BS, tgt_BS)
    else:
        with amp:
            run.model.capture_moe_graphs(inp_BS)


def _forward_backward(run: _Run, forward, inp_BS, tgt_BS):
    """This step's forward and backward (gradients in ``.grad``), the budget policy applied
    (``budget.forward_checked``); returns (ModelOutput, lm loss)."""
    sg = run.step_graph
    if sg is None:
        out, loss_lm, loss = forward_checked(run, lambda: forward(inp_BS, tgt_BS), run.budget,
                                             run.log)
    else:  # the replay zeroes .grad and runs the backward too
        out, loss_lm, loss = forward_checked(run, lambda: sg(inp_BS, tgt_BS), run.budget,
                                             run.log, rerun=lambda: forward(inp_BS, tgt_BS))
    if loss.requires_grad:  # eager (or the exact rerun of an overflowed replay)
        run.optim.zero_grad(set_to_none=False)
        loss.backward()
    return out, loss_lm


def _reduce_and_clip_grads(run: _Run) -> torch.Tensor:
    """Reduce the gradients over the layout (module docstring) and clip them to
    ``train.grad_clip`` by their global norm; returns that norm, before clipping."""
    lay, model = run.layout, run.model
    for p in model.parameters():
        if p.grad is None:  # keep every rank's collectives the same shape
            p.grad = torch.zeros_like(p)
    _all_reduce_([p.grad for p in run.dense_ps], None, 1.0 / lay.world, lay.world)
    _all_reduce_([p.grad for p in run.expert_ps], lay.rep_group, 1.0 / lay.world, lay.rep_size)
    sq, sq_e = (_sq_norm([p.grad for p in ps], run.device)
                for ps in (run.dense_ps, run.expert_ps))
    if lay.ep_size > 1:  # experts are sharded over the EP group: add the other shards
        dist.all_reduce(sq_e, group=lay.ep_group)
    gnorm = (sq + sq_e).sqrt()
    clip = run.recipe.train.grad_clip
    if clip > 0:
        coef = torch.clamp(clip / (gnorm + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in model.parameters()], coef)
    return gnorm


def _sq_norm(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim float32: the sum of squares of ``grads`` (one foreach launch, not 3 per tensor)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.stack(norms).square().sum()


def _global_stats(run: _Run, loss_lm: torch.Tensor, out: ModelOutput):
    """((loss, aux, z) averaged over ranks as host floats, counts_NE summed over ranks).

    One all-reduce carries both. The router biases are updated from the global counts, so
    every rank makes the same update.
    """
    world, m = run.layout.world, run.recipe.model
    stats = torch.stack([loss_lm.detach().float(), out.aux_loss.detach().float(),
                         out.z_loss.detach().float()])
    counts_NE = out.tokens_per_expert_NE.detach().to(torch.float64)
    packed = torch.cat([stats.double(), counts_NE.reshape(-1)])
    if world > 1:
        dist.all_reduce(packed)
    stats = packed[:3] / world
    counts_NE = packed[3:].view_as(counts_NE)
    if m.score_bias:
        for l, router in enumerate(run.model.routers()):
            router.update_expert_bias(counts_NE[l], m.bias_update_rate)
    loss_v, aux_v, z_v = (float(x) for x in stats.tolist())  # host sync ends the step
    return (loss_v, aux_v, z_v), counts_NE


# ----------------------------------------------------------------------------- logging

def _metrics_row(run: _Run, res: _StepResult, done: int, tokens_per_s: float,
                 t_start: float) -> Dict[str, Any]:
    """The metrics line of step ``done`` (1-based); collective (the peak RSS over ranks)."""
    counts_cpu = res.counts_NE.cpu()
    mean_l = counts_cpu.mean(1)
    imb = (counts_cpu.max(1).values / mean_l.clamp_min(1e-9)).tolist()
    rss = torch.tensor([rss_mb()], dtype=torch.float64, device=res.counts_NE.device)
    if run.layout.world > 1:
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    row = {"step": done, "loss": res.loss, "aux_loss": res.aux_loss, "z_loss": res.z_loss,
           "max_rows_per_rank": run.budget.budget, "budget_overflows": run.budget.overflows,
           "lr": res.lr, "grad_norm": float(res.grad_norm),
           "tokens_per_s": tokens_per_s,
           "max_expert_load": float(counts_cpu.max()),
           "mean_expert_load": float(mean_l.mean()),
           "load_imbalance": float(sum(imb) / len(imb)),
           "load_imbalance_per_layer": imb,
           "rss_mb": float(rss.item()),
           "elapsed_s": time.perf_counter() - t_start}
    if run.device.type == "cuda":
        row["gpu_mem_mb"] = torch.cuda.memory_allocated(run.device) / 2**20
        row["gpu_max_mem_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    return row


def _log_line(row: Dict[str, Any], steps: int) -> str:
    """The per-step log line printed for ``row``."""
    return (f"step {row['step']:>5}/{steps} loss {row['loss']:.4f} aux {row['aux_loss']:.4f} "
            f"tok/s {row['tokens_per_s']:,.0f} load max/mean "
            f"{row['load_imbalance']:.2f} rss {row['rss_mb']:.0f}MB"
            + (f" gpu {row['gpu_max_mem_mb']:.0f}MB" if "gpu_max_mem_mb" in row else ""))


def _finish(run: _Run, rows: List[Dict[str, Any]], start: int, last: int, metrics_path: str,
            t_start: float) -> None:
    """Rank 0: the plot and the closing summary line."""
    t, out = run.recipe.train, run.opts.out
    if run.layout.rank != 0:
        return
    if t.plot:
        plot_metrics(metrics_path, os.path.join(out, "plot.png"))
    if not run.opts.quiet and rows:
        first = rows[0]["loss"]
        print(f"done: steps {start + 1}-{last} in {time.perf_counter() - t_start:.1f}s, "
              f"loss {first:.4f} -> {rows[-1]['loss']:.4f}; "
              f"{metrics_path}" + (f", {os.path.join(out, 'plot.png')}" if t.plot else ""),
              flush=True)


# ----------------------------------------------------------------------------- the loop

def _run_steps(run: _Run, start: int, last: int, rows: List[Dict[str, Any]],
               metrics_path: str, bar: Progress, t_start: float) -> None:
    """Steps ``start + 1`` .. ``last`` (1-based); appends each logged step's row to ``rows``
    and checkpoints every ``train.checkpoint_every`` steps and after the last."""
    t, m, lay = run.recipe.train, run.recipe.model, run.layout
    # CUDA-graph capture needs autocast without its weight-cast cache (the cache would hold
    # casts made outside the graphs).
    amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16",
                         cache_enabled=False if t.cuda_graph else None)
    interval_time, interval_tokens = 0.0, 0
    for step in range(start, last):
        t0 = time.perf_counter()
        res = _step(run, step, amp)
        interval_time += time.perf_counter() - t0
        interval_tokens += t.batch_size * m.seq_len
        done = step + 1
        # The same steps whether or not the run was interrupted and resumed.
        if done % t.log_every == 0 or done == 1 or done == t.steps:
            row = _metrics_row(run, res, done, interval_tokens / max(interval_time, 1e-9),
                               t_start)
            rows.append(row)
            interval_time, interval_tokens = 0.0, 0
            if lay.rank == 0:
                append_metrics(metrics_path, row)
                if not run.opts.quiet:
                    bar.write(_log_line(row, t.steps))
        bar.update(f"loss {res.loss:.3f}")
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == last:
            save_checkpoint(run.opts.out, lay.rank, lay.world, lay.ep, done, run.model,
                            run.optim, run.device)


def train(recipe: Recipe, opts: RunOptions) -> List[Dict[str, Any]]:
    """Train on the current process group (or a single process without one).

    Every rank calls this; it returns the metrics rows (the same list on every rank).
    """
    rank, world = _world()
    ep = recipe.ep or world
    _check_world(recipe, world, ep)
    device = _pick_device(recipe, world)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    run = _build(recipe, opts, _make_layout(rank, world, ep), device)
    os.makedirs(opts.out, exist_ok=True)
    start = _resume(run) if opts.resume else 0
    metrics_path = os.path.join(opts.out, "metrics.jsonl")
    rows = restart_metrics(metrics_path, start, rank, world)
    t = recipe.train
    last = t.steps if opts.stop_at is None else min(t.steps, opts.stop_at)
    bar = Progress(t.steps, start, opts.progress and rank == 0)
    if rank == 0 and not opts.quiet:
        bar.write(_banner(run, start))
    t_start = time.perf_counter()
    _run_steps(run, start, last, rows, metrics_path, bar, t_start)
    bar.close()
    _finish(run, rows, start, last, metrics_path, t_start)
    return rows
