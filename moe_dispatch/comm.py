"""Differentiable collectives over an EP group (NCCL on GPU, gloo on CPU).

Each is the adjoint of another: all-to-all's backward is the reverse all-to-all,
all-gather's is reduce-scatter and vice versa. With a group of one rank they are
identities and launch nothing, so a single process needs no process group at all.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def ints_on(values, device: torch.device) -> torch.Tensor:
    """Small host int64 list -> tensor on ``device`` without a stream sync.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the
    stream; a pinned buffer with a non-blocking copy does not (the caching host allocator
    keeps the buffer alive until the copy has run)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def group_device(group) -> torch.device:
    """Device that collectives of ``group`` take tensors on (CUDA for NCCL, else CPU)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def all_to_all_raw(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group
                   ) -> torch.Tensor:
    """Non-differentiable uneven all-to-all of rows. ``in_splits[r]`` rows go to rank r."""
    if group_size(group) == 1:
        return x
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return all_to_all_raw(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all_raw(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Uneven all-to-all of rows with autograd (backward = the reverse all-to-all).
    A group of one returns ``x`` itself: the identity, whose gradient is the identity too,
    without an autograd node (each costs the host ~10 µs on the dispatch path)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def all_gather_raw(x: torch.Tensor, group) -> torch.Tensor:
    """Equal-size all-gather along dim 0: [n, ...] -> [R * n, ...] in rank order."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    if _is_gloo(group):
        dist.all_gather(list(out.chunk(world)), x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
    return out


def reduce_scatter_raw(x: torch.Tensor, group) -> torch.Tensor:
    """Equal-size reduce-scatter (sum) along dim 0: [R * n, ...] -> [n, ...]."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    n = x.shape[0] // world
    if _is_gloo(group):
        # gloo has no reduce-scatter: all-to-all the chunks, then sum what arrived.
        parts = all_to_all_raw(x, [n] * world, [n] * world, group)
        return parts.view(world, n, *x.shape[1:]).sum(0)
    out = x.new_empty((n,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_raw(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_raw(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_raw(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_raw(grad, ctx.group), None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable equal-size all-gather along dim 0 (a group of one: ``x`` itself)."""
    if group_size(group) == 1:
        return x
    return _AllGather.apply(x, group)


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable equal-size reduce-scatter (sum) along dim 0 (a group of one: ``x``)."""
    if group_size(group) == 1:
        return x
    return _ReduceScatter.apply(x, group)


def exchange_ints(msg_RC: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of a small int64 [R, C] table (row r goes to rank r); returns [R, C]
    where row r came from rank r. No host sync here."""
    world = group_size(group)
    if world == 1:
        return msg_RC
    dev = group_device(group)
    src = msg_RC.to(dev).contiguous()
    out = torch.empty_like(src)
    dist.all_to_all_single(out, src, group=group)
    return out


def gather_ints(msg_C: torch.Tensor, group) -> torch.Tensor:
    """All-gather of a small int64 [C] vector; returns [R, C]. No host sync here."""
    dev = group_device(group) if dist.is_initialized() else msg_C.device
    return all_gather_raw(msg_C.to(dev).reshape(1, -1), group)


def check_same_across_ranks(values: List[int], what: str, group) -> None:
    """Raise on every rank if ``values`` differ between ranks (one collective)."""
    if group_size(group) == 1:
        return
    t = torch.tensor(values, dtype=torch.int64)
    table = gather_ints(t, group).cpu()
    if not bool((table == table[0]).all()):
        rows = {r: table[r].tolist() for r in range(table.shape[0])}
        raise ValueError(f"{what} differ across EP ranks: {rows}")


def optional_int(x: Optional[float], scale: int = 1) -> int:
    return -1 if x is None else int(round(x * scale))


class CollectiveBackendBase:
    """Shared setup of a backend over an EP group (group, R ranks, this rank, L local experts).
    ``availability`` here only needs torch.distributed; library backends override it."""

    def __init__(self, config):
        self.cfg = config
        self.group = config.group
        self.R = group_size(self.group)
        self.rank = group_rank(self.group)
        self.L = config.num_experts // self.R

    @classmethod
    def availability(cls) -> Optional[str]:
        if not dist.is_available():
            return "this torch build has no torch.distributed"
        return None
