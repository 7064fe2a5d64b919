"""Modules captured as CUDA graphs whose backward graph adds the parameters' gradients into
their ``.grad`` itself: the capture and replay under ``layer.capture_layers``.

Why not ``torch.cuda.make_graphed_callables``: its autograd Function takes every parameter
as an input and returns every parameter's gradient, which autograd then accumulates into
``.grad`` one small launch per parameter, with per-call bookkeeping for each: 0.4-0.6 ms of
host time per MoE layer forward + backward on an H200 (BENCHMARKS.md, session 5). Here the
backward graph ends with one captured ``torch._foreach_add_`` into the ``.grad`` tensors, so
the replay's Function takes only the activation input ``x`` and returns only its gradient;
autograd does no per-parameter work. Per call the host copies ``x`` into the static input
and replays the forward graph; in backward it copies the output gradients into static
buffers and replays the backward graph.

The capture keeps make_graphed_callables' care: warm-up iterations on a side stream (lazy
initialisation stays out of the graphs); autocast's weight-cast cache must be off; the static
input requires grad as the sample does; static output-gradient buffers for the outputs that
require grad (the others get none); forwards captured in call order and backwards in reverse,
all in one memory pool, so replays in that order never overwrite memory another graph still
needs.

The ``.grad`` contract. After capture each captured parameter's ``.grad`` is a fixed buffer
the backward graph adds into (created as zeros where it was None; capture leaves them all
zero). Zero it in place (``zero_grad(set_to_none=False)``); gradient accumulation over
micro-steps works as eagerly (the graph adds). If a ``.grad`` was set to None or replaced
(``zero_grad()``'s default, DDP's bucket views), the next backward raises and says so: the
graph could not add into the new tensor, and dropping the gradient silently is never done.
Parameters themselves must not be replaced either (the graphs read them by address).

Replays. Inputs and outputs are static buffers: a call's outputs are overwritten by the next
forward replay of the same graph, so a graph has one forward in flight (a backward of an
older forward raises). Call the graphed modules in the order captured: forwards in order,
their backwards in reverse, as a model does. The input gradient is handed back as the static
buffer, or as a copy when ``x`` is a leaf (or a view of one) whose ``.grad`` is None:
autograd would otherwise keep the buffer itself as that ``.grad`` and the next replay would
overwrite it. An input that reaches a leaf only through ops that hand the gradient on
unchanged (``leaf.clone()``, ``leaf + 0``, ``torch.cat`` of leaves) is not detected: feed
such a layer the leaf, or a tensor computed from it.

``GraphKit`` says how graphs are made: ``CUDA_GRAPHS`` (``torch.cuda.CUDAGraph`` captured
with ``torch.cuda.graph``) by default; tests on the CPU pass a stand-in whose "graph"
records the captured Python body and re-executes it on replay, writing its results into the
tensors the capture returned (the same static buffers).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

_GRAD = operator.attrgetter("grad")


@dataclass(frozen=True)
class GraphKit:
    """How graphs are made and captured.

    new_graph:     () -> a graph: an object with ``replay()`` (no arguments, no result).
    new_pool:      () -> the memory-pool handle every graph of one capture shares (None
                   where there is none).
    capture:       (graph, pool, body) -> ``body()``'s result, with the body captured into
                   ``graph`` (CUDA: its launches are recorded, not run, so the result holds
                   the addresses the replays write).
    warmup_stream: () -> a context manager the warm-up iterations run in (CUDA: a new
                   side stream).
    sync:          () -> None: waits for the device (before and after the warm-up).
    device_type:   the device type the graphs run on ("cuda"); samples must be on it, and
                   only inputs on it replay the graphs.
    """

    new_graph: Callable[[], Any]
    new_pool: Callable[[], Any]
    capture: Callable[[Any, Any, Callable[[], Any]], Any]
    warmup_stream: Callable[[], ContextManager]
    sync: Callable[[], None]
    device_type: str


def _cuda_capture(graph: "torch.cuda.CUDAGraph", pool, body: Callable[[], Any]) -> Any:
    with torch.cuda.graph(graph, pool=pool):
        return body()


def _cuda_side_stream() -> ContextManager:
    return torch.cuda.stream(torch.cuda.Stream())


CUDA_GRAPHS = GraphKit(new_graph=lambda: torch.cuda.CUDAGraph(),
                       new_pool=lambda: torch.cuda.graph_pool_handle(),
                       capture=_cuda_capture, warmup_stream=_cuda_side_stream,
                       sync=lambda: torch.cuda.synchronize(), device_type="cuda")


class _Live:
    """What changes between replays of one graphed module (``GraphedCall.live``).

    calls:      forwards replayed so far (a backward checks it is the latest one's).
    graph_outs: the outputs of the captured forward, autograd graph attached: what the
                backward body differentiates (a stand-in's replays replace them).
    zeroed:     per tensor slot, then the scalar slots as one: whether the static gradient
                buffer is known to hold zeros (an output whose gradient is None in a backward
                gets zeros once, not at every call).
    """

    def __init__(self):
        self.calls = 0
        self.graph_outs: Tuple[torch.Tensor, ...] = ()
        self.zeroed: List[bool] = []


@dataclass(frozen=True)
class GradSlots:
    """Where the backward graph reads the gradients of the outputs that require grad.

    tensor_idx:  output indices of the non-scalar ones (the layer's output).
    tensor_bufs: their static gradient buffers, shaped and typed like the outputs.
    scalar_idx:  output indices of the 0-dim ones of one dtype (the aux and z losses).
    scalar_buf:  [S] their static gradients in one tensor, so that the common case (one
                 0-dim gradient tensor for all of them: autograd hands a sum's gradient to
                 each term unchanged) is one copy, not S (None when S is 0).
    """

    tensor_idx: Tuple[int, ...]
    tensor_bufs: Tuple[torch.Tensor, ...]
    scalar_idx: Tuple[int, ...]
    scalar_buf: Optional[torch.Tensor]

    def buffers(self) -> List[Tuple[int, torch.Tensor]]:
        """(output index, static gradient buffer) of every slot, in output order."""
        pairs = list(zip(self.tensor_idx, self.tensor_bufs))
        pairs += [(i, self.scalar_buf[k]) for k, i in enumerate(self.scalar_idx)]
        return sorted(pairs, key=lambda pair: pair[0])

    def load(self, grads: Sequence[Optional[torch.Tensor]], zeroed: List[bool]) -> None:
        """Copy one backward's output gradients (None: unused output, zeros) into the
        buffers; ``zeroed`` as in ``_Live``."""
        for k, (i, buf) in enumerate(zip(self.tensor_idx, self.tensor_bufs)):
            g = grads[i]
            if g is not None:
                buf.copy_(g)
                zeroed[k] = False
            elif not zeroed[k]:
                buf.zero_()
                zeroed[k] = True
        if self.scalar_idx:
            self._load_scalars(grads, zeroed)

    def _load_scalars(self, grads, zeroed: List[bool]) -> None:
        idx, buf = self.scalar_idx, self.scalar_buf
        first = grads[idx[0]]
        if all(grads[i] is first for i in idx):
            if first is not None:
                buf.copy_(first.expand(len(idx)))
                zeroed[-1] = False
            elif not zeroed[-1]:
                buf.zero_()
                zeroed[-1] = True
            return
        for k, i in enumerate(idx):  # different tensors: one copy each
            g = grads[i]
            buf[k].copy_(g) if g is not None else buf[k].zero_()
        zeroed[-1] = False

    @staticmethod
    def for_outputs(outs: Sequence[torch.Tensor]) -> "GradSlots":
        """Slots for the outputs of ``outs`` that require grad (buffers uninitialised)."""
        need = [i for i, o in enumerate(outs) if o.requires_grad]
        scalar = [i for i in need if outs[i].dim() == 0]
        scalar = [i for i in scalar if outs[i].dtype == outs[scalar[0]].dtype]
        tensor = [i for i in need if i not in scalar]
        buf = outs[scalar[0]].new_empty(len(scalar)) if scalar else None
        return GradSlots(tuple(tensor), tuple(torch.empty_like(outs[i]) for i in tensor),
                         tuple(scalar), buf)


@dataclass(frozen=True)
class GraphedCall:
    """One captured module: call it with ``x`` like the module; returns its output tuple.

    fwd, bwd:     the forward and backward graphs (kept alive here).
    fwd_replay, bwd_replay: their ``replay`` (bound once: one call per replay).
    x_static:     the static input, shaped, typed and requiring grad like the sample.
    outs:         the static outputs (tuple of tensors; overwritten by each forward replay).
    slots:        the static gradient buffers of the outputs that require grad.
    gx_static:    the static gradient of ``x`` (None when the sample did not require grad).
    params:       the parameters whose gradients the backward graph adds into ``grads``.
    grads:        their ``.grad`` tensors at capture: the buffers the graph adds into.
    names:        the parameters' names (for errors).
    anchor:       a 0-dim leaf requiring grad, passed when ``x`` does not require grad so
                  that the backward still runs (the parameters still get gradients).
    device_type:  the device type inputs must be on to replay.
    live:         the mutable part (``_Live``).
    """

    fwd: Any
    bwd: Any
    fwd_replay: Callable[[], None]
    bwd_replay: Callable[[], None]
    x_static: torch.Tensor
    outs: Tuple[torch.Tensor, ...]
    slots: GradSlots
    gx_static: Optional[torch.Tensor]
    params: Tuple[nn.Parameter, ...]
    grads: Tuple[torch.Tensor, ...]
    names: Tuple[str, ...]
    anchor: torch.Tensor
    device_type: str
    live: _Live

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x: shaped and typed like the sample (copied into the static input)."""
        xs = self.x_static
        if x.shape != xs.shape or x.dtype != xs.dtype:  # copy_ would broadcast or cast
            raise ValueError(
                f"CUDA-graphed layer: captured for inputs {list(xs.shape)} {xs.dtype}, called "
                f"with {list(x.shape)} {x.dtype}: capture again for this shape")
        if x.requires_grad:
            if self.gx_static is None:
                raise RuntimeError(
                    "CUDA-graphed layer: this input requires grad but the capture sample did "
                    "not, so the backward graph computes no input gradient: capture with a "
                    "sample that requires grad")
            return _Replay.apply(self, x)
        return _Replay.apply(self, x, self.anchor)

    def grads_intact(self) -> bool:
        """Every captured parameter's ``.grad`` is still the buffer the graph adds into."""
        return all(map(operator.is_, map(_GRAD, self.params), self.grads))

    def grad_error(self) -> RuntimeError:
        """The error a backward raises when some ``.grad`` is not the captured buffer."""
        bad = [(n, "set to None" if p.grad is None else "replaced")
               for n, p, g in zip(self.names, self.params, self.grads) if p.grad is not g]
        return RuntimeError(
            f"CUDA-graphed layer: the .grad of "
            f"{', '.join(f'{n} ({what})' for n, what in bad)} changed after capture; "
            "the backward graph adds into the .grad tensors that existed at capture, so this "
            "gradient would be lost. Zero gradients in place (optimizer.zero_grad("
            "set_to_none=False) or module.zero_grad(set_to_none=False)), or capture again "
            "(capture_layers)")


class _Replay(torch.autograd.Function):
    """The replay as one autograd node: the input is ``x`` (and the anchor), the
    differentiable outputs those of the module; the parameters' gradients never pass
    through autograd (the backward graph adds them into ``.grad``)."""

    @staticmethod
    def forward(ctx, call: GraphedCall, x: torch.Tensor, *anchor: torch.Tensor):
        call.x_static.copy_(x)
        call.fwd_replay()
        live = call.live
        live.calls += 1
        ctx.call, ctx.n = call, live.calls
        ctx.set_materialize_grads(False)  # unused outputs: None, not a zeros launch each
        # A leaf (or the leaf a view is of) could keep the returned gradient as its .grad.
        root = x._base if x._is_view() else x
        ctx.leaf = root if root.is_leaf and x.requires_grad else None
        return tuple(map(torch.Tensor.detach, call.outs))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        call: GraphedCall = ctx.call
        live = call.live
        if ctx.n != live.calls:
            raise RuntimeError(
                "CUDA-graphed layer: backward of a forward that is not the layer's latest: "
                "its activations were overwritten by a later forward replay (a graphed layer "
                "takes forward, backward, forward, ...)")
        if torch.is_grad_enabled():
            raise RuntimeError("CUDA-graphed layer: double backward (create_graph=True) "
                               "is not supported")
        if not call.grads_intact():
            raise call.grad_error()
        call.slots.load(grads, live.zeroed)
        call.bwd_replay()
        gx = None
        if ctx.needs_input_grad[1]:
            leaf = ctx.leaf
            gx = call.gx_static.clone() if leaf is not None and leaf.grad is None \
                else call.gx_static.detach()
        return None, gx, None


def capture_graphed(mods: Sequence[nn.Module], samples: Sequence[torch.Tensor],
                    graphs: GraphKit = CUDA_GRAPHS,
                    warmup_iters: int = 3) -> Tuple[GraphedCall, ...]:
    """Capture each module's forward and backward as graphs (one pool, forwards in order,
    backwards in reverse); returns one ``GraphedCall`` per module.

    mods:         modules called as ``mod(x)`` returning a tuple of tensors, in the order the
                  model calls them. Their parameters that require grad get their gradients
                  added into ``.grad`` by the backward graphs (the module docstring's contract).
    samples:      one tensor per module shaped, typed and requiring grad like the input it
                  will be called with (a copy becomes the static input).
    graphs:       how graphs are made (``CUDA_GRAPHS``; a stand-in in CPU tests).
    warmup_iters: forward + backward runs of each module before capture (side stream).
    Call it under the autocast the modules run in, with ``cache_enabled=False``.
    """
    if torch.is_autocast_enabled() and torch.is_autocast_cache_enabled():
        raise RuntimeError("CUDA-graph capture needs autocast without its weight-cast cache "
                           "(torch.autocast(..., cache_enabled=False)): the cache would hold "
                           "casts made outside the graphs")
    if len(mods) != len(samples):
        raise ValueError(f"{len(mods)} modules but {len(samples)} samples")
    for x in samples:
        if x.device.type != graphs.device_type:
            raise RuntimeError(f"graph capture on {graphs.device_type}: a sample is on "
                               f"{x.device}")
    statics = [x.detach().clone().requires_grad_(x.requires_grad) for x in samples]
    named = [tuple((n, p) for n, p in m.named_parameters() if p.requires_grad) for m in mods]
    with torch.enable_grad():
        _grad_buffers([p for ps in named for _, p in ps])
        _warm_up(mods, statics, named, graphs, warmup_iters)
        pool = graphs.new_pool()
        lives = [_Live() for _ in mods]
        fwds = [_capture_forward(m, x, live, graphs, pool)
                for m, x, live in zip(mods, statics, lives)]
        bwds = [_capture_backward(x, ps, live, graphs, pool)
                for x, ps, live in zip(reversed(statics), reversed(named), reversed(lives))]
    bwds.reverse()
    calls = tuple(_handle(*parts) for parts in zip(fwds, bwds, statics, lives))
    # Nothing the warm-up or the capture did may stay in .grad (a stand-in "graph" runs
    # its body at capture; CUDA's does not, and there this only clears older gradients).
    grads = [g for c in calls for g in c.grads]
    if grads:  # (an empty list is an error)
        torch._foreach_zero_(grads)
    return calls


def _grad_buffers(params: List[nn.Parameter]) -> None:
    """Give every parameter a ``.grad`` (zeros where None): the graphs add into them."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _warm_up(mods, statics, named, graphs: GraphKit, iters: int) -> None:
    """Each module's forward + backward ``iters`` times on a side stream, so lazy setup
    (the budget mode's first-call agreement, library handles, autotuning) happens before
    capture. ``autograd.grad``: nothing is accumulated into ``.grad``."""
    graphs.sync()
    with graphs.warmup_stream():
        for m, x, ps in zip(mods, statics, named):
            for _ in range(iters):
                need = [o for o in _outputs(m, x) if o.requires_grad]
                if need:
                    torch.autograd.grad(need, _grad_inputs(x, ps),
                                        grad_outputs=[torch.zeros_like(o) for o in need],
                                        allow_unused=True)
    graphs.sync()


def _outputs(m: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    outs = tuple(m(x))
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise RuntimeError(f"graph capture: the module returned {[type(o) for o in outs]}; "
                           "every output must be a tensor")
    return outs


def _grad_inputs(x: torch.Tensor, named) -> Tuple[torch.Tensor, ...]:
    """What the backward differentiates for: ``x`` (when it requires grad), the parameters."""
    return ((x,) if x.requires_grad else ()) + tuple(p for _, p in named)


@dataclass(frozen=True)
class _Forward:
    """A captured forward: the graph and its static outputs."""

    graph: Any
    outs: Tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class _Backward:
    """A captured backward: the graph, where it reads the output gradients, the static
    gradient of ``x`` (None: not computed), the parameters it adds gradients for, their
    ``.grad`` buffers and names."""

    graph: Any
    slots: GradSlots
    gx: Optional[torch.Tensor]
    params: Tuple[nn.Parameter, ...]
    grads: Tuple[torch.Tensor, ...]
    names: Tuple[str, ...]


def _capture_forward(m: nn.Module, x_static: torch.Tensor, live: _Live, graphs: GraphKit,
                     pool) -> _Forward:
    """The graph of ``m(x_static)``; ``live.graph_outs`` keeps its outputs with their
    autograd graph for the backward capture."""

    def body():
        live.graph_outs = _outputs(m, x_static)
        return live.graph_outs

    graph = graphs.new_graph()
    return _Forward(graph, graphs.capture(graph, pool, body))


def _capture_backward(x_static: torch.Tensor, named, live: _Live, graphs: GraphKit,
                      pool) -> _Backward:
    """The graph of the backward of the latest forward (``live.graph_outs``): the gradients
    of ``x_static`` and of the parameters, the latter added into their ``.grad`` inside
    the graph (one ``_foreach_add_``)."""
    slots = GradSlots.for_outputs(live.graph_outs)
    live.zeroed = [False] * (len(slots.tensor_idx) + 1)
    bufs = slots.buffers()
    n_x = 1 if x_static.requires_grad else 0
    inputs = _grad_inputs(x_static, named)
    used: List[int] = []

    def body():
        need = [live.graph_outs[i] for i, _ in bufs]
        got = torch.autograd.grad(need, inputs, grad_outputs=[b for _, b in bufs],
                                  allow_unused=True) if need else (None,) * len(inputs)
        if not used:  # which parameters get a gradient (the same in every run)
            used.extend(j for j, g in enumerate(got[n_x:]) if g is not None)
        if used:
            torch._foreach_add_([named[j][1].grad for j in used],
                                [got[n_x + j] for j in used])
        return got[0] if n_x else None

    graph = graphs.new_graph()
    gx = graphs.capture(graph, pool, body)
    params = tuple(named[j][1] for j in used)
    return _Backward(graph, slots, gx, params, tuple(p.grad for p in params),
                     tuple(named[j][0] for j in used))


def _handle(fwd: _Forward, bwd: _Backward, x_static: torch.Tensor,
            live: _Live) -> GraphedCall:
    anchor = torch.zeros((), device=x_static.device, requires_grad=True)
    return GraphedCall(fwd=fwd.graph, bwd=bwd.graph, fwd_replay=fwd.graph.replay,
                       bwd_replay=bwd.graph.replay, x_static=x_static, outs=fwd.outs,
                       slots=bwd.slots, gx_static=bwd.gx, params=bwd.params,
                       grads=bwd.grads, names=bwd.names, anchor=anchor,
                       device_type=x_static.device.type, live=live)
