"""Our backends through ``token_dispatcher.MoETokenDispatcher``: check, then time.

Dispatch and combine are timed separately under ``torch.no_grad`` (combine's setup runs
the dispatch whose handle it needs, untimed). The layer timing is dispatch -> experts ->
combine forward and backward with gradients to the hidden states, the router probs and the
expert weights, through ``MoETokenDispatcher.forward``.
"""
from __future__ import annotations

import gc
from typing import List, Optional, Tuple

import torch

from . import check as chk
from .common import Ctx, Row, agree

CHECK_SETS = 2


def _options(ctx: Ctx, name: str, fp8: bool = False, extra: Optional[dict] = None) -> dict:
    opts = {}
    if name == "deepep":
        opts["num_sms"] = ctx.args.deepep_sms   # the same SM count as the DeepEP-direct rows
    opts.update(getattr(ctx.args, "backend_opts", {}).get(name, {}))
    if extra:
        opts.update(extra)
    if fp8:
        opts["fp8"] = True
    return opts


def make_dispatcher(ctx: Ctx, name: str, fp8: bool = False, extra: Optional[dict] = None):
    from token_dispatcher import MoETokenDispatcher

    return MoETokenDispatcher(num_experts=ctx.shape.experts, ep_group=None, backend=name,
                              backend_options=_options(ctx, name, fp8, extra) or None)


def check_references(ctx: Ctx) -> Tuple[list, Optional[list]]:
    """(dense expectation per check set, alltoall's outputs per check set or None when
    alltoall could not run or disagrees with the dense reference)."""
    sets = ctx.sets[:CHECK_SETS]
    dense = [chk.dense_expected(ctx, st) for st in sets]
    errs: List[str] = []
    outs = []
    try:
        disp = make_dispatcher(ctx, "alltoall")
        for s, (st, exp) in enumerate(zip(sets, dense)):
            out, y = chk.run_backend(disp, st)
            errs += [f"set {s}: {e}" for e in chk.compare(out.tokens, out.tokens_per_expert,
                                                          out.probs, y, exp, ctx.shape.torch_dtype)]
            outs.append(chk.expected_from_output(out, y))
    except Exception as exc:
        errs.append(f"{type(exc).__name__}: {exc}")
    ok, msg = agree(ctx, not errs, "; ".join(errs))
    if not ok:
        ctx.log(f"check: alltoall disagrees with the dense reference ({msg}); other backends "
                "are compared with the dense reference instead")
        return dense, None
    return dense, outs


def bench_backend(ctx: Ctx, name: str, status: str, experts, expected, *,
                  label: Optional[str] = None, options: Optional[dict] = None) -> List[Row]:
    """Rows for one backend (plus its FP8 row with --fp8). ``label``/``options``: a variant
    row (the backend with extra backend_options)."""
    rows = [_bench(ctx, name, status, experts, expected, fp8=False, label=label,
                   options=options)]
    if ctx.args.fp8 and label is None and status == "available":
        rows.append(_bench(ctx, name, status, None, None, fp8=True))
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows


def _bench(ctx: Ctx, name: str, status: str, experts, expected, fp8: bool,
           label: Optional[str] = None, options: Optional[dict] = None) -> Row:
    args, sets = ctx.args, ctx.sets
    variant = label is not None
    label = label or (name + ("-fp8" if fp8 else ""))
    if status != "available":
        return Row(label, "backend", status="skipped", reason=status, fp8=fp8)
    if fp8:
        from ..registry import get_backend_class
        if not getattr(get_backend_class(name), "supports_fp8", False):
            return Row(label, "backend", status="skipped", fp8=True,
                       reason="this backend has no FP8 dispatch")
    disp, err = None, ""
    try:
        disp = make_dispatcher(ctx, name, fp8, options)
    except Exception as exc:
        err = f"construction failed: {type(exc).__name__}: {exc}"
    ok, msg = agree(ctx, disp is not None, err)
    if not ok:
        return Row(label, "backend", status="error", reason=msg, fp8=fp8)
    ctx.log(f"[{label}] running")
    try:
        check = "not run"
        if expected is not None:
            errs: List[str] = []
            try:
                for s, exp in enumerate(expected):
                    out, y = chk.run_backend(disp, sets[s])
                    errs += [f"set {s}: {e}" for e in chk.compare(
                        out.tokens, out.tokens_per_expert, out.probs, y, exp,
                        ctx.shape.torch_dtype, exact_layout=not variant)]
                    del out, y
            except Exception as exc:
                errs.append(f"{type(exc).__name__}: {exc}")
            ok, msg = agree(ctx, not errs, "; ".join(errs))
            check = "passed" if ok else "FAILED"
            if not ok:
                ctx.log(f"[{label}] FAILED check: {msg}")
                return Row(label, "backend", status="FAILED", check=check, reason=msg, fp8=fp8)

        def dispatch(i, _=None):
            st = sets[i % len(sets)]
            return disp.dispatch(st.x_TH, topk_idx=st.idx_TK, topk_probs=st.probs_TK)

        with torch.no_grad():
            t_d = ctx.clock.run(dispatch, args.iters, args.warmup)
            t_c = None if fp8 else ctx.clock.run(
                lambda i, out: disp.combine(out.tokens, out.handle), args.iters, args.warmup,
                setup=dispatch)
        t_l = None
        if experts is not None and not args.no_layer:
            def setup(i):
                st = sets[i % len(sets)]
                experts.zero_grad(set_to_none=True)
                return st.x_TH.detach().requires_grad_(), st.probs_TK.detach().requires_grad_()

            def step(i, xp):
                x, p = xp
                st = sets[i % len(sets)]
                y = disp(x, experts, topk_idx=st.idx_TK, topk_probs=p)
                y.backward(st.x_TH)

            t_l = ctx.clock.run(step, args.layer_iters, args.warmup, setup=setup)
        note = ",".join(f"{k}={v}" for k, v in (options or {}).items()) if variant else ""
        return ctx.make_row(label, "backend", check=check, dispatch=t_d, combine=t_c, layer=t_l,
                            fp8=fp8, note=note)
    except Exception as exc:
        ctx.log_exc(f"[{label}] error")
        return Row(label, "backend", status="error", reason=f"{type(exc).__name__}: {exc}",
                   fp8=fp8)
