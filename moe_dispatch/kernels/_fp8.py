"""Triton kernels of the FP8 wire format (``moe_dispatch.kernels.fp8`` documents the format).

Imported only when a kernel is launched (triton is optional). One program handles
``BLOCK_G`` blocks of 128 channels of one row (the whole row up to H = 8192), so a block's
amax and scale never leave the program:

  * ``_quant_kernel``: x [T, H] -> e4m3 bytes + one float32 scale per block (written into
    a packed wire row, or into separate tensors);
  * ``_scatter_fp8_kernel``: reads packed wire row v once and writes it to each of its
    output rows ``pos[v, k] >= 0``: dequantised in the caller's dtype (DEQ), and/or as
    e4m3 bytes + scales (RAW), with the slot probs alongside (the receive-side permute).

SOFT (constexpr): round float32 -> e4m3 / bf16 / fp16 with integer ops, exactly
round-to-nearest-even. Triton's interpreter (the CPU test suite) does not round its float
down-casts to nearest even, so the CPU suite runs SOFT=True and compares bit for bit with
torch; GPUs run SOFT=False (the hardware conversions, ``cvt.rn``), checked bit for bit by
the same tests on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton import _launch, zero_unfilled

# Output element kinds of the dequantising scatter (constexpr OUT_KIND).
_KIND = {torch.float8_e4m3fn: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


@triton.jit
def _round_bits(f, KIND: tl.constexpr):
    """float32 -> the bit pattern (int32) of e4m3fn (KIND 0, saturating at 448), fp16 (1) or
    bf16 (2), round to nearest even, in integer ops."""
    a = tl.abs(f)
    b = a.to(tl.int32, bitcast=True)
    sign = (f.to(tl.int32, bitcast=True) >> 31) & 1
    if KIND == 0:
        # Normal e4m3 (|f| >= 2^-6): keep 3 mantissa bits, rebias the exponent by 127 - 7.
        code = (b + 0x7FFFF + ((b >> 20) & 1)) >> 20
        code = tl.minimum(code - (120 << 3), 0x7E)
        # Subnormal steps of 2^-9: round |f| * 2^9 to an integer (adding 2^23 does it).
        sub = ((tl.minimum(a, 0.015625) * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
        code = tl.where(a < 0.015625, sub, code) | (sign << 7)
    elif KIND == 1:
        code = (b + 0xFFF + ((b >> 13) & 1)) >> 13
        code = tl.minimum(code - (112 << 10), 0x7C00)
        sub = ((tl.minimum(a, 6.103515625e-05) * 16777216.0 + 8388608.0)
               - 8388608.0).to(tl.int32)
        code = tl.where(a < 6.103515625e-05, sub, code) | (sign << 15)
    else:
        code = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) | (sign << 15)
    return code


@triton.jit(do_not_specialize=["G"])
def _quant_kernel(x_ptr, q_ptr, s_ptr, G, x_stride, q_stride, s_stride,
                  BLOCK_G: tl.constexpr, SOFT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, 128)
    gmask = g < G
    cols = g[:, None] * 128 + c[None, :]
    m = gmask[:, None] & (c[None, :] < 128)
    x = tl.load(x_ptr + t * x_stride + cols, mask=m, other=0.0).to(tl.float32)
    # amax floored at 2^-100: an all-zero block gets a finite, nonzero scale.
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 7.888609052210118e-31)
    e4m3_max = tl.full([BLOCK_G], 448.0, tl.float32)
    # Correctly rounded divisions (plain "/" is approximate on GPUs), as torch computes them.
    inv = tl.div_rn(e4m3_max, amax)
    scale = tl.div_rn(amax, e4m3_max)
    y = x * inv[:, None]
    if SOFT:
        q = _round_bits(y, 0).to(tl.uint8)
    else:
        q = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(q_ptr + t * q_stride + cols, q, mask=m)
    tl.store(s_ptr + t * s_stride + g, scale, mask=gmask)


@triton.jit(do_not_specialize=["G", "p_stride"])
def _scatter_fp8_kernel(src_ptr, ssrc_ptr, src_stride, ssrc_stride, pos_ptr, out_ptr, q_ptr,
                        s_ptr, pin_ptr, pout_ptr, H, G, p_stride,
                        K: tl.constexpr, DEQ: tl.constexpr, RAW: tl.constexpr,
                        WITH_PROBS: tl.constexpr, OUT_KIND: tl.constexpr, SOFT: tl.constexpr,
                        BLOCK_G: tl.constexpr):
    v = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    g = hb * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, 128)
    gmask = g < G
    cols = g[:, None] * 128 + c[None, :]
    zero_g = tl.zeros([BLOCK_G], dtype=tl.int64)
    n_slot = zero_g
    for k in tl.static_range(K):
        n_slot += (tl.load(pos_ptr + v * K + k) + zero_g >= 0).to(tl.int64)
    live = gmask & (n_slot > 0)
    m = live[:, None] & (c[None, :] < 128)
    b = tl.load(src_ptr + v * src_stride + cols, mask=m, other=0)
    # The scales sit after the H bytes of e4m3 in the same wire row (a float32 view of it).
    s = tl.load(ssrc_ptr + v * ssrc_stride + H // 4 + g, mask=live, other=0.0)
    if DEQ:
        val = b.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, None]
        if OUT_KIND == 3:
            out = val
        elif SOFT:
            out = _round_bits(val, OUT_KIND).to(tl.int16).to(out_ptr.dtype.element_ty,
                                                             bitcast=True)
        else:
            out = val.to(out_ptr.dtype.element_ty)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + v * K + k)
        pk = gmask & (p + zero_g >= 0)
        if DEQ:
            tl.store(out_ptr + p * H + cols, out, mask=pk[:, None] & (c[None, :] < 128))
        if RAW:
            tl.store(q_ptr + p * H + cols, b, mask=pk[:, None] & (c[None, :] < 128))
            tl.store(s_ptr + p * G + g, s, mask=pk)
    if WITH_PROBS:
        if hb == 0:
            for k in tl.static_range(K):
                p = tl.load(pos_ptr + v * K + k)
                if p >= 0:
                    tl.store(pout_ptr + p, tl.load(pin_ptr + v * p_stride + k).to(tl.float32))


def _tile(G: int) -> tuple[int, int]:
    """(BLOCK_G, num_warps): a whole row per program up to 64 blocks (8192 channels), so a
    row's slot ids are read once and the programs are few. Measured on one H200 at DeepEP's
    shape (H 7168, G 56; benchmarks/scripts/fp8_kernels.py): 64 blocks x 4 warps runs the
    quantise at 78 %, the dequantising permute at 87 % and the raw one at 86 % of a device
    copy, against 72 / 81 / 59 % with 8 blocks (a divisor of G, no idle lanes).
    MOE_DISPATCH_FP8_BLOCK="BLOCK_G,num_warps" overrides (tuning)."""
    env = os.environ.get("MOE_DISPATCH_FP8_BLOCK")
    if env:
        bg, w = (int(v) for v in env.split(","))
        return bg, w
    bg = min(triton.next_power_of_2(max(G, 1)), 64)
    return bg, min(4, max(1, bg // 2))


def _soft() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize(x_TH: torch.Tensor, q_TH: torch.Tensor, s_TG: torch.Tensor,
             soft: bool | None = None) -> None:
    """Quantise the rows of x_TH (inner stride 1) into q_TH (uint8 view of the e4m3 bytes,
    [T, >= H] with inner stride 1) and s_TG (float32 [T, >= G], inner stride 1). The rows of
    q / s may be the two parts of packed wire rows. soft: see the module doc (None: on
    under the interpreter)."""
    T, H = x_TH.shape
    G = H // 128
    bg, warps = _tile(G)
    _launch(_quant_kernel, (T, triton.cdiv(G, bg)), x_TH, q_TH, s_TG, G, x_TH.stride(0),
            q_TH.stride(0), s_TG.stride(0), BLOCK_G=bg,
            SOFT=_soft() if soft is None else soft, num_warps=warps)


def scatter(src_NB: torch.Tensor, H: int, pos_NK: torch.Tensor, *,
            out_MH: torch.Tensor | None = None, q_MH: torch.Tensor | None = None,
            s_MG: torch.Tensor | None = None, probs_NK: torch.Tensor | None = None,
            probs_M: torch.Tensor | None = None, filled_M: torch.Tensor | None = None,
            soft: bool | None = None) -> None:
    """Scatter packed wire rows src_NB ([N, H + 4 * H / 128] uint8, contiguous) to the rows
    ``pos_NK`` names (-1 / -2: none): dequantised into out_MH (bf16, fp16 or float32) and/or
    raw into q_MH (uint8 view of e4m3) + s_MG (float32); probs_NK -> probs_M (float32)
    alongside (unit stride along K, any row stride). With filled_M ([M] uint8), rows no
    slot writes become zeros (probs too)."""
    N, K = pos_NK.shape
    G = H // 128
    deq, raw = out_MH is not None, q_MH is not None
    with_p = probs_M is not None
    bg, warps = _tile(G)
    any_out = out_MH if deq else q_MH
    _launch(_scatter_fp8_kernel, (N, max(1, triton.cdiv(G, bg))),
            src_NB, src_NB.view(torch.float32), src_NB.stride(0), src_NB.stride(0) // 4,
            pos_NK, any_out, q_MH if raw else any_out, s_MG if raw else src_NB,
            probs_NK if with_p else pos_NK, probs_M if with_p else src_NB, H, G,
            probs_NK.stride(0) if with_p else K, K=K, DEQ=deq, RAW=raw, WITH_PROBS=with_p,
            OUT_KIND=_KIND[out_MH.dtype] if deq else 0,
            SOFT=_soft() if soft is None else soft, BLOCK_G=bg, num_warps=warps)
    if filled_M is not None:
        if deq:
            zero_unfilled(out_MH, filled_M, probs_M)
        elif with_p:
            zero_unfilled(probs_M.view(-1, 1), filled_M)
        if raw:
            zero_unfilled(q_MH, filled_M)
            zero_unfilled(s_MG, filled_M)
