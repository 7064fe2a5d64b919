"""Grouped SwiGLU experts, fed straight from ``MoETokenDispatcher.dispatch``.

Shapes: N dispatched rows, H hidden, F expert ffn width, L local experts, E global experts.

Two implementations compute the same thing:
  * ``grouped_mm``: one ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older
    torch) per projection, all experts in one kernel. The CUDA kernels take bfloat16 only:
    fp32 weights are cast per call (they stay fp32 master weights). Row strides must be
    16-byte aligned, i.e. H and F multiples of 8 (checked, with an error saying so). Any
    row count per expert, zero included, is fine for bf16 (the 8/16/32-row group
    alignment is an FP8/MXFP8 rule).
  * ``loop``: one matmul per local expert, in the input dtype. The CPU path and the
    reference.
``impl="auto"``: grouped_mm for bf16 rows on CUDA; the loop on CPU, for fp32 rows (so
fp32 training is never quietly computed in bf16) and when this torch has no grouped_mm
API (logged once). ``impl="grouped_mm"`` forces it (fp32 rows are then cast to bf16 on
CUDA); ``impl="loop"`` forces the loop.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("auto", "grouped_mm", "loop")
log = logging.getLogger("token_dispatcher")
_warned_no_api = False


def grouped_mm_fn():
    """The grouped GEMM entry point of this torch, or None when it has none."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def expert_init_seed(seed: int, layer_id: int, expert_id: int) -> int:
    """Seed of one expert's init: a function of the *global* expert id only, so the
    global model is the same whatever the expert-parallel layout."""
    return (int(seed) * 1_000_003 + int(layer_id) * 65_537 + int(expert_id) * 7919 + 17) % (2**62)


