"""Benchmark workloads: shape presets, routing generation and the byte count.

Shapes: T tokens per rank, H hidden, K top-k, E global experts, R ranks, L = E // R local
experts, S rotating input sets.

Bytes are counted the way DeepEP's ``tests/test_intranode.py`` counts them: the rows a rank
*receives* in dispatch (= the rows it sends back in combine), local rows included, times
``hidden × bytes per element``. A token that goes to three experts on one rank is one row
(it crosses the link once and is expanded to per-expert rows on arrival), so the count is
the number of distinct (token, destination rank) pairs. Every backend and reference is
timed on the same routing, so they all get the same byte count.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Dict, List, Optional, Sequence

import torch

# Presets named in the docs. ``deepep`` is DeepEP's own benchmark shape (tests/test_intranode.py),
# ``small`` the low-latency batch, ``mid`` a mid-size model.
SHAPES: Dict[str, Dict[str, int]] = {
    "deepep": dict(tokens=4096, hidden=7168, topk=8, experts=256),
    "small": dict(tokens=128, hidden=7168, topk=8, experts=256),
    "mid": dict(tokens=4096, hidden=2048, topk=6, experts=64),
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape.

    tokens:  T, tokens per rank.
    hidden:  H, hidden size.
    topk:    K, experts per token.
    experts: E, global experts; must be a multiple of the EP size.
    routing: "uniform" (top-k of |randn|+1 scores, as DeepEP draws them) or "zipf"
             (expert popularity ~ 1 / rank^zipf_s over a random expert order shared by all ranks).
    dtype:   "bf16" or "fp32".
    zipf_s:  the Zipf exponent (only for routing="zipf").
    """

    tokens: int
    hidden: int
    topk: int
    experts: int
    routing: str = "uniform"
    dtype: str = "bf16"
    zipf_s: float = 1.2

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        return asdict(self)


def make_routing(shape: Shape, rank: int, seed: int, set_index: int = 0):
    """Routing of one rank for one input set, generated on the CPU (identical on every machine).

    Returns ``(idx_TK, probs_TK)``: ``idx_TK`` [T, K] int64 distinct global expert ids,
    ``probs_TK`` [T, K] float32, positive, each row summing to 1 (the scores of the chosen
    experts, normalised). Scores are |randn| + 1 like DeepEP's test.
    """
    T, E, K = shape.tokens, shape.experts, shape.topk
    if not 0 < K <= E:
        raise ValueError(f"topk must be in [1, experts]; got topk={K}, experts={E}")
    g = torch.Generator().manual_seed(_mix(seed, rank, set_index))
    scores_TE = torch.randn(T, E, generator=g).abs() + 1
    if shape.routing == "uniform":
        idx_TK = torch.topk(scores_TE, K, dim=1, sorted=False).indices
    elif shape.routing == "zipf":
        # The popular experts are spread over the ranks by a permutation that all ranks share
        # (seeded without the rank): skew between experts, not a rank that holds every hot one.
        perm_E = torch.randperm(E, generator=torch.Generator().manual_seed(_mix(seed, 0, 0) + 1))
        weight_E = torch.empty(E)
        weight_E[perm_E] = 1.0 / torch.arange(1, E + 1, dtype=torch.float64).pow(shape.zipf_s).float()
        idx_TK = torch.multinomial(weight_E.expand(T, E), K, replacement=False, generator=g)
    else:
        raise ValueError(f"routing must be 'uniform' or 'zipf', got {shape.routing!r}")
    s_TK = scores_TE.gather(1, idx_TK)
    probs_TK = (s_TK / s_TK.sum(1, keepdim=True)).float()
    return idx_TK.long(), probs_TK


def _mix(seed: int, rank: int, set_index: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + set_index * 101) % (2 ** 63)


# ---------------------------------------------------------------------------- byte count

