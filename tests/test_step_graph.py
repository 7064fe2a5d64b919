"""The whole training step as one graph (``token_dispatcher.train.step_graph``) on the CPU.

Only the CUDA graph is mocked (``test_layer_graph.RerunGraph``: a replay reruns the
captured Python body and writes its results into the captured output tensors); the GPU
capture is proven on the device (BENCHMARKS.md). Compared with eager steps of a twin model:
losses, counts, statuses and every gradient; the overflow rerun; the misuse errors.
"""
import contextlib
import copy
import dataclasses

import pytest
import torch

from test_layer_graph import STANDIN, RerunGraph
from test_train import tiny_recipe
from token_dispatcher import MoETokenDispatcher
from token_dispatcher.model import ModelConfig, MoETransformer, lm_loss
from token_dispatcher.train import RunOptions, loop
from token_dispatcher.train.step_graph import capture_step

CFG = ModelConfig(hidden=16, layers=3, heads=2, seq_len=8, num_experts=4, top_k=2,
                  ffn_hidden=16, shared_expert_hidden=8, z_loss_coeff=0.001, aux_loss_coeff=0.01)


def forward_of(model):
    def forward(inp_BS, tgt_BS):
        out = model(inp_BS)
        lm = lm_loss(out.logits_BSV, tgt_BS)
        return out, lm, lm + out.aux_loss + out.z_loss
    return forward


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 256, (2, 9), generator=g)
    return tok[:, :-1], tok[:, 1:]


def test_replays_equal_eager_steps():
    eager = MoETransformer(CFG, MoETokenDispatcher(4, max_rows_per_rank=64), seed=0)
    graphed = copy.deepcopy(eager)
    sg = capture_step(graphed, forward_of(graphed), *batch(0), graphs=STANDIN)
    assert all(p.grad is not None and not p.grad.any() for p in graphed.parameters())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1)
    for step in range(3):  # with optimizer steps between: the graph reads weights in place
        inp, tgt = batch(step + 1)
        eager.zero_grad(set_to_none=False)
        out_e, lm_e, loss_e = forward_of(eager)(inp, tgt)
        loss_e.backward()
        out_g, lm_g, loss_g = sg(inp, tgt)
        assert not loss_g.requires_grad  # static, detached: the backward already ran
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(lm_g, lm_e.detach(), rtol=1e-6, atol=0)
        assert torch.equal(out_g.tokens_per_expert_NE, out_e.tokens_per_expert_NE)
        assert len(out_g.statuses) == CFG.layers
        assert all(torch.equal(a, b) for a, b in zip(out_g.statuses, out_e.statuses))
        for (n, a), b in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)
        opt_e.step(), opt_g.step()


def test_misuse_raises():
    model = MoETransformer(CFG, MoETokenDispatcher(4, max_rows_per_rank=64), seed=0)
    sg = capture_step(model, forward_of(model), *batch(0), graphs=STANDIN)
    inp, tgt = batch(1)
    with pytest.raises(ValueError, match=r"captured for batches \[2, 8\]"):
        sg(inp[:1], tgt[:1])
    model.zero_grad()  # set_to_none=True: the graph could not write the new .grad
    with pytest.raises(RuntimeError, match="set to None or replaced"):
        sg(inp, tgt)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError,
                                                                      match="cache"):
        capture_step(model, forward_of(model), inp, tgt, graphs=STANDIN)
    cuda_kit = dataclasses.replace(STANDIN, device_type="cuda")
    with pytest.raises(RuntimeError, match="the batch is on cpu"):
        capture_step(model, forward_of(model), inp, tgt, graphs=cuda_kit)


def test_overflowed_replay_reruns_exactly_in_the_loop(tmp_path):
    """In the training loop: a replay whose budget overflowed is thrown away, the step
    reruns eagerly in the exact mode (its gradients replace the replay's), the budget grows
    and the step graph is dropped to be captured again."""
    r = tiny_recipe(expert_impl="auto")
    r.max_rows_per_rank = 8  # far too small: every step overflows
    run = loop._build(r, RunOptions(out=str(tmp_path), quiet=True), loop._make_layout(0, 1, 1),
                      torch.device("cpu"))
    exact = copy.deepcopy(run.model)
    exact.moe_layers()[0].dispatcher.set_max_rows_per_rank(None)
    forward = loop._model_forward(run, contextlib.nullcontext())
    inp, tgt = batch_for(r)
    run.recipe.train.cuda_graph, run.recipe.train.cuda_graph_scope = True, "step"
    run.step_graph = capture_step(run.model, forward, inp, tgt, graphs=STANDIN)
    out, lm = loop._forward_backward(run, forward, inp, tgt)
    assert run.budget.overflows == 1 and run.budget.budget > 8
    assert run.step_graph is None and run.budget.capture_pending
    exact.zero_grad(set_to_none=False)
    out_x, lm_x, loss_x = forward_of(exact)(inp, tgt)
    loss_x.backward()
    torch.testing.assert_close(lm, lm_x, rtol=1e-6, atol=0)
    for (n, a), b in zip(exact.named_parameters(), run.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)


def batch_for(r):
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 256, (4, r.model.seq_len + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def test_scope_is_checked():
    from token_dispatcher.train import RecipeError, validate_recipe
    r = tiny_recipe()
    r.train.cuda_graph_scope = "model"
    with pytest.raises(RecipeError, match="cuda_graph_scope"):
        validate_recipe(r)


def test_stand_in_captured_one_graph():
    RerunGraph.log.clear()
    model = MoETransformer(CFG, MoETokenDispatcher(4, max_rows_per_rank=64), seed=0)
    sg = capture_step(model, forward_of(model), *batch(0), graphs=STANDIN)
    assert RerunGraph.log == [sg.graph]
