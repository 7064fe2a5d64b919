"""The budget mode (``max_rows_per_rank = B``) of the ``hybridep`` backend, sync-free.

HybridEP's own sync-free dispatch does the work: ``num_permuted_tokens = B`` with
``non_blocking=True`` (and ``fuse_permute_dispatch=True``, the only path of the hybrid-ep
head that drops rows past B instead of writing them out of bounds, see ``buffer.py``)
returns exactly B rows, ``tokens_per_expert`` on the GPU and an overflow flag. Every rank
passes the same token count, fixed at the first call: T_cap (``tokens_per_rank``, else
``max_tokens_per_rank``, else the largest T of that call) rounded up to the kernels' token
chunk. What this module adds to reach the budget contract of ``protocol.DispatchResult``:

* ``kept_counts``: rows kept per expert (the library's counts with the tail over B cut,
  so their cumsum are the grouped GEMM's offsets whatever the library version reports);
* the rows past the kept ones are uninitialised memory in HybridEP's output: the backend
  zeroes them, and their gradients, with a device mask (``buffer.zero_unused_rows``);
* ``gather_flags``: HybridEP moves rows only to the ranks that own their experts and has
  no side channel that reaches every rank, so each rank's validation code and "clipped
  tokens over T_cap" bit travel in one tiny all-gather of the device codes (an async
  collective: no host sync), from which every rank sets its status.
"""
from __future__ import annotations

import torch

from ... import comm


def kept_counts(tokens_per_expert_L: torch.Tensor, budget: int) -> torch.Tensor:
    """[L] int64 rows each expert keeps within the first ``budget`` rows (device, no sync).
    tokens_per_expert_L: the library's per-expert rows (padding included)."""
    tpe = tokens_per_expert_L.to(torch.long)
    start = torch.cumsum(tpe, 0) - tpe
    return torch.minimum(tpe, (budget - start).clamp(min=0))


def gather_flags(code: torch.Tensor, clipped: bool, group):
    """(bad, clipped): 0-dim bool device tensors, whether any rank of ``group`` had bad
    input / clipped tokens. code: this rank's 0-dim validation code (device); clipped: this
    rank's host bool. One all-gather of two ints per rank, no host sync."""
    mine = torch.stack([code.reshape(()).to(torch.long),
                        torch.full((), int(clipped), dtype=torch.long, device=code.device)])
    rows_R2 = comm.gather_ints(mine, group).view(-1, 2)
    return (rows_R2[:, 0] != 0).any(), (rows_R2[:, 1] != 0).any()