def rows_sent_per_rank(idx_TK: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[R] int64: how many rows this rank sends to each rank in dispatch.

    A row is a distinct (token, destination rank) pair: a token is sent once to every rank
    that owns at least one of its (unmasked) experts. ``idx_TK`` is [T, K] int, -1 = masked.
    """
    if num_experts % ep_size:
        raise ValueError(f"experts ({num_experts}) must be a multiple of the EP size ({ep_size})")
    L = num_experts // ep_size
    T = idx_TK.shape[0]
    valid_TK = idx_TK >= 0
    # Masked slots land in a spare column R that is dropped.
    dest_TK = torch.where(valid_TK, idx_TK.long() // L, ep_size)
    hit_TR = torch.zeros(T, ep_size + 1, dtype=torch.bool, device=idx_TK.device)
    hit_TR.scatter_(1, dest_TK, True)
    return hit_TR[:, :ep_size].sum(0).long()


def rows_received(sent_RR: torch.Tensor) -> torch.Tensor:
    """[R] rows each rank receives, from ``sent_RR[src, dst]`` (the all-gathered
    ``rows_sent_per_rank`` of every rank). Local rows (src == dst) are included."""
    return sent_RR.sum(0)


def bytes_per_row(hidden: int, elem_bytes: int, fp8: bool = False) -> float:
    """Bytes one dispatched row carries, as DeepEP counts them.

    BF16/FP32: ``hidden * elem_bytes``. FP8 (e4m3 + one fp32 scale per 128 channels):
    ``hidden + hidden / 128 * 4`` — DeepEP's ``(1 + 4/128) / 2`` factor on the BF16 bytes.
    """
    if fp8:
        return hidden * 1.0 + hidden / 128.0 * 4.0
    return float(hidden * elem_bytes)


def gbps(rows: float, hidden: int, elem_bytes: int, seconds: float, fp8: bool = False) -> float:
    """GB/s (1e9 bytes per second) for ``rows`` rows moved in ``seconds``."""
    if seconds <= 0:
        return float("nan")
    return rows * bytes_per_row(hidden, elem_bytes, fp8) / seconds / 1e9


@dataclass
class InputSet:
    """One rotating input set of this rank (all on the bench device).

    x_TH:      [T, H] hidden states in the bench dtype.
    idx_TK:    [T, K] int64 expert ids.
    probs_TK:  [T, K] float32 routing probs.
    rows_recv: rows this rank receives in dispatch for this set (distinct (token, rank) pairs).
    rows_sent: rows this rank sends in dispatch for this set.
    """

    x_TH: torch.Tensor
    idx_TK: torch.Tensor
    probs_TK: torch.Tensor
    rows_recv: int
    rows_sent: int


def num_sets_for(shape: Shape, device: torch.device, requested: Optional[int]) -> int:
    """Rotating input sets: enough that their tokens together exceed ~2x a large L2 (the
    H100/H200 L2 is 50 MB), so an iteration never finds its input in cache; 2..8."""
    if requested:
        return max(1, int(requested))
    if device.type != "cuda":
        return 2
    per_set = shape.tokens * shape.hidden * torch.finfo(shape.torch_dtype).bits // 8
    return int(min(8, max(2, -(-(128 << 20) // max(per_set, 1)))))


def build_sets(shape: Shape, rank: int, ep_size: int, seed: int, num_sets: int,
               device: torch.device, group=None) -> List[InputSet]:
    """Make ``num_sets`` input sets for this rank and count their rows across the group
    (one small all-gather per set when distributed)."""
    import torch.distributed as dist

    sets = []
    for s in range(num_sets):
        idx_TK, probs_TK = make_routing(shape, rank, seed, s)
        g = torch.Generator().manual_seed(_mix(seed, rank, s) + 7)
        x_TH = torch.randn(shape.tokens, shape.hidden, generator=g).to(shape.torch_dtype)
        sent_R = rows_sent_per_rank(idx_TK, shape.experts, ep_size)
        if ep_size > 1 and dist.is_initialized():
            cdev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
            table = [torch.zeros(ep_size, dtype=torch.long, device=cdev) for _ in range(ep_size)]
            dist.all_gather(table, sent_R.to(cdev), group=group)
            sent_RR = torch.stack(table).cpu()
        else:
            sent_RR = sent_R.view(1, -1)
        sets.append(InputSet(x_TH=x_TH.to(device), idx_TK=idx_TK.to(device),
                             probs_TK=probs_TK.to(device),
                             rows_recv=int(rows_received(sent_RR)[rank]),
                             rows_sent=int(sent_R.sum())))
    return sets


def routing_stats(sets: Sequence[InputSet], shape: Shape) -> dict:
    """Per-rank summary of the routing (averaged over the sets)."""
    n = len(sets)
    rows_recv = sum(s.rows_recv for s in sets) / n
    rows_sent = sum(s.rows_sent for s in sets) / n
    return dict(rows_recv=rows_recv, rows_sent=rows_sent,
                ranks_per_token=rows_sent / max(shape.tokens, 1),
                expert_rows=shape.tokens * shape.topk)