class GroupedExperts(nn.Module):
    """The local slice of E SwiGLU experts: y = (silu(x W1_e) * (x W3_e)) W2_e * prob.

    num_experts:         E, experts in the whole model.
    hidden:              H.
    ffn_hidden:          F, width of each expert's MLP.
    num_local_experts:   L experts held here (default E: no expert parallelism).
    local_expert_offset: global id of the first local expert (``disp.local_expert_offset``).
    impl:                "auto" | "grouped_mm" | "loop" (see module docstring).
    seed, layer_id:      expert e is initialised from ``expert_init_seed(seed, layer_id, e)``
                         so a local slice equals the same slice of a single-rank model.
    init_std:            std of W1/W3; W2 uses ``out_init_std`` (default ``init_std``).

    Parameters (float32 unless ``dtype`` says otherwise):
      w1 [L, H, F] gate projection, w3 [L, H, F] up projection, w2 [L, F, H] down projection.
    """

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, *,
                 num_local_experts: Optional[int] = None, local_expert_offset: int = 0,
                 impl: str = "auto", seed: int = 0, layer_id: int = 0,
                 init_std: float = 0.02, out_init_std: Optional[float] = None,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"expert impl must be one of {IMPLS}, got {impl!r}")
        L = num_experts if num_local_experts is None else int(num_local_experts)
        if not 0 <= local_expert_offset <= num_experts - L:
            raise ValueError(f"local experts [{local_expert_offset}, {local_expert_offset + L}) "
                             f"do not fit in num_experts={num_experts}")
        self.num_experts, self.num_local_experts = num_experts, L
        self.local_expert_offset = local_expert_offset
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.impl = impl
        self.seed, self.layer_id = seed, layer_id
        self.init_std = init_std
        self.out_init_std = init_std if out_init_std is None else out_init_std
        kw = dict(dtype=dtype or torch.float32, device=device)
        self.w1 = nn.Parameter(torch.empty(L, hidden, ffn_hidden, **kw))
        self.w3 = nn.Parameter(torch.empty(L, hidden, ffn_hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(L, ffn_hidden, hidden, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        H, Fh = self.hidden, self.ffn_hidden
        for i in range(self.num_local_experts):
            g = torch.Generator().manual_seed(
                expert_init_seed(self.seed, self.layer_id, self.local_expert_offset + i))
            # Drawn on the CPU in a fixed order so every device/EP layout gets the same values.
            self.w1[i].copy_(torch.randn(H, Fh, generator=g) * self.init_std)
            self.w3[i].copy_(torch.randn(H, Fh, generator=g) * self.init_std)
            self.w2[i].copy_(torch.randn(Fh, H, generator=g) * self.out_init_std)

    def resolved_impl(self, x_NH: torch.Tensor) -> str:
        """The implementation ``forward`` uses for rows like ``x_NH``."""
        global _warned_no_api
        if self.impl != "auto":
            return self.impl
        if not x_NH.is_cuda or x_NH.dtype != torch.bfloat16:
            return "loop"
        if grouped_mm_fn() is None:
            if not _warned_no_api:
                log.warning("torch %s has no grouped_mm: experts run as a per-expert loop "
                            "(upgrade torch for one grouped GEMM)", torch.__version__)
                _warned_no_api = True
            return "loop"
        return "grouped_mm"

    def forward(self, tokens_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor,
                probs_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run every local expert on its block of rows.

        tokens_NH:           [N, H] rows grouped by local expert, ascending (dispatch order).
        tokens_per_expert_L: [L] int64 rows per local expert (host or device tensor);
                             sums to N, or to at most N in the budget mode (the rows past
                             the experts' blocks are unused: combine never reads them).
        probs_N:             [N] float32 routing prob of each row, multiplied into the
                             output (0 on padding rows); None = unweighted.
        Returns [N, H] in the dtype of ``tokens_NH``.
        Every weight gets a gradient (zeros for experts without rows), so gradient
        all-reduces see the same tensors on every rank.
        """
        N = tokens_NH.shape[0]
        if tokens_per_expert_L.numel() != self.num_local_experts:
            raise ValueError(f"tokens_per_expert has {tokens_per_expert_L.numel()} entries, "
                             f"this module holds {self.num_local_experts} experts")
        impl = self.resolved_impl(tokens_NH)
        # An empty input takes the loop path: matmuls of [0, H] rows are defined everywhere,
        # while grouped GEMMs with a zero-length contraction are not (weight grad).
        if impl == "loop" or N == 0:
            y_NH = self._loop(tokens_NH, tokens_per_expert_L)
        else:
            y_NH = self._grouped(tokens_NH, tokens_per_expert_L)
        if probs_N is not None:
            y_NH = (y_NH.float() * probs_N.float().unsqueeze(-1)).to(tokens_NH.dtype)
        return y_NH.to(tokens_NH.dtype)

    def _loop(self, x_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        counts = [int(c) for c in tokens_per_expert_L.tolist()]
        if sum(counts) > x_NH.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {sum(counts)} but tokens has "
                             f"{x_NH.shape[0]} rows")
        w1, w2, w3 = (w.to(x_NH.dtype) for w in (self.w1, self.w2, self.w3))
        outs, start = [], 0
        for e, n in enumerate(counts):
            # Zero-row experts still run (on [0, H]): that puts their weights in the graph,
            # so their gradient is a zero tensor rather than missing.
            x_nH = x_NH[start:start + n]
            h_nF = F.silu(x_nH @ w1[e]) * (x_nH @ w3[e])
            outs.append(h_nF @ w2[e])
            start += n
        # Budget mode: rows past the experts' blocks are unused (zeros in, zeros out).
        outs.append(x_NH.new_zeros(x_NH.shape[0] - start, w2.shape[-1]))
        return torch.cat(outs, 0)

    def _grouped(self, x_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        gmm = grouped_mm_fn()
        if gmm is None:
            raise RuntimeError(
                f"expert impl 'grouped_mm' needs torch.nn.functional.grouped_mm or "
                f"torch._grouped_mm (torch>=2.8); this torch {torch.__version__} has neither: "
                "upgrade torch or set the expert impl to 'loop'")
        if x_NH.is_cuda and (self.hidden % 8 or self.ffn_hidden % 8):
            raise ValueError(
                f"grouped_mm on CUDA needs 16-byte aligned bf16 rows: hidden ({self.hidden}) "
                f"and ffn_hidden ({self.ffn_hidden}) must be multiples of 8 (or use impl='loop')")
        offs_L = torch.cumsum(tokens_per_expert_L.to(torch.int64), 0).to(
            device=x_NH.device, dtype=torch.int32, non_blocking=True)
        dt = torch.bfloat16 if x_NH.is_cuda else x_NH.dtype
        w1, w2, w3 = (w.to(dt) for w in (self.w1, self.w2, self.w3))
        if x_NH.is_cuda and torch.cuda.get_device_capability(x_NH.device)[0] >= 10:
            # Blackwell grouped_mm writes garbage weight-grads for empty groups
            # (pytorch/pytorch#172439): mask them so those grads are exact zeros.
            has_rows_L11 = (tokens_per_expert_L.to(x_NH.device) > 0).to(dt).view(-1, 1, 1)
            w1, w2, w3 = w1 * has_rows_L11, w2 * has_rows_L11, w3 * has_rows_L11
        x = x_NH.to(dt)
        h_NF = F.silu(gmm(x, w1, offs=offs_L)) * gmm(x, w3, offs=offs_L)
        # Budget mode: rows past the last offset are left unwritten by grouped_mm; combine
        # and the backward never read them (their positions are in no slot's map).
        return gmm(h_NF, w2, offs=offs_L)
