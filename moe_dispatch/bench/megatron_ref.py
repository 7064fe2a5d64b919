"""Reference rows: Megatron-Core's own alltoall dispatcher and MoE layer.

* ``megatron-a2a``: ``MoEAlltoAllTokenDispatcher`` driven through its six hooks exactly as
  ``MoELayer`` calls them: dispatch = ``dispatch_preprocess`` + ``token_dispatch`` +
  ``dispatch_postprocess``; combine = ``combine_preprocess`` + ``token_combine`` +
  ``combine_postprocess``. Same routing as every other row (dense ``[T, E]`` map and probs
  made from the top-k form outside the timed region, as Megatron's router hands them over).
  Its layer column runs the bench's shared experts module between the hooks, so it is
  comparable with our backends' layer column.
* ``megatron-moelayer``: Megatron's whole ``MoELayer`` (its router, its SequentialMLP
  experts, the alltoall dispatcher) forward+backward on the same hidden states; its own
  router picks the experts, so only the layer column is reported.

Megatron-Core needs its parallel state: ``initialize_model_parallel(tp=1, pp=1, ep=R)`` is
called here once per launch and torn down at the end (``teardown``). Anything that fails becomes a ``skipped: reason`` or
``error`` row; the bench goes on.
"""
from __future__ import annotations

from typing import List

import torch

from .check import compare, expert_fn
from .common import Ctx, Row, agree

NAMES = ("megatron-a2a", "megatron-moelayer")


def _rows(status: str, reason: str) -> List[Row]:
    return [Row(n, "reference", status=status, reason=reason) for n in NAMES]


def run(ctx: Ctx, experts, expected=None) -> List[Row]:
    """experts: the shared experts module (None: no layer timing); expected: per-set ``check.Expected`` of this rank
    (from the alltoall backend or the dense reference) when --check is on."""
    reason = None
    if ctx.device.type != "cuda":
        reason = "needs CUDA GPUs (MoEAlltoAllTokenDispatcher creates a CUDA stream)"
    else:
        try:
            import megatron.core  # noqa: F401
            from megatron.core.transformer.moe.token_dispatcher import (  # noqa: F401
                MoEAlltoAllTokenDispatcher)
        except Exception as exc:
            reason = (f"megatron-core not importable ({type(exc).__name__}: {exc}); "
                      "pip install megatron-core")
    ok, msg = agree(ctx, reason is None, reason or "")
    if not ok:
        return _rows("skipped", msg)
    try:
        _init_parallel_state(ctx)
    except Exception as exc:
        ok, msg = agree(ctx, False, f"parallel state init failed: {type(exc).__name__}: {exc}")
        return _rows("skipped", msg)
    agree(ctx, True)
    try:
        rows = [_dispatcher_row(ctx, experts, expected)]
        if not ctx.args.no_layer:
            rows.append(_layer_row(ctx))
        return rows
    finally:
        torch.cuda.synchronize()
        ctx.barrier()


def teardown() -> None:
    """Drop Megatron's parallel state (its process groups) if this module set it up; the
    state is kept across the shapes of one launch to spare re-creating NCCL groups."""
    import sys
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None:  # never imported here: nothing to tear down (and no 5 s import)
        return
    try:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except Exception:
        pass


def _init_parallel_state(ctx: Ctx):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     expert_model_parallel_size=ctx.world)
    model_parallel_cuda_manual_seed(ctx.args.seed + 1)
    return ps


def _config(ctx: Ctx):
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape, dtype = ctx.shape, ctx.shape.torch_dtype
    return TransformerConfig(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=1,
        ffn_hidden_size=ctx.args.ffn, moe_ffn_hidden_size=ctx.args.ffn,
        num_moe_experts=shape.experts, moe_router_topk=shape.topk,
        moe_token_dispatcher_type="alltoall", expert_model_parallel_size=ctx.world,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False, moe_permute_fusion=False, add_bias_linear=False,
        gated_linear_unit=False, use_cpu_initialization=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype)


def _pg_collection():
    try:
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
        return get_default_pg_collection()
    except ImportError:
        from megatron.core.process_groups_config import ProcessGroupCollection
        return ProcessGroupCollection.use_mpu_process_groups()


def _make_dispatcher(ctx: Ctx, config):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    L = ctx.shape.experts // ctx.world
    local = list(range(ctx.rank * L, (ctx.rank + 1) * L))
    try:
        return MoEAlltoAllTokenDispatcher(L, local, config=config, pg_collection=_pg_collection())
    except TypeError:  # releases before the pg_collection argument
        return MoEAlltoAllTokenDispatcher(L, local, config=config)


