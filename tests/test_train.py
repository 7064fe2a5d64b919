"""End-to-end training checks on real gloo ranks: backend and EP parity, resume,
activation checkpointing, zero-row experts, recipe errors, and the CLI."""
import dataclasses
import json
import os

import pytest
import torch

from moe_dispatch import available_backends
from token_dispatcher import MoETokenDispatcher
from token_dispatcher.layer import MoELayer
from token_dispatcher.model import ModelConfig, MoETransformer, lm_loss
from token_dispatcher.train import (DataConfig, Recipe, RecipeError, RunOptions, TrainConfig,
                                    load_recipe, main, train)

STEPS = 6


def tiny_recipe(**model_kw) -> Recipe:
    m = dict(hidden=32, layers=2, heads=2, seq_len=16, num_experts=8, top_k=2, ffn_hidden=32,
             aux_loss_coeff=0.01, z_loss_coeff=0.001, expert_impl="loop")
    m.update(model_kw)
    return Recipe(name="tiny_test", seed=int(torch.randint(0, 10_000, ()).item()),
                  device="cpu", dispatcher="alltoall",
                  model=ModelConfig(**m),
                  train=TrainConfig(steps=STEPS, batch_size=8, lr=0.01, warmup_steps=2,
                                    log_every=1, plot=False),
                  data=DataConfig())


# ---------------------------------------------------------------- run on every pool rank

def train_worker(rank, world, recipe, out, resume=False, stop_at=None):
    rows = train(recipe, RunOptions(out=out, resume=resume, stop_at=stop_at, progress=False,
                                    quiet=True))
    return [{k: r[k] for k in ("step", "loss", "aux_loss", "z_loss", "grad_norm",
                                "max_expert_load", "load_imbalance_per_layer",
                                "max_rows_per_rank", "budget_overflows")} for r in rows]


def zero_row_worker(rank, world, H, Fh, E, K, xs):
    """EP over all ranks; every token is steered to experts 0 and 1 (rank 0's), so the
    other ranks receive no rows at all, forward and backward."""
    disp = MoETokenDispatcher(E, backend="alltoall")
    torch.manual_seed(0)
    layer = MoELayer(H, Fh, E, K, dispatcher=disp, init_std=0.3,
                     router_kwargs=dict(score_func="sigmoid", score_bias=True))
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([10.0, 10.0] + [-10.0] * (E - 2)))
    seen = []
    run_experts = layer.experts.forward

    def record(tokens, tokens_per_expert, probs):
        seen.append(tokens_per_expert.tolist())
        return run_experts(tokens, tokens_per_expert, probs)
    layer.experts.forward = record
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x).output
    y.square().sum().backward()
    return dict(received=seen[0], y=y.detach(), gx=x.grad,
                gw={n: (None if p.grad is None else p.grad.clone())
                    for n, p in layer.experts.named_parameters()})


def _losses(rows):
    return torch.tensor([r["loss"] for r in rows], dtype=torch.float64)


_BASELINE = {}


@pytest.fixture
def baseline(gloo_pool, tmp_path_factory):
    """alltoall, EP=2 on 2 ranks: the curve the other world-2 runs are compared with
    (computed once per session)."""
    if "run" not in _BASELINE:
        recipe = tiny_recipe()
        out = str(tmp_path_factory.mktemp("baseline"))
        _BASELINE["run"] = (recipe, gloo_pool(2).run("test_train", "train_worker", recipe, out))
    return _BASELINE["run"]


