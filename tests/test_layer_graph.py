"""The MoE layer's graph capture and replay (``token_dispatcher.layer_graph``) on the CPU.

Only the CUDA graph is mocked: ``RerunGraph`` records the captured Python body and, on
replay, runs it again and writes its tensor results into the tensors the capture returned
(the static buffers), as a real graph's kernels would. Everything else is the production
path: static input and output-gradient buffers, the replay's autograd Function, the
parameters' gradients added into ``.grad`` inside the backward "graph", the identity checks.
The GPU counterpart is ``benchmarks/scripts/graph_grad_check.py``.
"""
import contextlib
import copy

import pytest
import torch
from torch.utils._pytree import tree_leaves

from token_dispatcher import MoETokenDispatcher
from token_dispatcher.layer import MoELayer, capture_layers
from token_dispatcher.layer_graph import GraphKit
from token_dispatcher.model import ModelConfig, MoETransformer, lm_loss

H, T = 16, 12


class RerunGraph:
    """A stand-in CUDA graph: ``capture`` runs the body once and keeps it and its result;
    ``replay`` runs it again (grad mode as at capture) and copies the new results into the
    captured ones."""

    log: list = []  # every graph, in capture order

    def __init__(self):
        self.body, self.result, self.grad_mode = None, None, True

    def capture(self, body):
        RerunGraph.log.append(self)
        self.body, self.grad_mode = body, torch.is_grad_enabled()
        self.result = body()
        return self.result

    def replay(self):
        with torch.set_grad_enabled(self.grad_mode):
            fresh = self.body()
        with torch.no_grad():
            for old, new in zip(tree_leaves(self.result), tree_leaves(fresh)):
                old.copy_(new)


STANDIN = GraphKit(new_graph=RerunGraph, new_pool=lambda: None,
                   capture=lambda graph, pool, body: graph.capture(body),
                   warmup_stream=contextlib.nullcontext, sync=lambda: None, device_type="cpu")


def make_layer(seed=0, shared=8):
    torch.manual_seed(seed)
    disp = MoETokenDispatcher(4, max_rows_per_rank=64)
    return MoELayer(H, 16, 4, 2, dispatcher=disp, shared_expert_hidden=shared,
                    router_kwargs=dict(aux_loss_coeff=0.01, z_loss_coeff=0.001), seed=seed)


def twins(n=1):
    """(eager layers, captured layers): equal weights, the second set captured jointly."""
    eager = [make_layer(seed=i) for i in range(n)]
    graphed = copy.deepcopy(eager)
    capture_layers(graphed, [torch.randn(3, 4, H, requires_grad=True) for _ in range(n)],
                   graphs=STANDIN)
    return eager, graphed


def run(layers, x, w, aux_z=(1.0, 1.0)):
    """Forward through ``layers`` in turn, backward of a loss on the output plus the aux and
    z losses times ``aux_z`` (1.0: added as they are, so both get one gradient tensor;
    None: left out; ``w`` None leaves the output out); returns the MoEOutputs."""
    outs, h = [], x
    for layer in layers:
        m = layer(h)
        outs.append(m)
        h = m.output
    loss = (h * w).sum() if w is not None else 0.0
    for m in outs:
        for t, c in zip((m.aux_loss, m.z_loss), aux_z):
            if c is not None:
                loss = loss + (t if c == 1.0 else c * t)
    loss.backward()
    return outs


def grads(layers):
    return {f"{i}.{n}": p.grad.clone() for i, layer in enumerate(layers)
            for n, p in layer.named_parameters()}


def assert_same_grads(a, b):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-7, msg=n)


def zero(layers):
    for layer in layers:
        layer.zero_grad(set_to_none=False)


def test_replay_equals_eager_outputs_and_every_gradient():
    """Two layers captured jointly, the second fed the first's output (a non-leaf: its
    input gradient is handed back as the static buffer), three steps."""
    eager, graphed = twins(2)
    names = {n for n, _ in graphed[0].named_parameters()}
    assert {"router.weight", "experts.w1", "experts.w2", "experts.w3",
            "shared_expert.w1.weight"} <= names
    for step in range(3):
        x = torch.randn(3, 4, H)
        w = torch.randn(3, 4, H)
        zero(eager), zero(graphed)
        xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        for me, mg in zip(run(eager, xe, w), run(graphed, xg, w)):
            for a, b in zip((me.output, me.aux_loss, me.z_loss),
                            (mg.output, mg.aux_loss, mg.z_loss)):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
            assert torch.equal(mg.tokens_per_expert_E, me.tokens_per_expert_E)
            assert torch.equal(mg.status, me.status)
        assert all(layer._graphed.live.calls == step + 1 for layer in graphed), \
            "the graph path did not run"
        torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-7)
        assert_same_grads(eager, graphed)
        assert all(p.grad.abs().sum() > 0 for layer in graphed for p in layer.parameters())


