"""The training step's forward, loss and backward as one CUDA graph
(``train.cuda_graph: true`` with ``train.cuda_graph_scope: step``).

Why: per-layer graphs (``layer_graph``) replay each MoE layer cheaply, but every layer still
costs the host an autograd node, copies and Python (BENCHMARKS.md: ~340 µs per layer on an
H200 host), and the attention, norms, embedding and loss still launch eagerly. One graph
for the whole forward + backward makes the host cost of those one replay per step,
whatever the depth. What runs once per step stays eager: the budget status read (the one
host sync of the step, ``budget.forward_checked``), the gradient reduction and clipping,
the optimizer and the router-bias update (in place, so the graph sees it).

Contract (as ``layer_graph``'s): after capture every parameter's ``.grad`` is a fixed
buffer; each replay zeroes them inside the graph first and the backward adds into them, so
a replay leaves exactly this step's gradients there. The loop must not set them to None or
replace them (``StepGraph.__call__`` raises if it did). Inputs are copied into static
buffers; outputs (losses, counts, statuses) are static tensors overwritten by the next
replay. Parameters are read by address: an optimizer updates them in place.

The capture keeps the usual care: warm-up iterations on a side stream (lazy initialisation
and the budget mode's first-call agreement stay out of the graph), autocast without its
weight-cast cache, and the warm-up's gradients cleared before the first replay.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch
import torch.nn as nn

from ..layer_graph import CUDA_GRAPHS, GraphKit
from ..model import ModelOutput

# forward(inp_BS, tgt_BS) -> (model output, lm loss, total loss), under the run's autocast.
Forward = Callable[[torch.Tensor, torch.Tensor], Tuple[ModelOutput, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StepGraph:
    """A captured training step: call it with the step's batch to replay forward + backward.

    graph:     the graph (kept alive here); replay: its ``replay``.
    inp_BS, tgt_BS: the static inputs ([B, S] int64 tokens and next-token targets).
    outs:      the static outputs: (logits, aux_loss, z_loss, tokens_per_expert_NE,
               lm loss, total loss, *statuses), detached.
    params:    the parameters whose ``.grad`` the graph zeroes and fills.
    grads:     their ``.grad`` tensors at capture.
    """

    graph: Any
    replay: Callable[[], None]
    inp_BS: torch.Tensor
    tgt_BS: torch.Tensor
    outs: Tuple[torch.Tensor, ...]
    params: Tuple[nn.Parameter, ...]
    grads: Tuple[torch.Tensor, ...]

    def __call__(self, inp_BS: torch.Tensor, tgt_BS: torch.Tensor):
        """Replay the step on this batch; returns (ModelOutput, lm loss, total loss) as
        static tensors, with this step's gradients in ``.grad``."""
        if inp_BS.shape != self.inp_BS.shape or tgt_BS.shape != self.tgt_BS.shape:
            raise ValueError(f"step graph: captured for batches {list(self.inp_BS.shape)}, "
                             f"called with {list(inp_BS.shape)}: capture again")
        if not all(map(operator.is_, (p.grad for p in self.params), self.grads)):
            raise RuntimeError(
                "step graph: a parameter's .grad was set to None or replaced after capture; "
                "the graph writes into the .grad tensors that existed then, so this step's "
                "gradients would be lost. Zero gradients in place (zero_grad("
                "set_to_none=False)) or capture again")
        self.inp_BS.copy_(inp_BS)
        self.tgt_BS.copy_(tgt_BS)
        self.replay()
        logits, aux, z, counts, lm, loss, *statuses = self.outs
        return ModelOutput(logits, aux, z, counts, tuple(statuses)), lm, loss


def capture_step(model: nn.Module, forward: Forward, inp_BS: torch.Tensor,
                 tgt_BS: torch.Tensor, graphs: GraphKit = CUDA_GRAPHS,
                 warmup_iters: int = 3) -> StepGraph:
    """Capture ``forward`` + its loss's backward on batches shaped like these.

    model:        the model; every parameter that requires grad gets a fixed ``.grad``.
    forward:      (inp_BS, tgt_BS) -> (ModelOutput, lm loss, total loss); it must be
                  sync-free (the budget mode), and an autocast it enters must have its
                  weight-cast cache off (checked here only for an autocast around this call).
    inp_BS, tgt_BS: a batch shaped and typed like the training batches (copied).
    graphs:       how graphs are made (``layer_graph.CUDA_GRAPHS``; tests: a CPU stand-in).
    warmup_iters: forward + backward runs before capture, on a side stream.
    """
    dev = graphs.device_type
    if torch.is_autocast_enabled(dev) and torch.is_autocast_cache_enabled():
        raise RuntimeError("step graph capture needs autocast without its weight-cast cache "
                           "(torch.autocast(..., cache_enabled=False))")
    for t in (inp_BS, tgt_BS):
        if t.device.type != dev:
            raise RuntimeError(f"step graph capture on {dev}: the batch is on "
                               f"{t.device}")
    params = tuple(p for p in model.parameters() if p.requires_grad)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = tuple(p.grad for p in params)
    inp_s, tgt_s = inp_BS.clone(), tgt_BS.clone()

    def body():
        torch._foreach_zero_(list(grads))
        out, lm, loss = forward(inp_s, tgt_s)
        loss.backward()
        return tuple(t.detach() for t in (out.logits_BSV, out.aux_loss, out.z_loss,
                                          out.tokens_per_expert_NE, lm, loss, *out.statuses))

    graphs.sync()
    with graphs.warmup_stream():
        for _ in range(warmup_iters):
            body()
    graphs.sync()
    graph = graphs.new_graph()
    outs = graphs.capture(graph, graphs.new_pool(), body)
    # Nothing the warm-up (or a stand-in's capture run) did may stay in .grad.
    torch._foreach_zero_(list(grads))
    return StepGraph(graph, graph.replay, inp_s, tgt_s, tuple(outs), params, grads)