def test_loss_goes_down_and_metrics_written(baseline, tmp_path):
    recipe, rows = baseline[0], baseline[1][0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = _losses(rows)
    assert abs(losses[0] - 5.545) < 0.1  # ~ln 256 at init
    assert losses[-1] < losses[0] - 0.1
    assert all(r["max_expert_load"] > 0 for r in rows)


def test_alltoall_and_allgather_give_the_same_curve(gloo_pool, baseline, tmp_path):
    recipe, rows = baseline
    other = dataclasses.replace(recipe, dispatcher="allgather")
    rows_ag = gloo_pool(2).run("test_train", "train_worker", other, str(tmp_path))
    torch.testing.assert_close(_losses(rows_ag[0]), _losses(rows[0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in rows_ag[0]]),
                               torch.tensor([r["grad_norm"] for r in rows[0]]), rtol=1e-4, atol=0)
    assert rows_ag[0] == rows_ag[1]  # every rank reports the same global metrics


@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
def test_budget_mode_curve_equals_exact_and_overflow_reruns(gloo_pool, baseline, tmp_path,
                                                            backend):
    # A budget far too small for the first steps: every overflowed step is rerun exactly and
    # the budget grows, so the curve is the exact run's; once it fits, the budget mode's
    # steps (sync-free) compute the same thing.
    recipe, rows = baseline
    bud = dataclasses.replace(recipe, dispatcher=backend, max_rows_per_rank=8)
    got = gloo_pool(2).run("test_train", "train_worker", bud, str(tmp_path))[0]
    torch.testing.assert_close(_losses(got), _losses(rows[0]), rtol=1e-5, atol=0)
    assert got[0]["budget_overflows"] >= 1 and got[0]["max_rows_per_rank"] > 8
    assert got[-1]["budget_overflows"] < STEPS  # grown to fit: later steps ran in budget
    assert got[-1]["max_rows_per_rank"] >= got[0]["max_rows_per_rank"]


def test_budget_overflow_drop_policy_keeps_going(gloo_pool, baseline, tmp_path):
    recipe, rows = baseline
    bud = dataclasses.replace(recipe, max_rows_per_rank=8, overflow="drop")
    got = gloo_pool(2).run("test_train", "train_worker", bud, str(tmp_path))[0]
    assert got[-1]["budget_overflows"] == STEPS and got[-1]["max_rows_per_rank"] == 8
    assert not torch.allclose(_losses(got), _losses(rows[0]))  # rows really were dropped


def test_budget_recipe_keys_checked(tmp_path):
    from token_dispatcher.train import validate_recipe
    r = tiny_recipe()
    r.train.cuda_graph = True
    with pytest.raises(RecipeError, match="max_rows_per_rank"):
        validate_recipe(r)
    r.max_rows_per_rank = 64
    with pytest.raises(RecipeError, match="bf16"):
        validate_recipe(r)
    r.train.precision = "bf16"
    validate_recipe(r)
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="CUDA"):
            train(r, RunOptions(out=str(tmp_path), progress=False, quiet=True))
    r = tiny_recipe()
    r.max_rows_per_rank, r.pad_multiple = 30, 4
    with pytest.raises(RecipeError, match="multiple of pad_multiple"):
        validate_recipe(r)
    r.max_rows_per_rank, r.overflow = 32, "ignore"
    with pytest.raises(RecipeError, match="overflow"):
        validate_recipe(r)


def test_ep1_ep2_ep4_give_the_same_curve(gloo_pool, tmp_path):
    """Same global model and data on 4 ranks: EP=1 (4-way data parallel), EP=2 x DP=2,
    EP=4. Exercises the expert replica-group averaging, shared-expert and bias-update
    paths and the capacity rule (per source rank, so independent of EP; the "position"
    policy, because "probs" drops flip on near-equal probs at float32 noise level)."""
    recipe = tiny_recipe(score_func="sigmoid", score_bias=True, bias_update_rate=0.01,
                         shared_expert_hidden=16)
    recipe.capacity_factor, recipe.capacity_policy = 1.0, "position"
    curves = {}
    for ep in (1, 2, 4):
        r = dataclasses.replace(recipe, ep=ep)
        rows = gloo_pool(4).run("test_train", "train_worker", r, str(tmp_path / f"ep{ep}"))
        curves[ep] = rows[0]
    for ep in (2, 4):
        torch.testing.assert_close(_losses(curves[ep]), _losses(curves[1]), rtol=1e-5, atol=0)
        # Adam hides a uniform scale error of the expert grads in the loss; the norm does not.
        torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in curves[ep]]),
                                   torch.tensor([r["grad_norm"] for r in curves[1]]),
                                   rtol=1e-3, atol=0)
        for a, b in zip(curves[ep], curves[1]):
            assert a["load_imbalance_per_layer"] == pytest.approx(b["load_imbalance_per_layer"])
    assert _losses(curves[1])[-1] < _losses(curves[1])[0]


