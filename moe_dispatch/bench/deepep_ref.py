"""Reference rows: DeepEP's V1 ``deep_ep.Buffer`` called directly, with no wrapper.

The calls are the ones DeepEP's own ``tests/test_intranode.py`` makes:
``get_dispatch_layout`` -> ``dispatch(x, layout..., topk_idx, topk_weights)`` -> ``combine``.
Three rows come out of it:

* ``deepep-direct``: layout + dispatch (non-cached, with top-k; includes DeepEP's host
  sync on the received counts) | combine (no weights).
* ``deepep-direct+permute``: the same plus the project's permute into expert-grouped rows
  (``moe_dispatch.permute``) after dispatch and the unpermute before combine — the work our
  ``deepep`` backend does, so its ratio to this row is the cost of the wrapper.
* ``deepep-direct-cached``: dispatch reusing the handle (no layout, no host sync): the figure
  DeepEP's tuning loop prints (anchors.md: 525.6 µs / 403 GB/s on 4xH200).
With ``--fp8`` a ``deepep-direct-fp8`` row times the cached FP8 dispatch (e4m3 + per-128
scales, DeepEP's ``per_token_cast_to_fp8``), bytes counted with DeepEP's FP8 factor.
"""
from __future__ import annotations

from typing import List

import torch

from .common import Ctx, Row, agree

NAMES = ("deepep-direct", "deepep-direct+permute", "deepep-direct-cached")


def _skip_all(reason: str, fp8: bool) -> List[Row]:
    names = NAMES + (("deepep-direct-fp8",) if fp8 else ())
    return [Row(n, "reference", status="skipped", reason=reason) for n in names]