def test_parameters_never_pass_through_autograd():
    """The replay node's only inputs are x (and the anchor): no parameter AccumulateGrad."""
    _, (layer,) = twins()
    m = layer(torch.randn(3, 4, H, requires_grad=True))
    params = {id(p) for p in layer.parameters()}
    nexts = [f for f, _ in m.output.grad_fn.next_functions if f is not None]
    assert nexts and not any(id(getattr(f, "variable", None)) in params for f in nexts)


def test_gradients_accumulate_over_two_backwards():
    """Micro-steps without zeroing: the graph adds into .grad, as autograd does; the same
    leaf input twice (its .grad must not be the graph's static buffer)."""
    eager, graphed = twins(2)
    zero(eager), zero(graphed)
    xe = torch.randn(3, 4, H).requires_grad_()
    xg = xe.detach().clone().requires_grad_()
    for _ in range(2):
        w = torch.randn(3, 4, H)
        run(eager, xe, w), run(graphed, xg, w)
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-7)
    assert_same_grads(eager, graphed)
    one = copy.deepcopy(eager)  # one backward's worth: two differ from it
    zero(one)
    run(one, xe.detach().requires_grad_(), torch.randn(3, 4, H))
    assert not torch.allclose(grads(one)["0.experts.w1"], grads(graphed)["0.experts.w1"])


def test_zero_grad_in_place_across_optimizer_steps():
    eager, graphed = twins()
    opts = [torch.optim.SGD(ls[0].parameters(), lr=0.5) for ls in (eager, graphed)]
    for _ in range(3):
        x, w = torch.randn(3, 4, H), torch.randn(3, 4, H)
        for opt, layers in zip(opts, (eager, graphed)):
            opt.zero_grad(set_to_none=False)
            run(layers, x.clone().requires_grad_(), w)
        assert_same_grads(eager, graphed)
        for opt in opts:
            opt.step()
    for (n, a), b in zip(eager[0].named_parameters(), graphed[0].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("how", ["none", "replaced"])
def test_grad_set_to_none_or_replaced_raises(how):
    _, (layer,) = twins()
    if how == "none":
        layer.zero_grad()  # set_to_none=True, the default
    else:
        layer.experts.w2.grad = torch.zeros_like(layer.experts.w2)
    m = layer(torch.randn(3, 4, H, requires_grad=True))
    word = "set to None" if how == "none" else "replaced"
    with pytest.raises(RuntimeError, match=rf"experts\.w2 \({word}\).*set_to_none=False"):
        m.output.sum().backward()


def test_capture_leaves_nothing_in_grad():
    """Missing .grad are created as zeros; existing ones keep their identity; the warm-up
    and the (stand-in) capture leave nothing accumulated; weights are untouched."""
    (layer,) = [make_layer()]
    keep = layer.router.weight.grad = torch.full_like(layer.router.weight, 3.0)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    capture_layers([layer], [torch.randn(T, H, requires_grad=True)], graphs=STANDIN)
    assert layer.router.weight.grad is keep
    for n, p in layer.named_parameters():
        assert p.grad is not None and not p.grad.any(), n
        assert torch.equal(p, before[n]), n
    assert layer._graphed.grads_intact()


def test_several_layers_captured_jointly_in_a_model():
    """A model's MoE layers captured together (forwards in order, backwards reversed);
    the loss and every gradient, attention and embedding included, over three steps."""
    cfg = ModelConfig(hidden=H, layers=3, heads=2, seq_len=8, num_experts=4, top_k=2,
                      ffn_hidden=16, shared_expert_hidden=8, z_loss_coeff=0.001)
    eager = MoETransformer(cfg, MoETokenDispatcher(4, max_rows_per_rank=64), seed=0)
    graphed = copy.deepcopy(eager)
    RerunGraph.log.clear()
    graphed.capture_moe_graphs(torch.randint(0, 256, (2, 8)), graphs=STANDIN)
    calls = [layer._graphed for layer in graphed.moe_layers()]
    assert RerunGraph.log == [c.fwd for c in calls] + [c.bwd for c in reversed(calls)]
    for step in range(3):
        tok = torch.randint(0, 256, (2, 9))
        losses = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=False)
            out = model(tok[:, :-1])
            loss = lm_loss(out.logits_BSV, tok[:, 1:]) + out.aux_loss + out.z_loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
        assert all(c.live.calls == step + 1 for c in calls)
        for (n, a), b in zip(eager.named_parameters(), graphed.parameters()):
            assert a.grad is not None, n
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_output_gradients_in_every_form():
    """The aux and z losses' gradients: one tensor for both, different ones, one or both
    left out; the output left out (a static buffer must not keep an earlier backward's
    gradient)."""
    eager, graphed = twins()
    for aux_z, use_out in (((1.0, 1.0), True), ((None, None), True), ((None, None), True),
                           ((2.0, 3.0), True), ((None, 1.0), True), ((1.0, None), True),
                           ((1.0, 1.0), False), ((2.0, None), False), ((1.0, 1.0), True)):
        x = torch.randn(3, 4, H)
        w = torch.randn(3, 4, H) if use_out else None
        zero(eager), zero(graphed)
        run(eager, x.clone().requires_grad_(), w, aux_z)
        run(graphed, x.clone().requires_grad_(), w, aux_z)
        assert_same_grads(eager, graphed)