def test_resume_reproduces_uninterrupted_curve(gloo_pool, baseline, tmp_path):
    recipe, rows = baseline
    out = str(tmp_path)
    part = gloo_pool(2).run("test_train", "train_worker", recipe, out, False, 3)
    assert [r["step"] for r in part[0]] == [1, 2, 3]
    assert os.path.exists(os.path.join(out, "checkpoint", "latest.json"))
    resumed = gloo_pool(2).run("test_train", "train_worker", recipe, out, True)
    assert resumed[0] == resumed[1]
    assert [r["step"] for r in resumed[0]] == list(range(1, STEPS + 1))
    # Bitwise: same ops in the same order from the same restored state.
    assert _losses(resumed[0]).tolist() == _losses(rows[0]).tolist()
    assert [r["grad_norm"] for r in resumed[0]] == [r["grad_norm"] for r in rows[0]]
    # The metrics file is the uninterrupted curve too (no duplicated steps).
    with open(os.path.join(out, "metrics.jsonl")) as f:
        file_rows = [json.loads(l) for l in f]
    assert [r["step"] for r in file_rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in file_rows] == _losses(rows[0]).tolist()


def test_activation_checkpointing_same_curve_on_two_ranks(gloo_pool, baseline, tmp_path):
    recipe, rows = baseline
    ck = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model,
                                                               activation_checkpointing=True))
    rows_ck = gloo_pool(2).run("test_train", "train_worker", ck, str(tmp_path))
    torch.testing.assert_close(_losses(rows_ck[0]), _losses(rows[0]), rtol=1e-6, atol=0)


def _tiny_model(ckpt: bool, seed: int):
    cfg = ModelConfig(hidden=32, layers=2, heads=2, seq_len=16, num_experts=4, top_k=2,
                      ffn_hidden=32, shared_expert_hidden=8, aux_loss_coeff=0.01,
                      z_loss_coeff=0.01, activation_checkpointing=ckpt)
    return MoETransformer(cfg, MoETokenDispatcher(4), seed=seed)


def test_activation_checkpointing_gradients_equal():
    seed = int(torch.randint(0, 10_000, ()).item())
    tokens = torch.randint(0, 256, (3, 17))
    plain, ck = _tiny_model(False, seed), _tiny_model(True, seed)
    calls = {"router": 0, "dispatch": 0}
    for router in ck.routers():
        def router_fwd(*a, _f=router.forward, **k):
            calls["router"] += 1
            return _f(*a, **k)
        router.forward = router_fwd
    disp = ck.blocks[0].moe.dispatcher  # one dispatcher shared by all layers

    def dispatch(*a, _f=disp.dispatch, **k):
        calls["dispatch"] += 1
        return _f(*a, **k)
    disp.dispatch = dispatch
    grads = []
    for model in (plain, ck):
        out = model(tokens[:, :-1])
        loss = lm_loss(out.logits_BSV, tokens[:, 1:]) + out.aux_loss + out.z_loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-8, msg=n)
    # Recompute happened (dispatch ran twice per layer) but routing ran once per layer:
    # the recomputed dispatch is fed the forward's top-k choice, so its layout cannot change.
    assert calls == {"router": 2, "dispatch": 4}


