"""Rank functions for tests/test_hf.py (run by the gloo pool): transformers MoE models made
expert-parallel, against the unsharded transformers model on the same batches."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

V, B, S = 96, 2, 12  # vocabulary, sequences per rank, positions

# Tiny configs of each supported family (2 layers, hidden 32, 8 experts, top-2), built from
# transformers config objects: nothing is downloaded.
FAMILIES = {
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=16, intermediate_size=32,
                      head_dim=8, norm_topk_prob=True, router_aux_loss_coef=0.02),
    "mixtral": dict(num_local_experts=8, intermediate_size=16, router_aux_loss_coef=0.02),
    "olmoe": dict(num_experts=8, intermediate_size=16, router_aux_loss_coef=0.02),
    # Layer 0 dense, layer 1 MoE with a shared expert, sigmoid scores + selection bias,
    # top-2 of 4 groups of 2 experts.
    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=16, intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5),
}


def tiny_config(family: str):
    from transformers import AutoConfig
    return AutoConfig.for_model(
        family, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **FAMILIES[family])


def reference_model(family: str, seed: int, dtype=torch.float64):
    """The unsharded transformers model (its eager experts loop), the same on every rank."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family),
                                             experts_implementation="eager").to(dtype)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):  # make the selection bias matter
                mod.e_score_correction_bias.normal_(0, 0.02)
    return model


def batches(seed: int, world: int):
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, V, (B, S), generator=g) for _ in range(world)]


def _diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def parity(rank, world, family, backend, seed):
    """Forward + backward of the EP model on this rank's batch against the unsharded model.

    Dense and router gradients compare with the reference's on this rank's batch; an
    expert's gradient is the sum over every rank's loss (each rank's tokens reach it), so it
    compares with the reference's summed over all batches.
    """
    from token_dispatcher.hf import EPExperts, apply_expert_parallel
    ref = reference_model(family, seed)
    ep = copy.deepcopy(ref)
    n_blocks = apply_expert_parallel(ep, backend=backend)
    data = batches(seed, world)
    kw = dict(output_router_logits=True)
    expert_names = {f"{n}.{p}" for n, m in ep.named_modules() if isinstance(m, EPExperts)
                    for p in ("gate_up_proj", "down_proj")}
    ref_grads, expert_sum = {}, {}
    for s, ids in enumerate(data):
        ref.zero_grad(set_to_none=True)
        out = ref(ids, labels=ids, **kw)
        out.loss.backward()
        if s == rank:
            ref_out = out
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        for n in expert_names:
            g = ref.get_parameter(n).grad
            expert_sum[n] = g.clone() if n not in expert_sum else expert_sum[n] + g
    out = ep(data[rank], labels=data[rank], **kw)
    out.loss.backward()
    L = 8 // world  # every tiny config has 8 experts
    off = rank * L
    res = dict(blocks=n_blocks, logits=_diff(out.logits, ref_out.logits),
               loss=_diff(out.loss, ref_out.loss), loss_value=float(out.loss.detach()),
               aux=None if getattr(out, "aux_loss", None) is None
               else _diff(out.aux_loss, ref_out.aux_loss),
               names_equal=sorted(n for n, _ in ep.named_parameters())
               == sorted(n for n, _ in ref.named_parameters()),
               grads={}, grad_norms={}, local_shapes={})
    for n, p in ep.named_parameters():
        if n in expert_names:
            want = expert_sum[n][off:off + L]
            res["local_shapes"][n] = tuple(p.shape)
        else:
            want = ref_grads[n]
        assert p.grad is not None, n
        res["grads"][n] = _diff(p.grad, want)
        res["grad_norms"][n] = float(want.norm())
    return res


def _train_step(model, ids, lr=0.05):
    """One step on the sum of every rank's loss: an expert's gradient is that sum already
    (every rank's tokens reach it); the replicated weights' gradients are summed here."""
    from token_dispatcher.hf import expert_parameters
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    experts = {id(p) for _, p in expert_parameters(model)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in experts:
                dist.all_reduce(p.grad)
            p -= lr * p.grad.sign()  # moves every weight, so saved != initial


def checkpoint_roundtrip(rank, world, family, backend, save_dir, plain_dir, seed):
    """(1) EP model, one training step, save_pretrained_ep -> plain from_pretrained: the
    same weights (bitwise) and logits. (2) An ordinary checkpoint -> load_ep_state into an
    EP model of other weights: the plain model's logits."""
    from transformers import AutoModelForCausalLM
    from token_dispatcher.hf import (apply_expert_parallel, gather_state_dict, load_ep_state,
                                     save_pretrained_ep)
    data = batches(seed, world)
    ids = data[rank]
    ep = reference_model(family, seed, torch.float32)
    apply_expert_parallel(ep, backend=backend)
    _train_step(ep, ids)
    full = gather_state_dict(ep)
    save_pretrained_ep(ep, save_dir)
    plain = AutoModelForCausalLM.from_pretrained(save_dir, experts_implementation="eager")
    with torch.no_grad():
        ep_logits = ep(ids).logits
        plain_logits = plain(ids).logits
    loaded = plain.state_dict()
    res = dict(same_keys=sorted(loaded) == sorted(full),
               weights=max(_diff(loaded[k], full[k]) for k in full),
               saved_logits=_diff(ep_logits, plain_logits),
               dtype=str(next(plain.parameters()).dtype))

    # (2) An ordinary checkpoint written by transformers itself.
    src = reference_model(family, seed + 7, torch.float32)
    if rank == 0:
        src.save_pretrained(plain_dir)
    dist.barrier()
    ep2 = reference_model(family, seed + 11, torch.float32)
    apply_expert_parallel(ep2, backend=backend)
    params_before = [id(p) for p in ep2.parameters()]
    load_ep_state(ep2, plain_dir, experts_implementation="eager")
    with torch.no_grad():
        res["loaded_logits"] = _diff(ep2(ids).logits, src(ids).logits)
    res["params_kept"] = params_before == [id(p) for p in ep2.parameters()]
    return res


def train_worker(rank, world, recipe, out, resume=False, stop_at=None):
    from token_dispatcher.train import RunOptions, train
    rows = train(recipe, RunOptions(out=out, resume=resume, stop_at=stop_at, progress=False,
                                    quiet=True))
    return [{k: r[k] for k in ("step", "loss", "aux_loss", "grad_norm", "max_expert_load",
                                "load_imbalance_per_layer")} for r in rows]
