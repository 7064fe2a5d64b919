"""FP8 on the wire for the collective backends (``alltoall``, ``allgather``).

``BackendConfig.wire_dtype = torch.float8_e4m3fn``: ``fp8_send`` quantises each local token
once into a packed wire row (e4m3 + one float32 scale per 1x128 block,
``moe_dispatch.kernels.fp8``), the backend groups and moves those bytes with its collective
(in the same order as the rows of the plain path, so nothing else changes), and
``fp8_receive`` dequantises them straight into expert-grouped rows of the caller's dtype (on
CUDA one Triton kernel reads each received row once and writes it to each of its expert
rows). The quantised rows themselves (``Fp8Rows``: ``tokens_fp8`` e4m3 and
``scales``) are permuted only when first asked for, so experts that run in BF16 pay nothing
for them.

Backward stays in the caller's dtype and passes the quantiser straight through (as if it
were the identity): the gradient of the dispatched rows is summed per received row,
sent back by the adjoint of the collective, and summed per token -- exactly what the BF16
path's backward computes. The probs travel in float32 as before; their gradient is exact.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import kernels
from ..kernels import fp8
from ..permute import permute, unpermute


class Fp8Rows:
    """The dispatched rows in their quantised form, made on first use and kept.

    tokens_fp8: [N, H] e4m3, the rows of ``tokens`` (same order, zeros on padding and unused
                budget rows).
    scales:     [N, H / 128] float32, one per 1x128 block (0 on padding / unused rows);
                ``fp8.dequantize(tokens_fp8, scales, tokens.dtype)`` equals ``tokens``.
    Holds the received wire rows until then (1 byte per element, plus the scales).
    """

    def __init__(self, make: Callable[[], Tuple[torch.Tensor, torch.Tensor]]):
        self._make: Optional[Callable] = make
        self._rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self._rows, self._make = self._make(), None
        return self._rows

    @property
    def tokens_fp8(self) -> torch.Tensor:
        return self.rows()[0]

    @property
    def scales(self) -> torch.Tensor:
        return self.rows()[1]


def _dequant_permute(recv_NB: torch.Tensor, probs_NK: Optional[torch.Tensor], plan, H: int,
                     dtype: torch.dtype):
    """Received wire rows -> (tokens [M, H] dtype, probs [M] float32 or None, Fp8Rows)."""
    M, G = plan.num_out_rows, H // fp8.BLOCK
    dev = recv_NB.device
    if kernels.use_triton(recv_NB):
        from ..kernels import _fp8
        pos_NK, filled_M = kernels.plan_maps(plan)
        recv_NB = recv_NB.contiguous()
        tokens = torch.empty(M, H, dtype=dtype, device=dev)
        probs = None
        if probs_NK is not None:
            probs = torch.empty(M, dtype=torch.float32, device=dev)
            probs_NK = kernels.unit_stride_rows(probs_NK)
        _fp8.scatter(recv_NB, H, pos_NK, out_MH=tokens, probs_NK=probs_NK, probs_M=probs,
                     filled_M=filled_M)

        def make():
            q = torch.empty(M, H, dtype=fp8.E4M3, device=dev)
            s = torch.empty(M, G, dtype=torch.float32, device=dev)
            _fp8.scatter(recv_NB, H, pos_NK, q_MH=q.view(torch.uint8), s_MG=s,
                         filled_M=filled_M)
            return q, s
        return tokens, probs, Fp8Rows(make)
    # The reference path: permute the wire bytes (padding rows are zero bytes: q = 0 with
    # scale 0), then dequantise every output row.
    rows_MB, probs = permute(recv_NB, probs_NK, plan)
    q, s = fp8.unpack(rows_MB, H)
    return fp8.dequantize(q, s, dtype), probs, Fp8Rows(lambda: (q.contiguous(), s.contiguous()))


def fp8_send(x_TH: torch.Tensor) -> torch.Tensor:
    """This rank's tokens [T, H] (H a multiple of 128) as packed wire rows
    [T, H + 4 * H / 128] uint8, each token quantised once; no autograd (``fp8_receive``
    carries the gradient)."""
    return fp8.quantize_packed(x_TH)


class _Fp8Receive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, recv_NB, probs_NK, plan, move_back, box):
        tokens, probs, rows = _dequant_permute(recv_NB, probs_NK, plan, x_TH.shape[1],
                                               x_TH.dtype)
        box.append(rows)
        ctx.plan, ctx.move_back = plan, move_back
        if probs_NK is not None:
            ctx.probs_like = (probs_NK.shape, probs_NK.dtype)
        if probs is None:
            return tokens
        return tokens, probs

    @staticmethod
    def backward(ctx, g_tokens, g_probs=None):
        g_x = g_p = None
        if ctx.needs_input_grad[0]:
            # Straight through the quantiser: the BF16 path's backward (the collective's
            # adjoint runs on every rank whose hidden states need a gradient, as there).
            g_x = ctx.move_back(unpermute(g_tokens, ctx.plan))
        if ctx.needs_input_grad[2] and g_probs is not None:
            pos_NK, _ = kernels.plan_maps(ctx.plan)
            flat = pos_NK.reshape(-1)
            M = g_probs.shape[0]
            g_ext = torch.cat([g_probs.float(), g_probs.new_zeros(1, dtype=torch.float32)])
            shape, dtype = ctx.probs_like
            g_p = g_ext.index_select(0, torch.where(flat >= 0, flat, M)).view(shape).to(dtype)
        return g_x, None, g_p, None, None, None


def fp8_receive(x_TH: torch.Tensor, recv_NB: torch.Tensor, probs_NK: Optional[torch.Tensor],
                plan, move_back: Callable[[torch.Tensor], torch.Tensor]):
    """Group the received wire rows by local expert, dequantised.

    x_TH:      [T, H] this rank's tokens that ``fp8_send`` quantised. Only its shape, dtype
               and place in the autograd graph are used: the gradient reaches it through here.
    recv_NB:   [N, H + 4 * H / 128] uint8 wire rows this rank received.
    probs_NK:  [N, K] float32 probs of the received rows' slots (differentiable), or None.
    plan:      the ``GroupPlan`` / ``BudgetPlan`` of the N received rows.
    move_back: the adjoint of the sender's grouping and the collective, in x's dtype:
               [N, H] gradient -> [T, H].
    Returns (tokens [M, H] in x's dtype, probs [M] float32 or None, ``Fp8Rows``).
    """
    box: list = []
    out = _Fp8Receive.apply(x_TH, recv_NB, probs_NK, plan, move_back, box)
    tokens, probs = (out, None) if probs_NK is None else out
    return tokens, probs, box[0]