def test_zero_row_rank_and_experts(gloo_pool):
    H, Fh, E, K, world = 8, 16, 4, 2, 2
    xs = [torch.randn(10, H), torch.randn(7, H)]
    res = gloo_pool(world).run("test_train", "zero_row_worker", H, Fh, E, K, xs)
    assert res[0]["received"] == [17, 17] and res[1]["received"] == [0, 0]
    for name, g in res[1]["gw"].items():
        assert g is not None and torch.count_nonzero(g) == 0, name
    for name, g in res[0]["gw"].items():
        assert g is not None and torch.count_nonzero(g) > 0, name
    # Reference: the same layer in one process (all experts local).
    torch.manual_seed(0)
    ref = MoELayer(H, Fh, E, K, dispatcher=MoETokenDispatcher(E), init_std=0.3,
                   router_kwargs=dict(score_func="sigmoid", score_bias=True))
    with torch.no_grad():
        ref.router.expert_bias.copy_(torch.tensor([10.0, 10.0] + [-10.0] * (E - 2)))
    for r in range(world):
        x = xs[r].clone().requires_grad_(True)
        y = ref(x).output
        y.square().sum().backward()
        torch.testing.assert_close(res[r]["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["gx"], x.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- recipes and the CLI

def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,key", [
    ("dispatchr: alltoall\n", "dispatchr"),
    ("model:\n  hiden: 64\n", "model.hiden"),
    ("train:\n  stepz: 3\n", "train.stepz"),
    ("data:\n  file: x.txt\n", "data.file"),
])
def test_unknown_recipe_key_is_an_error_naming_it(tmp_path, capsys, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError, match=f"unknown recipe key '{key}'"):
        load_recipe(path)
    assert main([path, "--out", str(tmp_path / "o")]) == 2
    assert f"'{key}'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,match", [
    ("dispatcher: nccl\n", "dispatcher.*alltoall"),
    ("train:\n  steps: ten\n", "train.steps.*integer"),
    ("model:\n  num_experts: 6\nep: 4\n", "'ep'"),
    ("model: 3\n", "model must be a mapping"),
    ("train:\n  lr: fast\n", "train.lr.*number"),
    ("model:\n  hidden: 30\n  heads: 4\n", "model.hidden"),
])
def test_invalid_recipe_values(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_write(tmp_path, text))


def test_overrides_and_shipped_recipes(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    import importlib.util
    has_hf = importlib.util.find_spec("transformers") is not None
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml"):
            if "_hf_" in name and not has_hf:
                with pytest.raises(RecipeError, match="hf"):  # refused with the extra named
                    load_recipe(os.path.join(root, name))
                continue
            load_recipe(os.path.join(root, name))  # every shipped recipe is valid
    r = load_recipe(os.path.join(root, "tiny_cpu.yaml"),
                    {"train.steps": 7, "dispatcher": "allgather", "model.hidden": 48,
                     "train.lr": "2e-3"})
    assert (r.train.steps, r.dispatcher, r.model.hidden, r.train.lr) == (7, "allgather", 48, 2e-3)
    with pytest.raises(RecipeError, match="'model.hidn'"):
        load_recipe(os.path.join(root, "tiny_cpu.yaml"), {"model.hidn": 3})


def test_cli_refuses_unavailable_backend_before_starting_ranks(tmp_path, capfd, monkeypatch):
    """One line and exit code 2 from the launching process, instead of a traceback from
    every rank."""
    reason = available_backends()["deepep"]
    if reason == "available":
        pytest.skip("deep_ep is usable on this machine")

    def no_rank(*args, **kwargs):
        raise AssertionError("a rank was started")
    monkeypatch.setattr("token_dispatcher.train.launch._rank_main", no_rank)
    monkeypatch.setattr("token_dispatcher.train.launch._spawn", no_rank)
    path = _write(tmp_path, "nproc: 2\ndevice: cpu\ndispatcher: alltoall\n")
    out = tmp_path / "o"
    assert main([path, "--dispatcher", "deepep", "--out", str(out), "--no-progress"]) == 2
    captured = capfd.readouterr()
    assert captured.err == f"moe-train: error: backend 'deepep' is unavailable: {reason}\n"
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists()


def test_cli_spawns_ranks_and_writes_outputs(tmp_path, capfd):
    plot = "true" if _has_matplotlib() else "false"
    path = _write(tmp_path, f"""
nproc: 2
device: cpu
dispatcher: alltoall
model: {{hidden: 16, layers: 1, heads: 2, seq_len: 8, num_experts: 4, top_k: 2, ffn_hidden: 16}}
train: {{steps: 50, batch_size: 4, log_every: 1, plot: {plot}}}
""")
    data = _write(tmp_path, "hello moe world, " * 20, "corpus.txt")
    out = tmp_path / "run"
    assert main([path, "--steps", "3", "--out", str(out), "--data", data, "--no-progress",
                 "--ep", "2", "--seed", "5"]) == 0
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "tokens_per_s", "aux_loss", "max_expert_load", "mean_expert_load",
                "rss_mb"):
        assert key in rows[0], key
    assert (out / "plot.png").exists() == (plot == "true")
    assert "done:" in capfd.readouterr().out


def _has_matplotlib():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None
