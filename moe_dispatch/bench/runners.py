"""Our backends through ``token_dispatcher.MoETokenDispatcher``: check, then time.

Dispatch and combine are timed separately under ``torch.no_grad`` (combine's setup runs
the dispatch whose handle it needs, untimed). The layer timing is dispatch -> experts ->
combine forward and backward with gradients to the hidden states, the router probs and the
expert weights, through ``MoETokenDispatcher.forward``.

``--budget`` adds the budget mode (``MoETokenDispatcher(..., max_rows_per_rank=B)``) of each
backend (``bench_budget``): eager; dispatch and combine each captured once as a CUDA graph
and replayed on static inputs; and token_dispatcher's whole ``MoELayer`` eager and captured
(``capture_layers`` / ``enable_cuda_graph``). Each budget row records B and the OR of the
dispatch statuses seen.
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
    return opts


def make_dispatcher(ctx: Ctx, name: str, fp8: bool = False, extra: Optional[dict] = None,
                    budget: Optional[int] = None):
    from token_dispatcher import MoETokenDispatcher

    # --fp8: rows travel as e4m3 + 1x128 scales (``wire_dtype``), dequantised on arrival.
    return MoETokenDispatcher(num_experts=ctx.shape.experts, ep_group=None, backend=name,
                              backend_options=_options(ctx, name, fp8, extra) or None,
                              max_rows_per_rank=budget,
                              wire_dtype=torch.float8_e4m3fn if fp8 else None)


def budget_rows(ctx: Ctx) -> int:
    """B of the budget rows: ``--budget-rows``, else round_up(1.25 * T * K, 256), the rows a
    rank receives on average (T * K) with 25 % headroom for uneven routing."""
    given = getattr(ctx.args, "budget_rows", None)
    if given:
        return int(given)
    return -(-int(1.25 * ctx.shape.tokens * ctx.shape.topk) // 256) * 256


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
    _release(ctx)
    return rows


def _bench(ctx: Ctx, name: str, status: str, experts, expected, fp8: bool,
           label: Optional[str] = None, options: Optional[dict] = None,
           budget: Optional[int] = None) -> Row:
    """One row. ``budget``: the budget mode with B rows (checked on its kept rows; its
    status after the run is recorded)."""
    args, sets = ctx.args, ctx.sets
    variant = label is not None and budget is None
    label = label or (name + ("-fp8" if fp8 else ""))
    if status != "available":
        return Row(label, "backend", status="skipped", reason=status, fp8=fp8,
                   budget_rows=budget)
    if fp8:
        from ..registry import get_backend_class
        if torch.float8_e4m3fn not in getattr(get_backend_class(name),
                                              "supported_wire_dtypes", ()):
            return Row(label, "backend", status="skipped", fp8=True,
                       reason="this backend has no FP8 wire (wire_dtype) yet")
    disp, err = None, ""
    try:
        disp = make_dispatcher(ctx, name, fp8, options, budget)
    except Exception as exc:
        err = f"construction failed: {type(exc).__name__}: {exc}"
    ok, msg = agree(ctx, disp is not None, err)
    if not ok:
        return Row(label, "backend", status="error", reason=msg, fp8=fp8, budget_rows=budget)
    ctx.log(f"[{label}] running")
    try:
        check = "not run"
        if expected is not None:
            errs: List[str] = []
            try:
                for s, exp in enumerate(expected):
                    out, y = chk.run_backend(disp, sets[s])
                    # A nonzero status first: it explains the differences after it.
                    errs += [f"set {s}: {e}" for e in (
                        _status_errors(out.status) if budget is not None else []) + chk.compare(
                        out.tokens, out.tokens_per_expert, out.probs, y, exp,
                        ctx.shape.torch_dtype, exact_layout=not variant,
                        kept_rows=budget is not None)]
                    del out, y
            except Exception as exc:
                errs.append(f"{type(exc).__name__}: {exc}")
            check, failed = _agreed_check(ctx, label, errs, fp8=fp8, budget_rows=budget)
            if failed is not None:
                return failed

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
        statuses = None
        if budget is not None:
            note = f"B={budget}"
            with torch.no_grad():  # every set once: the statuses the timed calls saw
                statuses = [dispatch(i).status for i in range(len(sets))]
        row = ctx.make_row(label, "backend", check=check, dispatch=t_d, combine=t_c, layer=t_l,
                           fp8=fp8, note=note)
        if budget is not None:
            _record_status(ctx, row, budget, statuses)
        return row
    except Exception as exc:
        ctx.log_exc(f"[{label}] error")
        return Row(label, "backend", status="error", reason=f"{type(exc).__name__}: {exc}",
                   fp8=fp8, budget_rows=budget)


# --------------------------------------------------------------------------- budget mode

def bench_budget(ctx: Ctx, name: str, status: str, experts, expected) -> List[Row]:
    """The ``--budget`` rows of one backend, with B = ``budget_rows(ctx)``:

    ``<name>-budget``        eager, timed and checked like the exact row (kept rows);
    ``<name>-budget-graph``  dispatch and combine each captured once as a CUDA graph and
                             replayed (CUDA only);
    with the layer timing on, token_dispatcher's ``MoELayer`` (router, this backend in the
    budget mode, the shared experts) forward + backward:
    ``<name>-layer-eager``   eager;
    ``<name>-layer-graph``   captured as CUDA graphs (``_capture_layer``; EXPERIMENTAL; CUDA
                             only).
    """
    B = budget_rows(ctx)
    rows = [_bench(ctx, name, status, experts, expected, fp8=False, label=f"{name}-budget",
                   budget=B),
            _bench_graph(ctx, name, status, expected, B)]
    _release(ctx)
    if experts is not None and not ctx.args.no_layer:
        rows += [_bench_layer(ctx, name, status, experts, B, graph=False),
                 _bench_layer(ctx, name, status, experts, B, graph=True)]
        _release(ctx)
    return rows


def _release(ctx: Ctx) -> None:
    """Free what the rows just measured held (graph pools, backend buffers)."""
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _status_errors(status: torch.Tensor) -> List[str]:
    from ..protocol import describe_status
    bits = int(status.reshape(-1)[0])
    return [f"status {bits} ({describe_status(bits)})"] if bits else []


def _record_status(ctx: Ctx, row: Row, budget: int, statuses: List[torch.Tensor]) -> None:
    """Collective: put B and the OR of ``statuses`` (this rank's, then over the ranks) on
    ``row``; a nonzero status is logged loudly (the table and the exit status say it too)."""
    from ..protocol import describe_status
    mine = 0
    if statuses:
        folded = statuses[0].reshape(-1)[:1].to(torch.int32).clone()
        for st in statuses[1:]:
            folded.bitwise_or_(st.reshape(-1)[:1].to(torch.int32))
        mine = int(folded.item())  # one host sync, after the timing
    per_rank = ctx.gather(mine)
    bits = 0
    for b in per_rank:
        bits |= b
    row.budget_rows = budget
    row.budget_status = bits
    row.per_rank["budget_status"] = per_rank
    if bits:
        row.budget_status_text = describe_status(bits)
        bad = [r for r, b in enumerate(per_rank) if b]
        ctx.log(f"!!! [{row.name}] BUDGET STATUS {bits} ({row.budget_status_text}) on rank(s) "
                f"{bad} with B={budget}: its numbers time a dispatch that lost rows; raise "
                "--budget-rows")


def _capture(fn):
    """``fn`` captured once as a CUDA graph, after three calls on a side stream (so lazy
    setup and the allocator's first allocations stay out of the graph); the graph to replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _bench_graph(ctx: Ctx, name: str, status: str, expected, budget: int) -> Row:
    """``<name>-budget-graph``: the budget-mode dispatch and combine each captured once as a
    CUDA graph and replayed. The graphs read static buffers: every iteration's input set is
    copied into them in the untimed setup, so the input still rotates; combine's static
    input is filled from the dispatch graph's output the same way."""
    args, sets = ctx.args, ctx.sets
    label = f"{name}-budget-graph"
    if status != "available":
        return Row(label, "backend", status="skipped", reason=status, budget_rows=budget)
    if ctx.device.type != "cuda":
        return Row(label, "backend", status="skipped", budget_rows=budget,
                   reason="CUDA graphs need a CUDA device (this run is on the CPU)")
    disp, bad_row = _budget_dispatcher(ctx, name, label, budget)
    if bad_row is not None:
        return bad_row
    ctx.log(f"[{label}] capturing")
    try:
        st0 = sets[0]
        x_TH, idx_TK, probs_TK = st0.x_TH.clone(), st0.idx_TK.clone(), st0.probs_TK.clone()
        box = {}

        def dispatch():
            box["out"] = disp.dispatch(x_TH, topk_idx=idx_TK, topk_probs=probs_TK)

        with torch.no_grad():
            dispatch()  # the first call agrees sizes across ranks (a host sync): not capturable
            ey_NH = torch.zeros_like(box["out"].tokens)   # combine's static input

            def combine():
                box["y"] = disp.combine(ey_NH, box["out"].handle)

            combine()
            g_disp = _capture(dispatch)
            out = box["out"]          # the dispatch graph's static outputs
            g_comb = _capture(combine)
            y_TH = box["y"]

        def load(i):
            st = sets[i % len(sets)]
            x_TH.copy_(st.x_TH)
            idx_TK.copy_(st.idx_TK)
            probs_TK.copy_(st.probs_TK)

        check = "not run"
        if expected is not None:
            errs: List[str] = []
            try:
                with torch.no_grad():
                    for s, exp in enumerate(expected):
                        load(s)
                        g_disp.replay()
                        ey_NH.copy_(chk.expert_fn(out.tokens, out.probs))
                        g_comb.replay()
                        errs += [f"set {s}: {e}" for e in _status_errors(out.status)
                                 + chk.compare(out.tokens, out.tokens_per_expert, out.probs,
                                               y_TH, exp, ctx.shape.torch_dtype,
                                               kept_rows=True)]
            except Exception as exc:
                errs.append(f"{type(exc).__name__}: {exc}")
            check, failed = _agreed_check(ctx, label, errs, budget_rows=budget)
            if failed is not None:
                return failed

        def combine_setup(i):
            load(i)
            g_disp.replay()
            ey_NH.copy_(out.tokens)

        t_d = ctx.clock.run(lambda i, _: g_disp.replay(), args.iters, args.warmup, setup=load)
        t_c = ctx.clock.run(lambda i, _: g_comb.replay(), args.iters, args.warmup,
                            setup=combine_setup)
        statuses = []
        for i in range(len(sets)):
            load(i)
            g_disp.replay()
            statuses.append(out.status.clone())
        row = ctx.make_row(label, "backend", check=check, dispatch=t_d, combine=t_c,
                           note=f"B={budget}, CUDA graphs")
        _record_status(ctx, row, budget, statuses)
        return row
    except Exception as exc:
        ctx.log_exc(f"[{label}] error")
        return Row(label, "backend", status="error", reason=f"{type(exc).__name__}: {exc}",
                   budget_rows=budget)


LAYER_GRAPH_NOTE = ("MoELayer's CUDA graphs (capture_layers) are EXPERIMENTAL: a time, not "
                    "a check; their gradients are compared with eager by "
                    "benchmarks/scripts/graph_grad_check.py")


def _moe_layer(ctx: Ctx, disp, experts):
    """token_dispatcher's ``MoELayer`` around ``disp`` with the bench's shared experts module
    (the one every layer row uses) and a router seeded alike on every rank. It is built on
    the meta device and then given those: its own experts would be initialised on the CPU,
    seconds per rank at the deepep preset."""
    from token_dispatcher.layer import MoELayer
    from token_dispatcher.router import TopKRouter

    sh = ctx.shape
    with torch.device("meta"):
        layer = MoELayer(sh.hidden, ctx.args.ffn, sh.experts, sh.topk, dispatcher=disp)
    layer.experts = experts
    router = TopKRouter(sh.hidden, sh.experts, sh.topk)
    router.reset_parameters(torch.Generator().manual_seed(ctx.args.seed + 1))
    layer.router = router.to(ctx.device)
    return layer


def _capture_layer(layer, x_TH: torch.Tensor) -> None:
    """Capture ``layer``'s forward + backward as CUDA graphs and turn them on, through
    whichever API token_dispatcher has: ``capture_layers`` (captures up front), else
    ``enable_cuda_graph`` alone (captures at the next forward)."""
    from token_dispatcher import layer as layer_mod

    if hasattr(layer_mod, "capture_layers"):
        layer_mod.capture_layers([layer], [x_TH.detach().clone().requires_grad_()])
    layer.enable_cuda_graph(True)


def _bench_layer(ctx: Ctx, name: str, status: str, experts, budget: int, graph: bool) -> Row:
    """``<name>-layer-eager`` / ``<name>-layer-graph``: ``MoELayer`` forward + backward
    (gradient = the input, as in the other layer rows) in the budget mode, eager or captured
    (``_capture_layer``, before timing; the input set is copied into the graph's static
    input inside each call, as a user's call would). Not checked."""
    args, sets = ctx.args, ctx.sets
    label = f"{name}-layer-{'graph' if graph else 'eager'}"
    if status != "available":
        return Row(label, "backend", status="skipped", reason=status, budget_rows=budget)
    if graph and ctx.device.type != "cuda":
        return Row(label, "backend", status="skipped", budget_rows=budget,
                   reason="MoELayer's CUDA graphs need a CUDA device (this run is on the CPU)")
    disp, bad_row = _budget_dispatcher(ctx, name, label, budget)
    if bad_row is not None:
        return bad_row
    ctx.log(f"[{label}] running" + (f" ({LAYER_GRAPH_NOTE})" if graph else ""))
    try:
        layer = _moe_layer(ctx, disp, experts)
        if graph:
            _capture_layer(layer, sets[0].x_TH)
        seen = torch.zeros(1, dtype=torch.int32, device=ctx.device)
        box = {}

        def setup(i):
            if "status" in box:  # the previous step's status, before a replay overwrites it
                seen.bitwise_or_(box.pop("status"))
            # The captured backward adds into the .grad tensors it was captured with:
            # zero them in place there (set to None, the next backward would raise).
            layer.zero_grad(set_to_none=not graph)
            return sets[i % len(sets)].x_TH.detach().requires_grad_()

        def step(i, x):
            m = layer(x)
            m.output.backward(sets[i % len(sets)].x_TH)
            box["status"] = m.status

        step(0, setup(0))  # the first call's size agreement (or a lazy capture): untimed
        if graph and layer.__dict__.get("_graphed") is None:
            # A silently eager "graph" row would pass for a graph's time.
            raise RuntimeError("MoELayer holds no captured graph after its first call: it ran "
                               "eagerly (has token_dispatcher.layer's capture API changed?)")
        t_l = ctx.clock.run(step, args.layer_iters, args.warmup, setup=setup)
        setup(0)
        layer.zero_grad(set_to_none=True)
        note = f"B={budget}, MoELayer" + (", CUDA graphs, EXPERIMENTAL" if graph else "")
        row = ctx.make_row(label, "backend", layer=t_l, note=note)
        _record_status(ctx, row, budget, [seen])
        return row
    except Exception as exc:
        ctx.log_exc(f"[{label}] error")
        return Row(label, "backend", status="error", reason=f"{type(exc).__name__}: {exc}",
                   budget_rows=budget)


def _budget_dispatcher(ctx, name: str, label: str, budget: int):
    """(budget-mode dispatcher, None), or (None, an error Row) when construction failed on
    some rank (every rank agrees, so none goes on alone)."""
    disp, err = None, ""
    try:
        disp = make_dispatcher(ctx, name, budget=budget)
    except Exception as exc:
        err = f"construction failed: {type(exc).__name__}: {exc}"
    ok, msg = agree(ctx, disp is not None, err)
    if not ok:
        return None, Row(label, "backend", status="error", reason=msg, budget_rows=budget)
    return disp, None


def _agreed_check(ctx, label: str, errs: List[str], **row_kw):
    """("passed", None), or ("FAILED", the row saying why) when any rank found errors
    (every rank agrees, so all return the same)."""
    ok, msg = agree(ctx, not errs, "; ".join(errs))
    if ok:
        return "passed", None
    ctx.log(f"[{label}] FAILED check: {msg}")
    return "FAILED", Row(label, "backend", status="FAILED", check="FAILED", reason=msg,
                         **row_kw)
