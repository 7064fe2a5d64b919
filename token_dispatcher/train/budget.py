"""The budget mode in training: one status read per step, and the overflow policy.

With ``max_rows_per_rank`` the dispatches of a step never sync the host, so a step cannot
know by itself whether some layer dropped rows over the budget. As Megatron-Core does it,
the forward's statuses (every MoE layer's, every rank's) are read once per step, after the
forward and before the backward: one small all-reduce and one host sync per step, not per
layer. On overflow the recipe's ``overflow`` decides:
  "rerun": the step's forward is thrown away and run again in the exact mode (so no row is
           ever lost), the budget grows to fit what the exact step received (x1.25, at
           least the largest rank's rows), and with ``train.cuda_graph`` the MoE layers (or
           the whole step) are captured again for it before the next step (eager meanwhile);
  "drop":  the step goes on with the rows dropped (counted in the metrics).
Bad input (``STATUS_BAD_INPUT``) raises ``DispatchInputError`` on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from moe_dispatch.protocol import STATUS_OVERFLOW, describe_status, raise_on_status

from ..dispatcher import read_status

GROWTH = 1.25  # budget growth on overflow, over the rows the exact rerun needed


@dataclass
class BudgetState:
    """The run's budget: rows per rank now, and how often it overflowed.

    budget:    B (None: the exact mode, nothing to check).
    overflows: steps whose forward overflowed (rerun or kept with drops).
    capture_pending: the MoE layers are to be captured as CUDA graphs before the next step.
    """

    budget: int = None
    overflows: int = 0
    capture_pending: bool = False


def forward_checked(run, forward: Callable[[], Tuple], state: BudgetState, log,
                    rerun: Optional[Callable[[], Tuple]] = None) -> Tuple:
    """``forward()`` -> (model output, loss terms...), with the budget policy applied.

    run:     the training run (its recipe, dispatcher, model and layout are used).
    forward: runs the model forward on this step's batch (a captured step: forward and
             backward).
    state:   the run's ``BudgetState`` (updated on overflow).
    log:     a function taking one line (rank 0 prints it).
    rerun:   the eager forward the exact rerun of an overflowed step runs (None: ``forward``).
    """
    res = forward()
    if state.budget is None:
        return res
    group = dist.group.WORLD if run.layout.world > 1 else None
    bits = read_status(list(res[0].statuses), group)  # the step's one status read
    raise_on_status(bits)
    if not bits & STATUS_OVERFLOW:
        return res
    state.overflows += 1
    if run.recipe.overflow == "drop":
        log(f"budget overflow ({describe_status(bits)}): step kept with rows dropped "
            f"(overflow: drop)")
        return res
    del res
    _set_budget(run, None)  # rerun this step exactly: no row is lost
    res = (rerun or forward)()
    grown = _grown_budget(run, res[0], state.budget)
    log(f"budget overflow ({describe_status(bits)}): step rerun in the exact mode; "
        f"max_rows_per_rank {state.budget} -> {grown}")
    state.budget = grown
    _set_budget(run, grown)
    state.capture_pending = bool(run.recipe.train.cuda_graph)
    return res


def _set_budget(run, budget) -> None:
    """Switch the dispatcher's mode; CUDA graphs captured for the old one are dropped (the
    layers run eagerly until captured again)."""
    run.dispatcher.set_max_rows_per_rank(budget)
    for layer in run.model.moe_layers():
        layer.drop_cuda_graph()
    run.step_graph = None


def _grown_budget(run, out, budget: int) -> int:
    """The next budget: GROWTH x the most rows one EP rank received in the exact step
    (from the step's routing counts over all ranks), at least GROWTH x the old budget,
    rounded up to the padding multiple and to 64 rows."""
    lay = run.layout
    counts_NE = out.tokens_per_expert_NE.detach().to(torch.float64)
    if lay.world > 1:
        dist.all_reduce(counts_NE)
    # Every EP group sees its replica share of the tokens; take the busiest rank.
    rows = counts_NE.view(counts_NE.shape[0], lay.ep, -1).sum(-1) / max(lay.world // lay.ep, 1)
    L = counts_NE.shape[1] // lay.ep
    pad = run.recipe.pad_multiple or 1
    need = float(rows.max()) + L * (pad - 1)
    step = math.lcm(pad, 64)
    want = max(need, budget) * GROWTH
    return int(math.ceil(want / step) * step)