def test_input_without_grad_still_gives_parameter_gradients():
    eager, graphed = twins()
    zero(eager), zero(graphed)
    x, w = torch.randn(3, 4, H), torch.randn(3, 4, H)
    run(eager, x, w), run(graphed, x, w)
    assert_same_grads(eager, graphed)
    assert graphed[0].router.weight.grad.any()


def test_backward_of_an_older_forward_raises():
    _, (layer,) = twins()
    first = layer(torch.randn(3, 4, H, requires_grad=True))
    layer(torch.randn(3, 4, H, requires_grad=True))
    with pytest.raises(RuntimeError, match="latest"):
        first.output.sum().backward()


def test_graphs_replay_only_when_training_with_grad():
    eager, (layer,) = twins()
    x = torch.randn(3, 4, H)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x.requires_grad_())
    layer.train()
    layer.enable_cuda_graph(False)
    m = layer(x)
    assert layer._graphed.live.calls == 0
    torch.testing.assert_close(m.output, eager[0](x).output)
    layer.enable_cuda_graph(True)
    layer(x)
    assert layer._graphed.live.calls == 1
    layer.drop_cuda_graph()
    assert layer._graphed is None and not layer.cuda_graph


def test_input_unlike_the_sample_raises():
    _, (layer,) = twins()
    with pytest.raises(ValueError, match=r"captured for inputs \[3, 4, 16\]"):
        layer(torch.randn(4, 3, H, requires_grad=True))
    with pytest.raises(ValueError, match="float64"):
        layer(torch.randn(3, 4, H, dtype=torch.float64))
    plain = make_layer()
    capture_layers([plain], [torch.randn(T, H)], graphs=STANDIN)  # a sample without grad
    with pytest.raises(RuntimeError, match="sample did not"):
        plain(torch.randn(T, H, requires_grad=True))


def test_capture_refuses_a_sample_on_another_device():
    with pytest.raises(RuntimeError, match="sample is on cpu"):
        capture_layers([make_layer()], [torch.randn(T, H)],
                       graphs=GraphKit(RerunGraph, lambda: None, None, contextlib.nullcontext,
                                       lambda: None, device_type="meta"))


def test_frozen_layer_captures_and_gives_only_the_input_gradient():
    """No parameter requires grad: nothing to add into, the input gradient still flows."""
    eager = [make_layer()]
    graphed = copy.deepcopy(eager)
    for layer in eager + graphed:
        layer.requires_grad_(False)
    capture_layers(graphed, [torch.randn(3, 4, H, requires_grad=True)], graphs=STANDIN)
    assert graphed[0]._graphed.params == ()
    x, w = torch.randn(3, 4, H), torch.randn(3, 4, H)
    xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    run(eager, xe, w), run(graphed, xg, w)
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-7)