def per_token_cast_to_fp8(x_TH: torch.Tensor):
    """DeepEP's test helper: e4m3 values and one fp32 scale per 128 channels."""
    T, H = x_TH.shape
    x_view = x_TH.view(T, -1, 128)
    amax = x_view.abs().float().amax(dim=2).view(T, -1).clamp(1e-4)
    q = (x_view * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(T, H)
    return q, (amax / 448.0).view(T, -1)


def run(ctx: Ctx) -> List[Row]:
    args, shape = ctx.args, ctx.shape
    reason = None
    if ctx.device.type != "cuda":
        reason = "needs CUDA GPUs (DeepEP has no CPU path)"
    elif shape.dtype != "bf16":
        reason = "DeepEP dispatches BF16 (or FP8) tokens only; run with --dtype bf16"
    else:
        try:
            import deep_ep  # noqa: F401  (only whether it imports)
        except Exception as exc:  # missing or broken build
            reason = f"deep_ep not importable ({type(exc).__name__}: {exc}); build DeepEP v1.2.1"
    ok, msg = agree(ctx, reason is None, reason or "")
    if not ok:
        return _skip_all(msg, args.fp8)
    try:
        return _run(ctx)
    except Exception as exc:
        ctx.log_exc("deepep-direct failed")
        return [Row(n, "reference", status="error", reason=f"{type(exc).__name__}: {exc}")
                for n in NAMES]


def _run(ctx: Ctx) -> List[Row]:
    import deep_ep

    from ..permute import group_plan, permute, unpermute

    args, shape, sets, group = ctx.args, ctx.shape, ctx.sets, ctx.group
    R, E, H = ctx.world, shape.experts, shape.hidden
    L = E // R
    deep_ep.Buffer.set_num_sms(args.deepep_sms)
    dcfg = deep_ep.Buffer.get_dispatch_config(R)
    ccfg = deep_ep.Buffer.get_combine_config(R)
    hidden_bytes = H * max(torch.finfo(shape.torch_dtype).bits // 8, 2)
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, R) for c in (dcfg, ccfg))
    rdma = 0
    if ctx.num_nodes > 1:
        rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, R) for c in (dcfg, ccfg))
    buf = deep_ep.Buffer(group, nvl, rdma, explicitly_destroy=True)
    rows: List[Row] = []
    try:
        def layout_dispatch(s):
            st = sets[s % len(sets)]
            ntr, ntrr, nte, itir, _ = buf.get_dispatch_layout(st.idx_TK, E)
            return buf.dispatch(st.x_TH, num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=ntrr,
                                is_token_in_rank=itir, num_tokens_per_expert=nte,
                                topk_idx=st.idx_TK, topk_weights=st.probs_TK, config=dcfg)

        # --check: rows received must equal our count, and combine(dispatch(x)) = x * ranks.
        check = "not run"
        if args.check:
            errs = []
            for s, st in enumerate(sets[:2]):
                recv_x, _, _, counts, handle, _ = layout_dispatch(s)
                if recv_x.shape[0] != st.rows_recv:
                    errs.append(f"set {s}: received {recv_x.shape[0]} rows, counted {st.rows_recv}")
                y, _, _ = buf.combine(recv_x, handle, config=ccfg)
                nranks_T = _ranks_per_token(st.idx_TK, L, R)
                ref = st.x_TH.float() * nranks_T.unsqueeze(1)
                err = _rel(y.float(), ref)
                if err > 1e-2:
                    errs.append(f"set {s}: combine(dispatch(x)) rel. error {err:.2e}")
            ok, msg = agree(ctx, not errs, "; ".join(errs))
            check = "passed" if ok else "FAILED"
            if not ok:
                return [Row(n, "reference", status="FAILED", check="FAILED", reason=msg)
                        for n in NAMES]

        def permute_after(out):
            recv_x, recv_idx, recv_w, counts, handle, _ = out
            plan = group_plan(recv_idx, L, tokens_per_expert=counts)
            tokens, probs = permute(recv_x, recv_w, plan)
            return tokens, probs, plan, handle

        with torch.no_grad():
            t_disp = ctx.clock.run(lambda i, _: layout_dispatch(i), args.iters, args.warmup)
            t_comb = ctx.clock.run(lambda i, o: buf.combine(o[0], o[4], config=ccfg),
                                   args.iters, args.warmup, setup=layout_dispatch)
            t_disp_p = ctx.clock.run(lambda i, _: permute_after(layout_dispatch(i)),
                                     args.iters, args.warmup)
            t_comb_p = ctx.clock.run(
                lambda i, o: buf.combine(unpermute(o[0], o[2]), o[3], config=ccfg),
                args.iters, args.warmup, setup=lambda i: permute_after(layout_dispatch(i)))
            # Cached mode: the handle of the same set's earlier dispatch.
            handles = [layout_dispatch(s)[4] for s in range(len(sets))]
            t_cached = ctx.clock.run(
                lambda i, _: buf.dispatch(sets[i % len(sets)].x_TH, handle=handles[i % len(sets)],
                                          config=dcfg), args.iters, args.warmup)
            rows.append(ctx.make_row("deepep-direct", "reference", check=check,
                                     dispatch=t_disp, combine=t_comb))
            rows.append(ctx.make_row("deepep-direct+permute", "reference", check=check,
                                     dispatch=t_disp_p, combine=t_comb_p))
            rows.append(ctx.make_row("deepep-direct-cached", "reference", check=check,
                                     dispatch=t_cached))
            if args.fp8:
                if not deep_ep.Buffer.is_sm90_compiled() or H % 128:
                    rows.append(Row("deepep-direct-fp8", "reference", status="skipped",
                                    reason="DeepEP built without SM90 features (no FP8) or hidden % 128 != 0"))
                else:
                    xq = [per_token_cast_to_fp8(st.x_TH) for st in sets]
                    # DeepEP wants the scales column-major (its test does ``.T.contiguous().T``).
                    xq = [(q, sc.T.contiguous().T) for q, sc in xq]
                    t_fp8 = ctx.clock.run(
                        lambda i, _: buf.dispatch(xq[i % len(sets)], handle=handles[i % len(sets)],
                                                  config=dcfg), args.iters, args.warmup)
                    rows.append(ctx.make_row("deepep-direct-fp8", "reference", check=check,
                                             dispatch=t_fp8, fp8=True))
    finally:
        torch.cuda.synchronize()
        ctx.barrier()
        buf.destroy()
    return rows


def _ranks_per_token(idx_TK: torch.Tensor, L: int, R: int) -> torch.Tensor:
    valid = idx_TK >= 0
    dest = torch.where(valid, idx_TK // L, R)
    hit = torch.zeros(idx_TK.shape[0], R + 1, dtype=torch.bool, device=idx_TK.device)
    hit.scatter_(1, dest, True)
    return hit[:, :R].sum(1).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
