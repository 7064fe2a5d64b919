"""MoE layer: router -> dispatcher -> grouped experts -> combine (+ optional shared expert).

Shapes: T tokens, H hidden, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .experts import GroupedExperts
from .layer_graph import CUDA_GRAPHS, GraphKit, capture_graphed
from .router import RouterOutput, TopKRouter


@dataclass(frozen=True)
class MoEOutput:
    """What ``MoELayer.forward`` returns.

    output:              same shape and dtype as the input.
    aux_loss:            0-dim float32 load-balancing loss (coefficient applied).
    z_loss:              0-dim float32 router z-loss (coefficient applied).
    tokens_per_expert_E: [E] int64 slots this rank's tokens sent to each global expert.
    status:              budget mode: the dispatch's [1] int32 device ``STATUS_*`` bits
                         (``MoETokenDispatcher.check_status`` reads it); None otherwise.
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    status: Optional[torch.Tensor] = None


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (the shared expert): (silu(x W1) * x W3) W2."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoELayer(nn.Module):
    """A mixture-of-experts MLP over an expert-parallel group.

    hidden:               H.
    ffn_hidden:           F, width of each routed expert.
    num_experts:          E (global).
    top_k:                K.
    dispatcher:           a ``MoETokenDispatcher`` for E experts; it fixes the EP group,
                          backend, capacity factor and padding, and which experts are local.
                          It is stateless between calls, so layers may share one.
    shared_expert_hidden: width of a dense shared SwiGLU expert applied to every token
                          (0 = none).
    router_kwargs:        passed to ``TopKRouter`` (score_func, norm_topk_prob, score_bias,
                          aux_loss_coeff, z_loss_coeff, init_std).
    expert_impl:          "auto" | "grouped_mm" | "loop" (``GroupedExperts``).
    seed, layer_id:       expert init seeds (``GroupedExperts``).
    activation_checkpointing: recompute dispatch, experts and combine in backward instead
                          of keeping their activations. The router runs once, outside the
                          checkpoint, and its top-k choice is an *input* of the recomputed
                          region, so the dispatch layout in recompute is the forward's by
                          construction (a re-run top-k could pick other experts on a
                          near-tie and silently corrupt gradients).
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *,
                 dispatcher: nn.Module, shared_expert_hidden: int = 0,
                 router_kwargs: Optional[dict] = None, expert_impl: str = "auto",
                 seed: int = 0, layer_id: int = 0, init_std: float = 0.02,
                 out_init_std: Optional[float] = None,
                 activation_checkpointing: bool = False):
        super().__init__()
        disp_E = getattr(dispatcher, "num_experts", num_experts)
        if disp_E != num_experts:
            raise ValueError(f"dispatcher is built for {disp_E} experts, layer for {num_experts}")
        self.hidden = hidden
        self.router = TopKRouter(hidden, num_experts, top_k, **(router_kwargs or {}))
        self.dispatcher = dispatcher
        self.experts = GroupedExperts(
            num_experts, hidden, ffn_hidden,
            num_local_experts=dispatcher.num_local_experts,
            local_expert_offset=dispatcher.local_expert_offset,
            impl=expert_impl, seed=seed, layer_id=layer_id,
            init_std=init_std, out_init_std=out_init_std)
        self.shared_expert = SwiGLU(hidden, shared_expert_hidden) if shared_expert_hidden else None
        self.activation_checkpointing = activation_checkpointing
        self.cuda_graph = False
        # The captured layer; kept out of the module tree (it wraps this module).
        self.__dict__["_graphed"] = None

    def enable_cuda_graph(self, on: bool = True) -> None:
        """Replay the graphs ``capture_layers`` captured (on) or run eagerly (off; the graphs
        are kept), e.g. while an overflowed step reruns in the exact mode."""
        self.cuda_graph = bool(on)

    def graphable(self) -> nn.Module:
        """This layer as tensors in, tensors out (output, aux_loss, z_loss,
        tokens_per_expert_E, status): the module ``capture_layers`` captures (its
        parameters are this layer's)."""
        return _LayerAsTensors(self)

    def drop_cuda_graph(self) -> None:
        """Forget the captured graphs (e.g. after the budget changed) and run eagerly. The
        parameters' ``.grad`` tensors stay (eager backwards add into them as autograd
        does)."""
        self.__dict__["_graphed"] = None
        self.cuda_graph = False

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x: [..., H] (e.g. [B, S, H] or [T, H]). Returns ``MoEOutput``.

        With captured graphs and ``cuda_graph`` on, a training forward with grad enabled on
        the graphs' device (CUDA; a CPU stand-in in tests) replays them; anything else
        (eval, no_grad, another device) runs eagerly."""
        g = self._graphed
        if self.cuda_graph and g is not None and x.device.type == g.device_type and \
                torch.is_grad_enabled() and self.training:
            out, aux, z, tpe, status = g(x)
            return MoEOutput(out, aux, z, tpe, status)
        return self._eager(x)

    def _check_capturable(self) -> None:
        if self.activation_checkpointing:
            raise RuntimeError("MoELayer: CUDA-graph capture cannot be combined with "
                               "activation checkpointing")
        if getattr(self.dispatcher, "max_rows_per_rank", None) is None:
            raise RuntimeError(
                "MoELayer: CUDA-graph capture needs the dispatcher's budget mode "
                "(MoETokenDispatcher(..., max_rows_per_rank=B)): the exact mode syncs the "
                "host in every dispatch to size its output")

    def _eager(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        x_TH = x.reshape(-1, self.hidden)
        route: RouterOutput = self.router(x_TH)
        seen: list = []  # the dispatch's status (the first run's: a recompute has the same)
        if self.activation_checkpointing and torch.is_grad_enabled():
            y_TH = checkpoint(self._routed, x_TH, route.idx_TK, route.probs_TK, seen,
                              use_reentrant=False)
        else:
            y_TH = self._routed(x_TH, route.idx_TK, route.probs_TK, seen)
        return MoEOutput(y_TH.reshape(shape), route.aux_loss, route.z_loss,
                         route.tokens_per_expert_E, seen[0] if seen else None)

    def _routed(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                seen: list) -> torch.Tensor:
        x_send = x_TH
        dev = x_TH.device.type
        if torch.is_autocast_enabled(dev):
            # Move tokens in the autocast dtype: half the bytes, and the experts compute in it.
            x_send = x_TH.to(torch.get_autocast_dtype(dev))
        out = self.dispatcher.dispatch(x_send, topk_idx=idx_TK, topk_probs=probs_TK)
        if not seen and out.status is not None:
            seen.append(out.status)
        y_TH = self.dispatcher.combine(
            self.experts(out.tokens, out.tokens_per_expert, out.probs), out.handle)
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared_expert(x_TH)
        return y_TH


class _LayerAsTensors(nn.Module):
    """An ``MoELayer`` as tensors in, tensors out: the form the graph capture takes
    (``layer_graph.capture_graphed``: one input ``x``; the outputs output, aux_loss, z_loss,
    tokens_per_expert_E, status, of which the float ones that require grad get gradients;
    the layer's parameters get theirs added into ``.grad`` by the backward graph)."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor):
        m = self.layer._eager(x)
        return m.output, m.aux_loss, m.z_loss, m.tokens_per_expert_E, m.status


def capture_layers(layers, samples, *, graphs: GraphKit = CUDA_GRAPHS) -> None:
    """Capture several ``MoELayer`` s' forward + backward as CUDA graphs in one call (one
    memory pool, forwards captured in call order, their backwards in reverse), before they
    run; each layer then replays its graphs while ``cuda_graph`` is on.

    Up front and all together: capturing each layer lazily inside a running forward was
    measured on an H200 to give NaN gradients in the first layer of four (BENCHMARKS.md,
    session 5). The replay takes only ``x`` through autograd; the backward graph adds the
    parameters' gradients into their ``.grad`` itself (``layer_graph``), so after this call:
      * every parameter of these layers that requires grad has a ``.grad`` (zeros: capture
        leaves nothing in them), and that tensor is the buffer the graphs add into. Zero it
        in place (``zero_grad(set_to_none=False)``); setting it to None or replacing it
        makes the next backward raise (never a silently lost gradient). Gradients
        accumulate over several backwards as eagerly;
      * inputs and outputs are static buffers: a layer's outputs are overwritten by its next
        replay; call the layers in the captured order (forwards, then backwards reversed)
        with one forward in flight per layer.

    layers:  the layers, in the order the model calls them.
    samples: one tensor per layer shaped (and typed, and requiring grad) like the input it
             will be called with; the graphs copy each call's input into a static copy.
    graphs:  how graphs are made (``layer_graph.CUDA_GRAPHS``; tests pass a CPU stand-in).
    Call it under the autocast the model runs in (with ``cache_enabled=False``)."""
    for layer, x in zip(layers, samples):
        layer._check_capturable()
        if graphs.device_type == "cuda":  # a stand-in "graph" reruns Python: any experts do
            _check_grouped(layer, x)
    mods = tuple(layer.graphable() for layer in layers)
    calls = capture_graphed(mods, samples, graphs, warmup_iters=3)
    for layer, call in zip(layers, calls):
        layer.__dict__["_graphed"] = call
        layer.cuda_graph = True


def _check_grouped(layer: MoELayer, x: torch.Tensor) -> None:
    """Raise unless ``layer``'s experts run one grouped GEMM for rows like ``x``'s (the
    per-expert loop reads the counts on the host, which a CUDA graph cannot hold)."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    impl = layer.experts.resolved_impl(torch.empty(0, layer.hidden, dtype=dt, device=x.device))
    if impl != "grouped_mm":
        raise RuntimeError(
            f"MoELayer: CUDA-graph capture needs grouped_mm experts (bf16 rows on CUDA); "
            f"these rows ({dt}) would run the per-expert loop, which reads the counts on "
            "the host: train in bf16")
