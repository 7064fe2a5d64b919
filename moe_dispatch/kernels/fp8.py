"""The FP8 wire format: e4m3 rows with one float32 scale per 1x128 block (DeepEP's layout).

For each row and each block of 128 channels ``x_b`` (H must be a multiple of 128):

    A = max(amax(|x_b|), 2^-100)     (float32; the floor only matters for all-zero blocks)
    scale = A / 448                  (448 = the largest e4m3fn value)
    q = e4m3(x_b * (448 / A))        (round to nearest even; |x_b * 448 / A| <= 448)
    dequantised x_b = float32(q) * scale, rounded once to the caller's dtype

Both divisions are correctly rounded float32 divisions and the product one float32 multiply,
in the torch reference here and in the Triton kernels (``_fp8``), so the two agree bit for
bit. Error per element (README, "FP8 on the wire"): |x' - x| <= 2^-4 |x| where |x| >=
A / 2^6 / 448 (e4m3's normal range), else <= 2^-10 * scale; never more than A / 28 (half
an e4m3 step at the top binade, 16, times the scale); plus float32 rounding (<= 2^-21 |x|)
and the final rounding to a BF16 (2^-8 |x'|) or FP16 (2^-11 |x'|) output.

On the wire a token is one packed uint8 row of ``packed_width(H) = H + 4 * H / 128`` bytes:
its H e4m3 bytes, then its H / 128 float32 scales (so one collective moves both, and a row
is 16-byte aligned whenever H is a multiple of 128).

``quantize`` / ``quantize_packed`` run the Triton kernel on CUDA tensors (when
``moe_dispatch.kernels.use_triton`` says so) and the torch reference elsewhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 2.0 ** -100
WIRE_DTYPES = (E4M3,)


def check_wire_dtype(wire_dtype) -> None:
    """Constructor check of a ``wire_dtype`` argument: None or ``torch.float8_e4m3fn``."""
    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be None (rows travel in the input's dtype) or "
                         f"torch.float8_e4m3fn, got {wire_dtype!r}")


def hidden_error(hidden: int) -> Optional[str]:
    """The dispatch error for a hidden size the format cannot carry, or None."""
    if hidden % BLOCK == 0:
        return None
    return (f"dispatch: hidden: wire_dtype=float8_e4m3fn needs the hidden size to be a "
            f"multiple of {BLOCK} (one float32 scale per 1x{BLOCK} block, DeepEP's layout), "
            f"got {hidden}; pad the hidden size or use wire_dtype=None")


def packed_width(hidden: int) -> int:
    """Bytes of one packed wire row: H e4m3 bytes + H / 128 float32 scales."""
    return hidden + 4 * (hidden // BLOCK)


def unpack(packed_NB: torch.Tensor, hidden: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views of packed wire rows: (q [N, H] e4m3, scales [N, H / 128] float32); strided
    (row stride ``packed_width(H)``), not copies."""
    q = packed_NB[:, :hidden].view(E4M3)
    s = packed_NB.view(torch.float32)[:, hidden // 4:]
    return q, s


def pack(q_NH: torch.Tensor, s_NG: torch.Tensor) -> torch.Tensor:
    """[N, H] e4m3 and [N, H / 128] float32 -> packed wire rows [N, packed_width(H)] uint8."""
    return torch.cat([q_NH.view(torch.uint8), s_NG.contiguous().view(torch.uint8)], dim=1)


def quantize_reference(x_TH: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The format in plain torch: (q [T, H] e4m3, scales [T, H / 128] float32)."""
    T, H = x_TH.shape
    if H % BLOCK:
        raise ValueError(hidden_error(H))
    x = x_TH.float().reshape(T, H // BLOCK, BLOCK)
    amax = x.abs().amax(dim=2).clamp(min=AMAX_FLOOR) if T else x.new_zeros(T, H // BLOCK)
    e4m3_max = torch.full_like(amax, E4M3_MAX)
    # Tensor / tensor: torch turns "448.0 / t" into a reciprocal and a multiply.
    inv, scale = e4m3_max / amax, amax / e4m3_max
    q = (x * inv.unsqueeze(2)).to(E4M3).reshape(T, H)
    return q, scale


def dequantize(q_NH: torch.Tensor, s_NG: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32(q) * scale per 1x128 block, rounded once to ``dtype``: [N, H]."""
    N, H = q_NH.shape
    x = q_NH.float().reshape(N, H // BLOCK, BLOCK) * s_NG.reshape(N, H // BLOCK, 1)
    return x.reshape(N, H).to(dtype)


def _triton(t: torch.Tensor) -> bool:
    from . import use_triton
    return use_triton(t)


def _rows(x_TH: torch.Tensor) -> torch.Tensor:
    return x_TH if x_TH.stride(-1) == 1 or x_TH.shape[0] == 0 else x_TH.contiguous()


def quantize(x_TH: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [T, H] e4m3, scales [T, H / 128] float32) of x_TH [T, H] (any float dtype; H a
    multiple of 128). Not differentiable."""
    T, H = x_TH.shape
    if H % BLOCK:
        raise ValueError(hidden_error(H))
    if not _triton(x_TH):
        return quantize_reference(x_TH.detach())
    from . import _fp8
    q = torch.empty(T, H, dtype=E4M3, device=x_TH.device)
    s = torch.empty(T, H // BLOCK, dtype=torch.float32, device=x_TH.device)
    _fp8.quantize(_rows(x_TH.detach()), q.view(torch.uint8), s)
    return q, s


def quantize_packed(x_TH: torch.Tensor) -> torch.Tensor:
    """Packed wire rows [T, packed_width(H)] uint8 of x_TH [T, H]: one pass on CUDA."""
    T, H = x_TH.shape
    if not _triton(x_TH):
        return pack(*quantize(x_TH))
    if H % BLOCK:
        raise ValueError(hidden_error(H))
    from . import _fp8
    packed = torch.empty(T, packed_width(H), dtype=torch.uint8, device=x_TH.device)
    q, s = unpack(packed, H)
    _fp8.quantize(_rows(x_TH.detach()), q.view(torch.uint8), s)
    return packed