def _dispatcher_row(ctx: Ctx, experts, expected) -> Row:
    from ..routing import topk_to_dense

    args, shape, sets = ctx.args, ctx.shape, ctx.sets
    T, H, E = shape.tokens, shape.hidden, shape.experts
    try:
        d = _make_dispatcher(ctx, _config(ctx))
        err = ""
    except Exception as exc:
        d, err = None, f"construction failed: {type(exc).__name__}: {exc}"
    ok, msg = agree(ctx, d is not None, err)
    if not ok:
        return Row("megatron-a2a", "reference", status="skipped", reason=msg)
    dense = [topk_to_dense(st.idx_TK, st.probs_TK, E) for st in sets]

    def dispatch(i, x=None, probs=None):
        st = sets[i % len(sets)]
        rm, pd = dense[i % len(sets)]
        h, p = d.dispatch_preprocess((st.x_TH if x is None else x).view(T, 1, H), rm,
                                     pd if probs is None else probs)
        h, p = d.token_dispatch(h, p)
        return d.dispatch_postprocess(h, p)

    def combine(y_NH):
        h = d.combine_preprocess(y_NH)
        h = d.token_combine(h)
        return d.combine_postprocess(h)

    try:
        check = "not run"
        if expected is not None:
            errs = []
            with torch.no_grad():
                for s, exp in enumerate(expected):
                    tokens, tpe, probs = dispatch(s)
                    y = combine(expert_fn(tokens, probs)).view(T, H)
                    errs += [f"set {s}: {e}" for e in compare(tokens, tpe, probs, y, exp,
                                                              shape.torch_dtype)]
            ok, msg = agree(ctx, not errs, "; ".join(errs))
            check = "passed" if ok else "FAILED"
            if not ok:
                return Row("megatron-a2a", "reference", status="FAILED", check=check, reason=msg)
        with torch.no_grad():
            t_d = ctx.clock.run(lambda i, _: dispatch(i), args.iters, args.warmup)
            t_c = ctx.clock.run(lambda i, o: combine(o[0]), args.iters, args.warmup,
                                setup=lambda i: dispatch(i))

        def layer_setup(i):
            st = sets[i % len(sets)]
            experts.zero_grad(set_to_none=True)
            return (st.x_TH.detach().requires_grad_(),
                    dense[i % len(sets)][1].detach().requires_grad_())

        def layer(i, xp):
            x, p = xp
            tokens, tpe, probs = dispatch(i, x, p)
            y = combine(experts(tokens, tpe, probs))
            y.backward(sets[i % len(sets)].x_TH.view_as(y))

        t_l = None if experts is None else ctx.clock.run(layer, args.layer_iters, args.warmup,
                                                          setup=layer_setup)
        return ctx.make_row("megatron-a2a", "reference", check=check, dispatch=t_d, combine=t_c,
                            layer=t_l, note="six hooks, moe_permute_fusion=False")
    except Exception as exc:
        ctx.log_exc("megatron-a2a failed")
        return Row("megatron-a2a", "reference", status="error", reason=f"{type(exc).__name__}: {exc}")


def _layer_row(ctx: Ctx) -> Row:
    args, shape, sets = ctx.args, ctx.shape, ctx.sets
    T, H = shape.tokens, shape.hidden
    layer, err = None, ""
    try:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.moe.moe_layer import MoELayer

        # Local (no Transformer Engine) modules. Older releases return a ModuleSpec, newer
        # ones a partial of MoELayer with its submodules bound.
        spec = get_moe_module_spec(use_te=False, num_experts=shape.experts,
                                   moe_grouped_gemm=False)
        if hasattr(spec, "submodules"):
            layer = MoELayer(_config(ctx), spec.submodules)
        else:
            layer = spec(config=_config(ctx))
        layer = layer.to(ctx.device)
    except Exception as exc:
        err = f"MoELayer construction failed: {type(exc).__name__}: {exc}"
    ok, msg = agree(ctx, layer is not None, err)
    if not ok:
        return Row("megatron-moelayer", "reference", status="skipped", reason=msg)
    try:
        def setup(i):
            layer.zero_grad(set_to_none=True)
            return sets[i % len(sets)].x_TH.view(T, 1, H).detach().requires_grad_()

        def step(i, x):
            out = layer(x)
            y = out[0] if isinstance(out, tuple) else out
            y.backward(x.detach())

        t_l = ctx.clock.run(step, args.layer_iters, args.warmup, setup=setup)
        return ctx.make_row("megatron-moelayer", "reference", layer=t_l,
                            note="Megatron's router + SequentialMLP; its own routing")
    except Exception as exc:
        ctx.log_exc("megatron-moelayer failed")
        return Row("megatron-moelayer", "reference", status="error",
                   reason=f"{type(exc).__name__}: {exc}")
