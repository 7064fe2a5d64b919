"""Functions every rank of a test pool runs for the FP8 wire tests (``test_fp8_wire.py``)."""
from __future__ import annotations

import torch

from dist_workers import _one_step
from moe_dispatch.backends.alltoall import AllToAllBackend
from moe_dispatch.kernels import fp8
from moe_dispatch.routing import topk_to_dense
from moe_dispatch.testing import Case, local_experts
from token_dispatcher import MoETokenDispatcher

E4M3 = torch.float8_e4m3fn


def _step(disp, case: Case, rank: int, x: torch.Tensor, form: str, dev: torch.device):
    """dispatch -> experts -> combine -> backward of sum(y * gout), on ``dev``; results on
    the CPU."""
    E = case.num_experts
    x = x.to(dev).clone().requires_grad_(True)
    idx, p = case.idxs[rank].to(dev), case.probs[rank].to(dev).clone()
    if form == "dense":
        rm, pd = topk_to_dense(idx, p, E)
        leaf = pd.requires_grad_(True)
        routing = dict(routing_map=rm, probs=leaf)
    else:
        leaf = p.requires_grad_(True)
        routing = dict(topk_idx=idx, topk_probs=leaf)
    out = disp.dispatch(x, **routing)
    y = disp.combine(local_experts(case.W.to(dev, x.dtype), disp.local_expert_offset)(
        out.tokens, out.tokens_per_expert, out.probs), out.handle)
    (y.float() * case.gouts[rank].to(dev).float()).sum().backward()
    res = dict(tokens=out.tokens.detach(), tpe=out.tokens_per_expert, probs=out.probs.detach(),
               y=y.detach(), gx=x.grad if x.grad is not None else torch.zeros_like(x),
               gp=leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
    if out.tokens_fp8 is not None:
        res.update(tokens_fp8=out.tokens_fp8.view(torch.uint8), scales=out.scales)
    res = {k: v.detach().cpu().clone() for k, v in res.items()}
    res.setdefault("tokens_fp8", None)
    res.setdefault("scales", None)
    res["status"] = None if out.status is None else int(out.status.item())
    return res


def run_fp8_vs_plain(rank: int, world: int, case: Case, backend: str, opts: dict):
    """The FP8-wire dispatcher on this rank's tokens, and the plain one on
    dequant(quant(tokens)); the test compares them and the dense reference."""
    kw = dict(backend=backend, pad_multiple=opts.get("pad_multiple"),
              max_rows_per_rank=opts.get("max_rows_per_rank"), topk=opts.get("topk"))
    x = case.xs[rank]
    form, dev = opts.get("form", "topk"), torch.device(opts.get("device", "cpu"))
    got = _step(MoETokenDispatcher(case.num_experts, wire_dtype=E4M3, **kw), case, rank, x,
                form, dev)
    xq = fp8.dequantize(*fp8.quantize_reference(x), x.dtype)
    plain = _step(MoETokenDispatcher(case.num_experts, **kw), case, rank, xq, form, dev)
    return dict(fp8=got, plain=plain)


def run_fp8_budget_vs_exact(rank: int, world: int, case: Case, backend: str, budget: int,
                            pad_multiple=None):
    """Both FP8-wire modes on the same input; the exact step with the expert outputs of rows
    at or past ``budget`` zeroed is what the budget mode must compute."""
    E = case.num_experts
    exact = MoETokenDispatcher(E, backend=backend, pad_multiple=pad_multiple, wire_dtype=E4M3)
    bud = MoETokenDispatcher(E, backend=backend, pad_multiple=pad_multiple, wire_dtype=E4M3,
                             max_rows_per_rank=budget)
    keep = lambda out: torch.arange(out.tokens.shape[0]) < budget  # noqa: E731
    y0, gx0, gp0, o0 = _one_step(exact, case, rank, keep)
    y1, gx1, gp1, o1 = _one_step(bud, case, rank)
    n = int(o1.tokens_per_expert.sum())
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp(min=1e-12))  # noqa: E731
    return dict(status=int(o1.status.item()), exact_rows=int(o0.tokens_per_expert.sum()),
                rows_equal=torch.equal(o1.tokens[:n], o0.tokens[:n]),
                fp8_equal=torch.equal(o1.tokens_fp8[:n].view(torch.uint8),
                                      o0.tokens_fp8[:n].view(torch.uint8))
                and torch.equal(o1.scales[:n], o0.scales[:n]),
                tail_zero=bool((o1.tokens[n:] == 0).all() and (o1.scales[n:] == 0).all()
                               and (o1.tokens_fp8[n:].view(torch.uint8) == 0).all()),
                y_err=rel(y1, y0), gx_err=rel(gx1, gx0), gp_err=rel(gp1, gp0))


def run_fp8_bad_hidden(rank: int, world: int, backend: str, hiddens, budget=None):
    """Dispatch with hidden size ``hiddens[rank]`` on an FP8 wire; what each rank raised."""
    from moe_dispatch.protocol import DispatchInputError
    disp = MoETokenDispatcher(4 * world, backend=backend, wire_dtype=E4M3,
                              max_rows_per_rank=budget)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, hiddens[rank], generator=g)
    idx = torch.randint(0, 4 * world, (6, 2), generator=g)
    try:
        disp.dispatch(x, topk_idx=idx, topk_probs=torch.rand(6, 2, generator=g))
    except DispatchInputError as exc:
        return str(exc)
    return None


def construct_wire(rank: int, world: int, wire_by_rank):
    MoETokenDispatcher(4 * world, wire_dtype=wire_by_rank[rank])
    return "constructed"


class NoFp8Backend(AllToAllBackend):
    """An out-of-tree backend that does not list FP8 among its wire dtypes."""

    name = "nofp8"
    supported_wire_dtypes = ()


def run_fp8_budget_bad_input(rank: int, world: int, backend: str, which: str, bad_rank: int):
    """Budget mode on an FP8 wire: a good first call, then ``bad_rank``'s input is bad; the
    backward runs before the status is read. Returns what ``check_status`` raised."""
    from moe_dispatch.protocol import DispatchInputError
    E, T, H = 4 * world, 6, 128
    disp = MoETokenDispatcher(E, backend=backend, max_rows_per_rank=64, wire_dtype=E4M3)
    g = torch.Generator().manual_seed(rank)
    x, idx, p = torch.randn(T, H, generator=g), torch.randint(0, E, (T, 2), generator=g), \
        torch.rand(T, 2, generator=g)
    assert disp.check_status(disp.dispatch(x, topk_idx=idx, topk_probs=p)) == 0
    if rank == bad_rank:
        if which == "nan_prob":
            p[0, 0] = float("nan")
        else:
            x = torch.randn(T, H + 128, generator=g)
    x, p = x.requires_grad_(True), p.requires_grad_(True)
    out = disp.dispatch(x, topk_idx=idx, topk_probs=p)
    y = disp.combine(out.tokens * out.probs.unsqueeze(1), out.handle)
    y.sum().backward()
    try:
        disp.check_status(out)
    except DispatchInputError as exc:
        return str(exc)
    return None


def train_losses(rank: int, world: int, recipe, out: str):
    """moe-train on this pool; the per-step losses."""
    from token_dispatcher.train import RunOptions, train
    rows = train(recipe, RunOptions(out=out, progress=False, quiet=True))
    return [r["loss"] for r in rows]
