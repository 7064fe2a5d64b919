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


def tiny_config(family: str, hidden: int = 32):
    """family: a FAMILIES key; hidden: hidden_size (the GPU tests use 256: DeepEP V1 refuses
    rows under 512 bytes)."""
    from transformers import AutoConfig
    return AutoConfig.for_model(
        family, vocab_size=V, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **FAMILIES[family])


def reference_model(family: str, seed: int, dtype=torch.float64, hidden: int = 32):
    """The unsharded transformers model (its eager experts loop), the same on every rank,
    on the CPU (drawn there, so every device gets the same weights)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, hidden),
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


def _expert_names(ep) -> set:
    """Names of the expert-parallel weights of ``ep`` (sharded over the EP ranks)."""
    from token_dispatcher.hf import EPExperts
    return {f"{n}.{p}" for n, m in ep.named_modules() if isinstance(m, EPExperts)
            for p in ("gate_up_proj", "down_proj")}


def _run_unsharded(model, data, rank, expert_names):
    """The unsharded model on every rank's batch in turn: (its output on this rank's batch,
    every gradient from that batch alone, each expert weight's gradient summed over all
    batches: what the EP model's expert gradient is, since every rank's tokens reach it)."""
    grads, expert_sum = {}, {}
    for s, ids in enumerate(data):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        if s == rank:
            mine = out
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n in expert_names:
            g = model.get_parameter(n).grad
            expert_sum[n] = g.clone() if n not in expert_sum else expert_sum[n] + g
    return mine, grads, expert_sum


def _wanted_grads(ep, ref_grads, expert_sum, rank, world):
    """name -> the gradient the EP model's parameter must have: the reference's on this
    rank's batch, or for a local expert slice the summed one, sliced."""
    names = _expert_names(ep)
    L = 8 // world  # every tiny config has 8 experts
    return {n: expert_sum[n][rank * L:(rank + 1) * L] if n in names else ref_grads[n]
            for n, _ in ep.named_parameters()}


def parity(rank, world, family, backend, seed):
    """Forward + backward of the EP model on this rank's batch against the unsharded model.

    Dense and router gradients compare with the reference's on this rank's batch; an
    expert's gradient is the sum over every rank's loss (each rank's tokens reach it), so it
    compares with the reference's summed over all batches.
    """
    from token_dispatcher.hf import apply_expert_parallel
    ref = reference_model(family, seed)
    ep = copy.deepcopy(ref)
    n_blocks = apply_expert_parallel(ep, backend=backend)
    data = batches(seed, world)
    expert_names = _expert_names(ep)
    ref_out, ref_grads, expert_sum = _run_unsharded(ref, data, rank, expert_names)
    out = ep(data[rank], labels=data[rank], output_router_logits=True)
    out.loss.backward()
    res = dict(blocks=n_blocks, logits=_diff(out.logits, ref_out.logits),
               loss=_diff(out.loss, ref_out.loss), loss_value=float(out.loss.detach()),
               aux=None if getattr(out, "aux_loss", None) is None
               else _diff(out.aux_loss, ref_out.aux_loss),
               names_equal=sorted(n for n, _ in ep.named_parameters())
               == sorted(n for n, _ in ref.named_parameters()),
               grads={}, grad_norms={}, local_shapes={})
    wanted = _wanted_grads(ep, ref_grads, expert_sum, rank, world)
    for n, p in ep.named_parameters():
        if n in expert_names:
            res["local_shapes"][n] = tuple(p.shape)
        assert p.grad is not None, n
        res["grads"][n] = _diff(p.grad, wanted[n])
        res["grad_norms"][n] = float(wanted[n].norm())
    return res


GPU_HIDDEN = 256  # DeepEP V1 refuses rows under 512 bytes (wrong sums measured at H=64)


def _rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the plain norm of a - b where b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    if not b.numel():
        return 0.0
    den = float(b.norm())
    return float((a - b).norm()) / (den if den > 0 else 1.0)


def _outputs(out, grads) -> dict:
    """The compared quantities of one model run: logits, loss, aux loss, every gradient."""
    q = {"logits": out.logits, "loss": out.loss}
    if getattr(out, "aux_loss", None) is not None:
        q["aux_loss"] = out.aux_loss
    q.update({f"grad:{n}": g for n, g in grads.items()})
    return q


