"""Megatron-Core drop-in dispatcher (``token_dispatcher.megatron``) against Megatron-Core itself.

Needs megatron-core (``pip install 'moe-dispatch[megatron]'``); skipped without it.

On a CPU-only torch, Megatron-Core stops in three places, all CUDA-only plumbing rather
than dispatch logic; ``_megatron_on_cpu`` bridges exactly these (and restores them):
  1. ``MoEAlltoAllTokenDispatcher.__init__`` creates ``torch.cuda.Stream()`` for its
     device-to-host copies, and ``_maybe_dtoh_and_synchronize`` runs them on it: replaced
     by a host version that turns the split sizes into numpy arrays as the CUDA path does;
  2. ``TopKRouter.gating`` and the all-to-all output buffer use
     ``torch.cuda.current_device()``: answered with "cpu";
  3. megatron-core 0.16.x without Transformer Engine leaves ``moe_utils.te_general_gemm``
     undefined (NameError in the router): defined as None, as later releases do.
Everything else (routing, permutation, all-to-all over gloo, MoELayer, SequentialMLP) is
Megatron's own code, so its ``MoEAlltoAllTokenDispatcher`` is the reference here.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(moe_ffn_hidden_size|full scope|cuda_graph).*:UserWarning")
pytest.importorskip("megatron.core", reason="megatron-core is not installed "
                    "(pip install 'moe-dispatch[megatron]')")

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe import token_dispatcher as mtd  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from token_dispatcher.megatron import (MoEDispatchTokenDispatcher,  # noqa: E402
                                       backend_options_from_config, build_with_moe_dispatch,
                                       resolve_backend, use_moe_dispatch)

H = 16
E = 8


def _config(world=1, **kw):
    base = dict(num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
                moe_router_topk=2, expert_model_parallel_size=world,
                moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
                moe_router_dtype="fp32", add_bias_linear=False)
    padding = kw.pop("moe_router_padding_for_quantization", False)
    base.update(kw)
    cfg = TransformerConfig(**base)
    # Megatron's config only accepts router padding together with fp8, and fp8 only with
    # Transformer Engine; the dispatchers read both at run time (alignment 16).
    cfg.moe_router_padding_for_quantization = padding
    if padding:
        cfg.fp8 = "hybrid"
    return cfg


def _route(T, topk, generator, capacity_factor=None, pad_to_capacity=False,
           probs_dtype=torch.float32):
    """Router-like output: dense probs [T, E] (0 where not routed) and routing map [T, E]."""
    scores_TE = torch.randn(T, E, generator=generator).softmax(-1)
    top_TK, idx_TK = scores_TE.topk(topk, dim=1)
    probs_TE = torch.zeros(T, E).scatter(1, idx_TK, top_TK)
    map_TE = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx_TK, True)
    if capacity_factor is not None:
        probs_TE, map_TE = moe_utils.apply_router_token_dropping(
            probs_TE, map_TE, topk, capacity_factor, "probs", pad_to_capacity)
    return probs_TE.to(probs_dtype), map_TE


@contextlib.contextmanager
def _megatron_on_cpu():
    """The three CPU bridges described in the module docstring; restored on exit."""
    saved = (mtd.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream,
             mtd.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize,
             torch.cuda.current_device, getattr(moe_utils, "te_general_gemm", "missing"))

    def host_dtoh(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    mtd.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()
    mtd.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = host_dtoh
    torch.cuda.current_device = lambda: "cpu"
    if saved[3] == "missing":
        moe_utils.te_general_gemm = None
    try:
        yield
    finally:
        mtd.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = saved[0]
        mtd.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = saved[1]
        torch.cuda.current_device = saved[2]
        if saved[3] == "missing":
            del moe_utils.te_general_gemm


@contextlib.contextmanager
def _model_parallel(world, **kw):
    """Megatron's parallel state over the pool's gloo WORLD (destroyed on exit)."""
    from torch.distributed import distributed_c10d as c10d
    before = set(c10d._world.pg_map)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=kw.pop("ep", world), **kw)
    try:
        with _megatron_on_cpu():
            yield moe_utils.get_default_pg_collection()
    finally:
        ps.destroy_model_parallel()
        # Megatron only drops its references; free the groups it made in this shared pool.
        for pg in set(c10d._world.pg_map) - before:
            torch.distributed.destroy_process_group(pg)


def _run_hooks(disp, x, map_TE, probs_TE, weight_LHH, grad_out):
    """All six hooks with a per-expert linear map scaled by the row probs, then backward.
    Returns everything a caller may compare, detached."""
    x = x.clone().requires_grad_(True)
    probs = probs_TE.clone().requires_grad_(True)
    # A copy of the map: Megatron's router padding pads the caller's map in place.
    h, p = disp.dispatch_preprocess(x, map_TE.clone(), probs)
    h, p = disp.token_dispatch(h, p)
    tokens_NH, tpe_L, probs_N = disp.dispatch_postprocess(h, p)
    expert_N = torch.repeat_interleave(torch.arange(len(tpe_L)), tpe_L.cpu())
    y_NH = torch.bmm(tokens_NH.unsqueeze(1), weight_LHH[expert_N]).squeeze(1)
    y_NH = (y_NH * probs_N.unsqueeze(-1)).to(tokens_NH.dtype)
    out = disp.combine_postprocess(disp.token_combine(disp.combine_preprocess(y_NH)))
    (out.float() * grad_out).sum().backward()
    return dict(tokens=tokens_NH.detach(), tpe=tpe_L.detach().cpu(), probs=probs_N.detach(),
                out=out.detach(), grad_x=x.grad, grad_probs=probs.grad)


# --------------------------------------------------------------- single process, no dist
def test_construct_from_transformer_config():
    cfg = _config(moe_flex_dispatcher_backend="deepep")
    d = MoEDispatchTokenDispatcher(E, list(range(E)), cfg)
    assert d.backend == "alltoall" and d.ep_size == 1 and d.tp_size == 1
    assert d.num_local_experts == E and d.local_expert_indices == list(range(E))
    assert d.cudagraph_attrs == ["routing_map"] and d.valid_cudagraph_attrs is None
    assert d.get_expert_zero_copy_buffers() == (None, None)
    assert d._comm_manager.get_number_of_tokens_per_expert() is None
    assert d.pad_multiple is None and not d.drop_and_pad
    assert isinstance(d, mtd.MoETokenDispatcher)
    with pytest.raises(ValueError, match="local_expert_indices"):
        MoEDispatchTokenDispatcher(E, list(range(1, E + 1)), cfg)
    with pytest.raises(ValueError, match="num_local_experts"):
        MoEDispatchTokenDispatcher(E // 2, list(range(E // 2)), cfg)


def test_backend_resolution():
    cfg = _config()
    assert resolve_backend(cfg) == "alltoall"
    assert resolve_backend(cfg, "allgather") == "allgather"
    cfg.moe_token_dispatcher_type = "flex"
    cfg.moe_flex_dispatcher_backend = "hybridep"
    assert resolve_backend(cfg) == "hybridep"
    cfg.moe_flex_dispatcher_backend = "deepep"
    assert resolve_backend(cfg) == "deepep"
    cfg.moe_dispatch_backend = "allgather"  # the config field wins over Megatron's choice
    assert resolve_backend(cfg) == "allgather"
    assert MoEDispatchTokenDispatcher(E, list(range(E)), cfg).backend == "allgather"
    cfg.moe_dispatch_backend = None
    cfg.moe_flex_dispatcher_backend = "ncclep"
    with pytest.raises(ValueError, match="ncclep"):
        resolve_backend(cfg)


def test_backend_options_from_config():
    cfg = _config()
    cfg.moe_flex_dispatcher_num_sms = 24
    assert backend_options_from_config(cfg, "deepep") == {"num_sms": 24}
    assert backend_options_from_config(cfg, "hybridep") == {"num_sms_dispatch_api": 24,
                                                            "num_sms_combine_api": 24}
    assert backend_options_from_config(cfg, "alltoall") == {}
    cfg.moe_flex_dispatcher_num_sms = None
    cfg.moe_deepep_num_sms = 20  # the pre-0.17 field
    assert backend_options_from_config(cfg, "deepep") == {"num_sms": 20}


@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.float64])
def test_hook_shapes_dtypes_against_reference(probs_dtype):
    """[S, B, H] bf16 in; rows grouped by expert in token order; probs in the router's
    dtype; combine = per-token sum; grads to hidden and probs. Reference: plain loops."""
    g = torch.Generator().manual_seed(1)
    S, B = 6, 3
    cfg = _config(moe_router_dtype="fp64" if probs_dtype == torch.float64 else "fp32")
    d = MoEDispatchTokenDispatcher(E, list(range(E)), cfg)
    x = torch.randn(S, B, H, generator=g).to(torch.bfloat16)
    probs_TE, map_TE = _route(S * B, 2, g, probs_dtype=probs_dtype)
    w = torch.randn(E, H, H, generator=g).to(torch.bfloat16)
    gout = torch.randn(S, B, H, generator=g)

    h, p = d.dispatch_preprocess(x, map_TE, probs_TE)
    assert h.shape == (S * B, H) and p.shape == (S * B, E)
    r = _run_hooks(d, x, map_TE, probs_TE, w, gout)
    assert r["tokens"].dtype == torch.bfloat16 and r["tokens"].shape == (2 * S * B, H)
    assert r["tpe"].dtype == torch.int64 and r["tpe"].shape == (E,)
    assert r["probs"].dtype == probs_dtype and r["probs"].shape == (2 * S * B,)
    assert r["out"].shape == (S, B, H) and r["out"].dtype == torch.bfloat16

    x_TH = x.reshape(-1, H)
    tok, pr, out = [], [], torch.zeros(S * B, H)
    for e in range(E):
        t = map_TE[:, e].nonzero().squeeze(1)
        tok.append(x_TH[t])
        pr.append(probs_TE[t, e])
        out[t] += ((x_TH[t] @ w[e]).float() * probs_TE[t, e].unsqueeze(1).float()
                   ).bfloat16().float()
    assert torch.equal(r["tpe"], map_TE.sum(0))
    assert torch.equal(r["tokens"], torch.cat(tok))
    assert torch.equal(r["probs"], torch.cat(pr))
    torch.testing.assert_close(r["out"].float(), out.view(S, B, H), atol=2e-2, rtol=2e-2)
    # d out / d probs[t, e] = <x_t W_e, g_t> where routed, 0 elsewhere.
    xw_TEH = torch.einsum("th,ehk->tek", x_TH.float(), w.float())
    want = (xw_TEH * gout.view(-1, 1, H)).sum(-1) * map_TE
    torch.testing.assert_close(r["grad_probs"].float(), want, atol=5e-2, rtol=2e-2)
    assert r["grad_x"].shape == x.shape


def test_pad_to_capacity_single_rank():
    """moe_pad_expert_input_to_capacity: each expert gets exactly `capacity` rows, even from
    a map that the router did not pad; combine equals the unpadded result."""
    g = torch.Generator().manual_seed(2)
    T, cf = 24, 0.75
    d = MoEDispatchTokenDispatcher(E, list(range(E)), _config(
        moe_expert_capacity_factor=cf, moe_pad_expert_input_to_capacity=True))
    plain = MoEDispatchTokenDispatcher(E, list(range(E)), _config())
    x = torch.randn(T, H, generator=g)
    probs_TE, map_TE = _route(T, 2, g, capacity_factor=cf)  # dropped, not padded
    w = torch.randn(E, H, H, generator=g)
    gout = torch.randn(T, H, generator=g)
    padded = _run_hooks(d, x, map_TE, probs_TE, w, gout)
    cap = moe_utils.get_capacity(T * 2, E, cf)
    assert d.capacity == cap and torch.equal(padded["tpe"], torch.full((E,), cap))
    ref = _run_hooks(plain, x, map_TE, probs_TE, w, gout)
    assert (ref["tpe"] <= cap).all() and ref["tpe"].sum() < padded["tpe"].sum()
    for k in ("out", "grad_x"):
        torch.testing.assert_close(padded[k], ref[k], atol=1e-5, rtol=1e-5)
    # Padding slots carry prob 0 but are real (token, expert) pairs, as in Megatron: their
    # probs get a gradient; the routed ones must match the unpadded run.
    torch.testing.assert_close(padded["grad_probs"] * map_TE, ref["grad_probs"],
                               atol=1e-5, rtol=1e-5)


def test_router_padding_single_rank():
    g = torch.Generator().manual_seed(3)
    T = 20
    d = MoEDispatchTokenDispatcher(E, list(range(E)), _config(
        moe_router_padding_for_quantization=True))
    plain = MoEDispatchTokenDispatcher(E, list(range(E)), _config())
    assert d.pad_multiple == 16
    x = torch.randn(T, H, generator=g)
    probs_TE, map_TE = _route(T, 2, g)
    w = torch.randn(E, H, H, generator=g)
    gout = torch.randn(T, H, generator=g)
    padded, ref = _run_hooks(d, x, map_TE, probs_TE, w, gout), \
        _run_hooks(plain, x, map_TE, probs_TE, w, gout)
    assert (padded["tpe"] % 16 == 0).all() and int(padded["tpe"].sum()) == len(padded["tokens"])
    assert (padded["tpe"] >= ref["tpe"]).all()
    for k in ("out", "grad_x", "grad_probs"):
        torch.testing.assert_close(padded[k], ref[k], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- gloo ranks vs Megatron
SCENARIOS = {
    # name: (tokens on each rank, capacity_factor, pad_to_capacity, router padding)
    "dropless": ((12, 7), None, False, False),
    "capacity": ((16, 16), 0.5, False, False),
    "drop_and_pad": ((16, 16), 0.75, True, False),
    "router_padding": ((20, 9), None, False, True),
    "zero_tokens": ((10, 0), None, False, False),
}


def rank_hook_parity(rank, world, scenario, seed):
    tokens, cf, pad, router_pad = SCENARIOS[scenario]
    T = tokens[rank % len(tokens)] if world > 1 else tokens[0]
    cfg = _config(world, moe_expert_capacity_factor=cf, moe_pad_expert_input_to_capacity=pad,
                  moe_router_padding_for_quantization=router_pad)
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = torch.randn(T, 1, H, generator=g)
    probs_TE, map_TE = _route(T, 2, g, capacity_factor=cf, pad_to_capacity=pad)
    L = E // world
    w = torch.randn(L, H, H, generator=torch.Generator().manual_seed(seed * 10 + 100 + rank))
    gout = torch.randn(T, 1, H, generator=g)
    with _model_parallel(world) as pg:
        idx = list(range(rank * L, (rank + 1) * L))
        ref = _run_hooks(mtd.MoEAlltoAllTokenDispatcher(L, idx, cfg, pg), x, map_TE, probs_TE,
                         w, gout)
        ours = _run_hooks(MoEDispatchTokenDispatcher(L, idx, cfg, pg, backend="alltoall"),
                          x, map_TE, probs_TE, w, gout)
    ref["map"] = map_TE
    return ref, ours


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_hooks_match_megatron_alltoall(gloo_pool, world, scenario):
    if world == 1 and scenario == "zero_tokens":
        pytest.skip("needs two ranks")
    seed = torch.randint(0, 10 ** 6, ()).item()
    results = gloo_pool(world).run(__name__.split(".")[-1], "rank_hook_parity", scenario, seed)
    for rank, (ref, ours) in enumerate(results):
        where = f"{scenario}, world {world}, rank {rank}, seed {seed}"
        if scenario == "router_padding":
            # Megatron pads with real tokens before the exchange, we with zero rows after
            # it: different rows, same multiple-of-16 counts and the same results.
            assert (ours["tpe"] % 16 == 0).all(), where
            assert int(ours["tpe"].sum()) == len(ours["tokens"]), where
            # Megatron's padding pairs are real (token, expert) pairs with prob 0 whose
            # probs get a gradient; the router drops it (its probs are a scatter into
            # zeros), so only the routed pairs' gradients matter.
            ref["grad_probs"] = ref["grad_probs"] * ref["map"]
        else:
            assert torch.equal(ours["tpe"], ref["tpe"]), where
            assert torch.equal(ours["tokens"], ref["tokens"]), where
            assert torch.equal(ours["probs"], ref["probs"]), where
        for k in ("out", "grad_x", "grad_probs"):
            torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-5, msg=lambda m:
                                       f"{k} ({where}): {m}")


def rank_expert_tp_refused(rank, world):
    with _model_parallel(world, ep=1, expert_tensor_parallel_size=world) as pg:
        try:
            MoEDispatchTokenDispatcher(E, list(range(E)), _config(1), pg)
        except NotImplementedError as exc:
            return str(exc)
    return None


def test_expert_tensor_parallel_refused(gloo_pool):
    for msg in gloo_pool(2).run(__name__.split(".")[-1], "rank_expert_tp_refused"):
        assert msg is not None and "expert tensor parallelism" in msg


def rank_moe_layer_parity(rank, world, seed):
    """Full MoELayer forward + backward: Megatron's alltoall vs ours via both installers."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer
    if hasattr(gpt_layer_specs, "get_gpt_layer_local_submodules"):  # megatron-core >= 0.17
        from megatron.core.transformer.spec_utils import get_submodules
        submodules = get_submodules(
            gpt_layer_specs.get_gpt_layer_local_submodules(num_experts=E).mlp)
    else:
        submodules = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E).submodules.mlp \
            .submodules
    cfg = _config(world, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01)
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = torch.randn(6, 2, H, generator=g)
    gout = torch.randn(6, 2, H, generator=g)

    def fwd_bwd(layer):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out, _ = layer(xx)
        (out * gout).sum().backward()
        return out.detach(), xx.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    with _model_parallel(world):
        torch.manual_seed(seed)
        layer = MoELayer(cfg, submodules)
        assert type(layer.token_dispatcher) is mtd.MoEAlltoAllTokenDispatcher
        ref = fwd_bwd(layer)
        with build_with_moe_dispatch(backend="alltoall"):
            built = MoELayer(cfg, submodules)
        assert type(built.token_dispatcher) is MoEDispatchTokenDispatcher
        assert type(MoELayer(cfg, submodules).token_dispatcher) is \
            mtd.MoEAlltoAllTokenDispatcher  # the patch is gone after the block
        built.load_state_dict(layer.state_dict())
        via_context = fwd_bwd(built)
        assert use_moe_dispatch([torch.nn.Sequential(layer)]) == 1  # model chunks
        assert isinstance(layer.token_dispatcher, MoEDispatchTokenDispatcher)
        via_swap = fwd_bwd(layer)
    return ref, via_context, via_swap


def test_moe_layer_matches_megatron(gloo_pool):
    seed = torch.randint(0, 10 ** 6, ()).item()
    results = gloo_pool(2).run(__name__.split(".")[-1], "rank_moe_layer_parity", seed)
    for rank, (ref, *ours_all) in enumerate(results):
        for name, ours in zip(("build_with_moe_dispatch", "use_moe_dispatch"), ours_all):
            where = f"{name}, rank {rank}, seed {seed}"
            torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"output ({where}): {m}")
            torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"input grad ({where}): {m}")
            assert ours[2].keys() == ref[2].keys()
            assert any("router" in n for n in ref[2]) and any("experts" in n for n in ref[2])
            for n in ref[2]:
                torch.testing.assert_close(ours[2][n], ref[2][n], atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"grad of {n} ({where}): {m}")


def test_use_moe_dispatch_without_moe_layers():
    assert use_moe_dispatch([torch.nn.Linear(2, 2), torch.nn.Sequential()]) == 0
