"""transformers MoE models with expert parallelism (token_dispatcher.hf): parity with the
unsharded transformers model on real gloo ranks (logits, loss, every gradient), checkpoints
both ways, and training them from a recipe."""
import dataclasses
import importlib
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hf_workers import (FAMILIES, NOISE_FLOOR, check_dtype_parity, reference_model,  # noqa: E402
                        tiny_config)
from token_dispatcher.train import (DataConfig, Recipe, RecipeError, TrainConfig,  # noqa: E402
                                    load_recipe, main)
from token_dispatcher.train.recipe import ModelSection  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["alltoall", "allgather"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ep_model_equals_transformers_model(gloo_pool, family, backend, world):
    seed = 1000 + 7 * world + len(family)
    res = gloo_pool(world).run("hf_workers", "parity", family, backend, seed)
    for rank, r in enumerate(res):
        assert r["blocks"] == (1 if family == "deepseek_v3" else 2)
        assert r["names_equal"]  # every parameter keeps its transformers name
        L = 8 // world
        assert r["local_shapes"] and all(s[0] == L for s in r["local_shapes"].values())
        assert r["logits"] < 1e-6, (rank, r["logits"])
        assert r["loss"] < 1e-6, (rank, r["loss"])
        if family != "deepseek_v3":  # transformers' deepseek_v3 computes no aux loss
            assert r["aux"] is not None and r["aux"] < 1e-9
        for name, d in r["grads"].items():
            # Relative to the gradient's size; every compared gradient is a real one.
            assert d <= 1e-6 * max(r["grad_norms"][name], 1e-3), (rank, name, d)
        routers = [n for n in r["grads"] if n.endswith(("gate.weight",))]
        assert routers and all(r["grad_norms"][n] > 0 for n in routers)
        experts = [n for n in r["grads"] if n.endswith(("experts.gate_up_proj",
                                                        "experts.down_proj"))]
        assert experts and all(r["grad_norms"][n] > 0 for n in experts)
    # Every rank has its own batch: the losses differ, so tokens really crossed ranks.
    assert len({round(r["loss_value"], 9) for r in res}) == world


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ep_model_within_the_dtypes_noise(gloo_pool, family, dtype):
    """What tests/test_gpu_hf.py checks on GPUs, on 2 gloo ranks: in bf16 (and fp32) the EP
    model's errors against the float64 model are those of the unsharded model in that dtype."""
    res = gloo_pool(2).run("hf_workers", "dtype_parity", family, "alltoall", 41, dtype, "cpu")
    for rank, r in enumerate(res):
        assert check_dtype_parity(r, family, 2, NOISE_FLOOR[dtype]) == [], rank
        assert r["errors"]["logits"][1] > 0  # the noise the bound is made of is real
    assert res[0]["loss_value"] != res[1]["loss_value"]


def test_autocast_moves_rows_in_the_autocast_dtype():
    """Under autocast the block's fp32 input is dispatched (and the experts run) in bf16, as
    MoELayer does; the block returns its input's dtype, as the transformers experts do."""
    from token_dispatcher.hf import apply_expert_parallel, ep_experts
    ref = reference_model("qwen3_moe", 4, torch.float32)
    ep = reference_model("qwen3_moe", 4, torch.float32)
    apply_expert_parallel(ep)
    seen, outputs = [], []
    blocks = [mod for _, mod in ep_experts(ep)]
    disp = blocks[0].dispatcher  # one dispatcher serves every block
    real = disp.dispatch

    def dispatch(hidden, **kw):
        seen.append(hidden.dtype)
        return real(hidden, **kw)
    disp.dispatch = dispatch
    for mod in blocks:
        mod.register_forward_hook(lambda m, a, out: outputs.append(out.dtype))
    ids = torch.randint(0, 96, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ep(ids, labels=ids).loss, ref(ids, labels=ids).loss
    assert len(seen) == len(blocks) and set(seen) == {torch.bfloat16}
    assert set(outputs) == {torch.float32}
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    got.backward()
    assert all(p.grad is not None for p in ep.parameters())


def test_grouped_mm_impl_equals_loop():
    """The grouped-GEMM path (run on CPU in fp32 here) computes what the loop does."""
    from token_dispatcher.hf import EPExperts, apply_expert_parallel
    ref = reference_model("qwen3_moe", 3, torch.float32)
    models = {}
    for impl in ("loop", "grouped_mm"):
        m = reference_model("qwen3_moe", 3, torch.float32)
        apply_expert_parallel(m, expert_impl=impl)
        models[impl] = m
    ids = torch.randint(0, 96, (2, 12))
    outs = {}
    for impl, m in list(models.items()) + [("ref", ref)]:
        loss = m(ids, labels=ids).loss
        loss.backward()
        outs[impl] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    for impl in ("loop", "grouped_mm"):
        torch.testing.assert_close(outs[impl][0], outs["ref"][0], rtol=1e-5, atol=1e-6)
        for n, g in outs["ref"][1].items():
            torch.testing.assert_close(outs[impl][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert isinstance(models["grouped_mm"].model.layers[0].mlp.experts, EPExperts)


def test_unsupported_models_are_refused_naming_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM
    from token_dispatcher.hf import apply_expert_parallel
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="llama.*supported: qwen3_moe.*mixtral.*olmoe.*"
                                         "deepseek_v3"):
        apply_expert_parallel(AutoModelForCausalLM.from_config(cfg))
    m = reference_model("mixtral", 0, torch.float32)
    assert apply_expert_parallel(m) == 2
    with pytest.raises(ValueError, match="already expert-parallel"):
        apply_expert_parallel(m)
    from token_dispatcher import MoETokenDispatcher
    with pytest.raises(ValueError, match="budget mode"):
        apply_expert_parallel(reference_model("olmoe", 0, torch.float32),
                              dispatcher=MoETokenDispatcher(8, max_rows_per_rank=64))


def test_missing_transformers_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "token_dispatcher.hf", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'moe-dispatch\[hf\]'"):
        importlib.import_module("token_dispatcher.hf")
    monkeypatch.undo()  # the real module back for the other tests
    importlib.import_module("token_dispatcher.hf")


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoints_both_ways(gloo_pool, tmp_path, family):
    res = gloo_pool(2).run("hf_workers", "checkpoint_roundtrip", family, "alltoall",
                           str(tmp_path / "ep"), str(tmp_path / "plain"), 5)
    for r in res:
        assert r["same_keys"] and r["dtype"] == "torch.float32"
        assert r["weights"] == 0.0  # the gathered experts, bit for bit
        assert r["saved_logits"] < 1e-5 and r["loaded_logits"] < 1e-5
        assert r["params_kept"]
    names = os.listdir(tmp_path / "ep")
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)


# ---------------------------------------------------------------- training

def hf_recipe(family="qwen3_moe", ep=2, **hf_config) -> Recipe:
    fam = dict(deepseek_v3=dict(n_group=2, topk_group=1, first_k_dense_replace=1))
    model = ModelSection(hidden=32, layers=2, heads=2, seq_len=16, num_experts=8, top_k=2,
                         ffn_hidden=32, aux_loss_coeff=0.0 if family == "deepseek_v3" else 0.01,
                         expert_impl="loop", hf=family,
                         hf_config={**fam.get(family, {}), **hf_config})
    return Recipe(name="tiny_hf_test", seed=3, device="cpu", dispatcher="alltoall", ep=ep,
                  model=model,
                  train=TrainConfig(steps=5, batch_size=8, lr=0.01, warmup_steps=2,
                                    log_every=1, plot=False),
                  data=DataConfig())


def _losses(rows):
    return torch.tensor([r["loss"] for r in rows], dtype=torch.float64)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_training_ep2_equals_ep1_and_resumes(gloo_pool, tmp_path, family):
    """Same recipe and seed on 2 ranks: EP=2 and EP=1 (2-way data parallel) give the same
    curve; stopping and resuming reproduces it exactly."""
    r2 = hf_recipe(family, ep=2)
    rows2 = gloo_pool(2).run("hf_workers", "train_worker", r2, str(tmp_path / "ep2"))
    rows1 = gloo_pool(2).run("hf_workers", "train_worker", dataclasses.replace(r2, ep=1),
                             str(tmp_path / "ep1"))
    assert rows2[0] == rows2[1]
    torch.testing.assert_close(_losses(rows2[0]), _losses(rows1[0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in rows2[0]]),
                               torch.tensor([r["grad_norm"] for r in rows1[0]]),
                               rtol=1e-4, atol=0)
    assert _losses(rows2[0])[-1] < _losses(rows2[0])[0]
    assert all(r["max_expert_load"] > 0 for r in rows2[0])
    if family == "qwen3_moe":
        assert all(r["aux_loss"] > 0 for r in rows2[0])
    out = str(tmp_path / "resume")
    gloo_pool(2).run("hf_workers", "train_worker", r2, out, False, 2)
    resumed = gloo_pool(2).run("hf_workers", "train_worker", r2, out, True)
    assert _losses(resumed[0]).tolist() == _losses(rows2[0]).tolist()


@pytest.mark.parametrize("recipe,extra", [
    ("tiny_hf_cpu.yaml", []),
    # The GPU recipe with its bf16 autocast, on the CPU: the model and the HF path's
    # autocast rows (its GPU run is the lead's, see the README).
    ("tiny_hf_gpu.yaml", ["--set", "device=cpu"]),
])
def test_shipped_hf_recipe_trains_from_the_cli(tmp_path, recipe, extra):
    # One rank runs in this process (no spawn: a fresh process would import transformers
    # again); the 2-rank runs are the pool tests above.
    out = tmp_path / "run"
    rc = main([os.path.join(ROOT, "recipes", recipe), "--steps", "2", "--out",
               str(out), "--nproc", "1", "--ep", "1", "--set", "model.hidden=32",
               "--set", "model.seq_len=16", "--set", "train.log_every=1", "--no-progress",
               *extra])
    assert rc == 0
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # not NaN
    assert (out / "plot.png").is_file() and (out / "checkpoint" / "latest.json").is_file()


def test_gpu_hf_recipe_is_the_cpu_one_on_gpus():
    """tiny_hf_gpu.yaml: CUDA, bf16, one rank by default, EP over every rank, a model a bit
    larger than the CPU recipe's, and its hidden size fits the FP8 wire."""
    gpu = load_recipe(os.path.join(ROOT, "recipes", "tiny_hf_gpu.yaml"))
    cpu = load_recipe(os.path.join(ROOT, "recipes", "tiny_hf_cpu.yaml"))
    assert (gpu.device, gpu.nproc, gpu.ep, gpu.train.precision) == ("cuda", 1, None, "bf16")
    assert gpu.model.hf == cpu.model.hf == "qwen3_moe"
    assert gpu.model.hidden > cpu.model.hidden and gpu.model.layers >= cpu.model.layers
    assert gpu.model.hidden % 128 == 0 and gpu.model.num_experts % 8 == 0
    fp8 = load_recipe(os.path.join(ROOT, "recipes", "tiny_hf_gpu.yaml"), {"wire_dtype": "fp8"})
    assert fp8.wire_dtype == "fp8"


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,match", [
    ("model:\n  hf: gpt2\n", "model.hf.*qwen3_moe"),
    ("model:\n  hf: qwen3_moe\n  hf_config:\n    n_grup: 2\n", "hf_config.n_grup"),
    ("model:\n  hf: mixtral\n  hf_config:\n    hidden_size: 8\n",
     "hf_config.hidden_size.*set it there"),
    ("model:\n  hf: olmoe\n  score_func: sigmoid\n", "model.score_func.*hf_config"),
    ("model:\n  hf: deepseek_v3\n", "aux_loss_coeff"),
])
def test_invalid_hf_recipes(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_write(tmp_path, text))


def test_recipe_maps_the_model_section_onto_the_config():
    from token_dispatcher.train.hf_model import hf_config
    r = load_recipe(os.path.join(ROOT, "recipes", "tiny_hf_cpu.yaml"),
                    {"model.hf": "deepseek_v3", "model.aux_loss_coeff": 0,
                     "model.hf_config": {"n_group": 4, "topk_group": 2}})
    cfg = hf_config(r.model)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts,
            cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_group,
            cfg.topk_group, cfg.vocab_size) == ("deepseek_v3", 128, 2, 8, 2, 256, 4, 2, 256)
    assert tiny_config("olmoe").num_experts == 8  # the test configs are what they say
    from token_dispatcher.hf import SUPPORTED
    from token_dispatcher.train.hf_model import HF_FAMILIES
    assert HF_FAMILIES == tuple(SUPPORTED) == tuple(FAMILIES)
