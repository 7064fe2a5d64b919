"""One-launch value check of the router outputs (``moe_dispatch.routing.canonicalize``).

The torch code in ``routing`` is the reference and the CPU path; this kernel computes the
same flag in one launch instead of ~10 small torch ops (each costs host launch time on
the dispatch path, which is host-bound):

* a slot is bad when its expert id is outside [-1, E), or its prob (as float32) is NaN,
  +-inf or negative (-0.0 is fine); masked (-1) slots are checked like any other;
* ``idx_out`` gets the ids as int64 with bad ids replaced by -1, so no out-of-range id
  ever reaches a backend (DeepEP's layout kernel, a scatter) while the error travels to
  every rank in ``PendingCheck.device_bad``;
* the flag is a 0-dim int64 0/1. Many programs each OR their verdict into a per-stream
  scratch cell and the last one to finish (a ticket counter) writes the flag and resets
  the scratch, so the flag needs no zero-filled output (that would be a second launch).

Imported only when a kernel is actually launched (triton is optional).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch
from ._triton import _launch_lock

BLOCK = 2048  # slots per program
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # kernels may read constexpr globals only


@triton.jit(do_not_specialize=["n", "num_experts", "num_programs"])
def _check_kernel(idx_ptr, probs_ptr, idx_out, flag_out, scratch_ptr, n, num_experts,
                  num_programs, HAS_IDX: tl.constexpr, ONE_PROGRAM: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    p = tl.load(probs_ptr + offs, mask=m, other=0.0).to(tl.float32)
    # NaN fails both comparisons; +inf fails the second; -0.0 passes.
    bad = ~((p >= 0.0) & (p <= _FLT_MAX))
    if HAS_IDX:
        ids = tl.load(idx_ptr + offs, mask=m, other=-1).to(tl.int64)
        bad_id = (ids < -1) | (ids >= num_experts)
        tl.store(idx_out + offs, tl.where(bad_id, -1, ids), mask=m)
        bad = bad | bad_id
    local = tl.max((bad & m).to(tl.int32), axis=0)
    if ONE_PROGRAM:
        tl.store(flag_out, local.to(tl.int64))
    else:
        # scratch = [verdicts OR-ed, programs done]; both back to 0 when the last is done.
        tl.atomic_or(scratch_ptr, local)
        done = tl.atomic_add(scratch_ptr + 1, 1)  # acq_rel: every earlier OR is visible
        if done == num_programs - 1:
            total = tl.atomic_xchg(scratch_ptr, 0)
            tl.store(flag_out, (total != 0).to(tl.int64))
            tl.atomic_xchg(scratch_ptr + 1, 0)


_scratch: dict = {}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _scratch_for(device: torch.device) -> torch.Tensor:
    """[2] int32 zeros the kernel leaves zeroed: one per (device, stream), since kernels on
    one stream never overlap. Under CUDA-graph capture a fresh one (its zero-fill is
    captured with the kernel), so a graph never shares a cell with eager launches."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(2, dtype=torch.int32, device=device)
        stream = _raw_stream(device.index) if _raw_stream is not None else \
            torch.cuda.current_stream(device).cuda_stream
        key = (device.index, stream)
    else:  # the interpreter (tests): launches are serialized
        key = (device.type, None)
    s = _scratch.get(key)
    if s is None:
        s = _scratch[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return s


def check_values(idx_TK: Optional[torch.Tensor], probs: torch.Tensor, num_experts: int,
                 block: int = BLOCK) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(idx_out, bad) in one launch.

    idx_TK:  [T, K] any integer dtype, or None to check ``probs`` only (dense form).
    probs:   same numel as ``idx_TK`` (any floating dtype; checked as float32), numel > 0.
    Returns idx_out [T, K] int64 (bad ids -> -1; None without ``idx_TK``) and bad, a 0-dim
    int64 on the device: 1 if any id is outside [-1, num_experts) or any prob is NaN,
    +-inf or negative, else 0.
    """
    probs = probs.contiguous()
    n = probs.numel()
    dev = probs.device
    idx_out = None
    if idx_TK is not None:
        idx_TK = idx_TK.contiguous()
        idx_out = torch.empty(idx_TK.shape, dtype=torch.int64, device=dev)
    flag = torch.empty((), dtype=torch.int64, device=dev)
    programs = cdiv(n, block)
    one = programs == 1
    scratch = flag if one else _scratch_for(dev)
    with _launch_lock:
        launch(_check_kernel, (programs,), idx_TK if idx_TK is not None else probs, probs,
               idx_out if idx_out is not None else flag, flag, scratch, n, num_experts,
               programs, HAS_IDX=idx_TK is not None, ONE_PROGRAM=one, BLOCK=block,
               num_warps=4)
    return idx_out, flag