def _device(device: str) -> torch.device:
    """"cuda": this rank's GPU; else the named device."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def dtype_parity(rank, world, family, backend, seed, dtype, device="cuda",
                 hidden=GPU_HIDDEN):
    """The EP model in ``dtype`` on ``device`` against the unsharded transformers model.

    Both are measured against the truth, the unsharded model in float64 on the same device:
    for every quantity (logits, loss, aux loss, each gradient, as in ``parity``) the EP
    model's relative error and the unsharded ``dtype`` model's (the rounding noise of that
    dtype on this model and batch). ``check_dtype_parity`` judges the result.
    Returns dict(blocks, loss_value, names_equal, local_shapes,
    errors={name: (ep_err, plain_err)}, norms={name: the truth's norm}).
    """
    from token_dispatcher.hf import apply_expert_parallel
    dev = _device(device)
    truth = reference_model(family, seed, torch.float64, hidden).to(dev)
    plain = copy.deepcopy(truth).to(dtype)
    ep = copy.deepcopy(plain)
    n_blocks = apply_expert_parallel(ep, backend=backend)
    names = _expert_names(ep)
    data = [ids.to(dev) for ids in batches(seed, world)]
    runs = {}
    for key, model in (("truth", truth), ("plain", plain)):
        out, grads, expert_sum = _run_unsharded(model, data, rank, names)
        runs[key] = _outputs(out, _wanted_grads(ep, grads, expert_sum, rank, world))
    out = ep(data[rank], labels=data[rank], output_router_logits=True)
    out.loss.backward()
    missing = [n for n, p in ep.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    runs["ep"] = _outputs(out, {n: p.grad for n, p in ep.named_parameters()})
    want = runs["truth"]
    return dict(blocks=n_blocks, loss_value=float(out.loss.detach()),
                names_equal=sorted(n for n, _ in ep.named_parameters())
                == sorted(n for n, _ in truth.named_parameters()),
                local_shapes={n: tuple(ep.get_parameter(n).shape) for n in names},
                errors={k: (_rel(runs["ep"][k], w), _rel(runs["plain"][k], w))
                        for k, w in want.items()},
                norms={k: float(w.detach().double().norm()) for k, w in want.items()})


# The EP model's error may be NOISE_RATIO times the same-dtype unsharded model's, plus a
# floor: both round at the same precision in a different order, so their errors are of one
# size; a wrong route, weight slice or lost gradient gives errors of order 1.
NOISE_RATIO = 4.0
NOISE_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def check_dtype_parity(res, family, world, floor) -> list:
    """The failures in one ``dtype_parity`` result (empty: it passed).

    res:    ``dtype_parity``'s result on one rank.
    family: its FAMILIES key.
    world:  the EP size it ran at.
    floor:  the error always allowed (``NOISE_FLOOR`` of the dtype the rows travel in).
    """
    errs = []
    want_blocks = 1 if family == "deepseek_v3" else 2
    if res["blocks"] != want_blocks:
        errs.append(f"{res['blocks']} blocks made expert-parallel, expected {want_blocks}")
    if not res["names_equal"]:
        errs.append("parameter names differ from the transformers model's")
    L = 8 // world
    if not res["local_shapes"] or any(s[0] != L for s in res["local_shapes"].values()):
        errs.append(f"local expert shapes {res['local_shapes']}, expected {L} experts each")
    for name, (ep_err, plain_err) in res["errors"].items():
        tol = NOISE_RATIO * plain_err + floor
        if not ep_err <= tol:
            errs.append(f"{name}: rel. error {ep_err:.3g} > {tol:.3g} (unsharded model in "
                        f"the same dtype: {plain_err:.3g})")
    # Every compared gradient is a real one: routers and experts receive gradient.
    for part in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        norms = [v for k, v in res["norms"].items()
                 if k.startswith("grad:") and k.endswith(part)]
        if not norms or min(norms) <= 0:
            errs.append(f"no nonzero reference gradient ending in {part}")
    return errs


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


def checkpoint_roundtrip(rank, world, family, backend, save_dir, plain_dir, seed,
                         device="cpu"):
    """(1) EP model, one training step, save_pretrained_ep -> plain from_pretrained: the
    same weights (bitwise) and logits. (2) An ordinary checkpoint -> load_ep_state into an
    EP model of other weights: the plain model's logits. ``device``: where the models run
    ("cuda": this rank's GPU; the GPU test uses hidden GPU_HIDDEN there)."""
    from transformers import AutoModelForCausalLM
    from token_dispatcher.hf import (apply_expert_parallel, gather_state_dict, load_ep_state,
                                     save_pretrained_ep)
    dev = _device(device)
    hidden = GPU_HIDDEN if dev.type == "cuda" else 32
    ids = batches(seed, world)[rank].to(dev)

    def model(s):
        return reference_model(family, s, torch.float32, hidden).to(dev)

    ep = model(seed)
    apply_expert_parallel(ep, backend=backend)
    _train_step(ep, ids)
    full = gather_state_dict(ep)
    save_pretrained_ep(ep, save_dir)
    plain = AutoModelForCausalLM.from_pretrained(save_dir,
                                                 experts_implementation="eager").to(dev)
    with torch.no_grad():
        ep_logits = ep(ids).logits
        plain_logits = plain(ids).logits
    loaded = plain.state_dict()
    res = dict(same_keys=sorted(loaded) == sorted(full),
               weights=max(_diff(loaded[k], full[k]) for k in full),
               saved_logits=_diff(ep_logits, plain_logits),
               dtype=str(next(plain.parameters()).dtype))

    # (2) An ordinary checkpoint written by transformers itself.
    src = model(seed + 7)
    if rank == 0:
        src.save_pretrained(plain_dir)
    dist.barrier()
    ep2 = model(seed + 11)
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
