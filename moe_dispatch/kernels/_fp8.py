"""Triton kernels of the FP8 wire format (``moe_dispatch.kernels.fp8`` documents the format).

Imported only when a kernel is launched (triton is optional). A program handles whole
blocks of 128 channels, so a block's amax and scale never leave it:

  * ``_quant_kernel``: x [T, H] -> e4m3 bytes + one float32 scale per block (written into
    a packed wire row, or into separate tensors). Its tile (``QuantTile``): by default
    ``BLOCK_G`` blocks of one row (the whole row up to H = 8192) per program; variants take
    several rows per tile, tiles of consecutive blocks across rows, a persistent grid, or
    streaming cache hints, and all write the same bytes (MOE_DISPATCH_FP8_QUANT picks one);
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

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from . import _env
from ._launch import cdiv, next_power_of_2
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


@triton.jit
def _quant_blocks(tile, T, G, BLOCK_G: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr):
    """The blocks of 128 channels that ``tile`` covers: (row, row as a column, g, live) with
    g, live [ROWS * BLOCK_G] and the rows int64 [ROWS * BLOCK_G] / [ROWS * BLOCK_G, 1], or
    one scalar for a one-row tile (the row's offset then costs one multiply, not one per
    block). FLAT: blocks numbered row-major over [T, G] (a tile may span rows; no lane idles
    where BLOCK_G does not divide G); else ROWS rows x BLOCK_G blocks of one column range.
    A tile past the last has no live block (the persistent loop's prefetch)."""
    i = tl.arange(0, ROWS * BLOCK_G)
    if FLAT:
        # int32: the host checks T * G (+ one grid of tiles) fits.
        b = tile * BLOCK_G + i
        row = b // G
        g = b - row * G
        live = row < T
        row = row.to(tl.int64)
        row_col = row[:, None]
    else:
        n_gt = tl.cdiv(G, BLOCK_G)
        rt = tile // n_gt
        g = (tile - rt * n_gt) * BLOCK_G + i % BLOCK_G
        if ROWS == 1:
            live = (g < G) & (rt < T)
            row = rt.to(tl.int64)
            row_col = row
        else:
            row = rt * ROWS + i // BLOCK_G
            live = (g < G) & (row < T)
            row = row.to(tl.int64)
            row_col = row[:, None]
    return row, row_col, g, live


@triton.jit
def _quant_load(x_ptr, x_stride, row_col, g, live, EVICT: tl.constexpr):
    c = tl.arange(0, 128)
    m = live[:, None] & (c[None, :] < 128)
    ptrs = x_ptr + row_col * x_stride + (g[:, None] * 128 + c[None, :])
    if EVICT:
        # x is read once: let its lines go first, keeping L2 for the lines being written.
        x = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first")
    else:
        x = tl.load(ptrs, mask=m, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _quant_store(x, q_ptr, s_ptr, q_stride, s_stride, row, row_col, g, live,
                 EVICT: tl.constexpr, SOFT: tl.constexpr):
    c = tl.arange(0, 128)
    m = live[:, None] & (c[None, :] < 128)
    # amax floored at 2^-100: an all-zero block gets a finite, nonzero scale.
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 7.888609052210118e-31)
    e4m3_max = tl.full(amax.shape, 448.0, tl.float32)
    # Correctly rounded divisions (plain "/" is approximate on GPUs), as torch computes them.
    inv = tl.div_rn(e4m3_max, amax)
    scale = tl.div_rn(amax, e4m3_max)
    y = x * inv[:, None]
    if SOFT:
        q = _round_bits(y, 0).to(tl.uint8)
    else:
        q = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    q_ptrs = q_ptr + row_col * q_stride + (g[:, None] * 128 + c[None, :])
    s_ptrs = s_ptr + row * s_stride + g
    if EVICT:
        # Streaming stores (.cs): this kernel never reads them back. Whether the reader of
        # the wire rows (the next kernel, NCCL) loses more than the write gains is for the
        # sweep to measure.
        tl.store(q_ptrs, q, mask=m, cache_modifier=".cs")
        tl.store(s_ptrs, scale, mask=live, cache_modifier=".cs")
    else:
        tl.store(q_ptrs, q, mask=m)
        tl.store(s_ptrs, scale, mask=live)


@triton.jit(do_not_specialize=["T", "G", "n_tiles"])
def _quant_kernel(x_ptr, q_ptr, s_ptr, T, G, n_tiles, x_stride, q_stride, s_stride,
                  BLOCK_G: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr,
                  PERSISTENT: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr,
                  SOFT: tl.constexpr):
    """One tile (``_quant_blocks``) per program, or with PERSISTENT a grid of a few programs
    per SM, each looping over tiles pid, pid + nprog, ...; PREFETCH (persistent only) loads
    the next tile before storing this one, so a program keeps loads in flight while it
    converts and stores."""
    pid = tl.program_id(0)
    if PERSISTENT:
        nprog = tl.num_programs(0)
        if PREFETCH:
            row, row_col, g, live = _quant_blocks(pid, T, G, BLOCK_G, ROWS, FLAT)
            x = _quant_load(x_ptr, x_stride, row_col, g, live, EVICT)
            for tile in range(pid, n_tiles, nprog):
                row_n, row_col_n, g_n, live_n = _quant_blocks(tile + nprog, T, G, BLOCK_G,
                                                              ROWS, FLAT)
                x_n = _quant_load(x_ptr, x_stride, row_col_n, g_n, live_n, EVICT)
                _quant_store(x, q_ptr, s_ptr, q_stride, s_stride, row, row_col, g, live,
                             EVICT, SOFT)
                x, row, row_col, g, live = x_n, row_n, row_col_n, g_n, live_n
        else:
            for tile in range(pid, n_tiles, nprog):
                row, row_col, g, live = _quant_blocks(tile, T, G, BLOCK_G, ROWS, FLAT)
                x = _quant_load(x_ptr, x_stride, row_col, g, live, EVICT)
                _quant_store(x, q_ptr, s_ptr, q_stride, s_stride, row, row_col, g, live,
                             EVICT, SOFT)
    else:
        row, row_col, g, live = _quant_blocks(pid, T, G, BLOCK_G, ROWS, FLAT)
        x = _quant_load(x_ptr, x_stride, row_col, g, live, EVICT)
        _quant_store(x, q_ptr, s_ptr, q_stride, s_stride, row, row_col, g, live, EVICT, SOFT)


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
    MOE_DISPATCH_FP8_BLOCK="BLOCK_G,num_warps" overrides (tuning), for the quantise too
    unless MOE_DISPATCH_FP8_QUANT is set (``quant_tile``)."""
    env = _env.get("MOE_DISPATCH_FP8_BLOCK")
    if env:
        bg, w = (int(v) for v in env.split(","))
        return bg, w
    bg = min(next_power_of_2(max(G, 1)), 64)
    return bg, min(4, max(1, bg // 2))


def _soft() -> bool:
    return _env.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class QuantTile:
    """One launch configuration of the quantise kernel; every one writes the same bytes.

    block_g:    blocks of 128 channels per tile (a power of two);
    num_warps:  warps per program;
    rows:       rows per tile (a power of two): a [rows, block_g] tile of blocks;
    flat:       blocks numbered row-major over [T, G], block_g consecutive ones per tile (a
                tile may span rows; no idle lanes where block_g does not divide G); rows 1;
    persistent: 0: one program per tile; N: N programs per SM, each looping over tiles;
    prefetch:   (persistent) load the next tile before storing this one;
    evict:      evict-first loads of x, streaming (.cs) stores of q and s.

    (num_stages is no knob: Triton 3.8 emits the same PTX for sm_90 at any value, the loop
    has no dot for its pipeliner to schedule.) Written
    ``BLOCK_G:num_warps[:ROWS][:flat][:pN][:pf][:ev]``, e.g. ``64:4`` (the
    default at H 7168), ``32:4:flat:p8:ev``, ``16:4:4``; MOE_DISPATCH_FP8_QUANT takes it."""

    block_g: int
    num_warps: int
    rows: int = 1
    flat: bool = False
    persistent: int = 0
    prefetch: bool = False
    evict: bool = False

    def __post_init__(self):
        for name in ("block_g", "rows"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"QuantTile {name} must be a power of two, got {v}")
        if self.num_warps < 1 or self.persistent < 0:
            raise ValueError(f"QuantTile: bad num_warps {self.num_warps} or persistent "
                             f"{self.persistent}")
        if self.flat and self.rows != 1:
            raise ValueError("QuantTile: a flat tile is block_g consecutive blocks; rows must "
                             "be 1 (use a larger block_g)")
        if self.prefetch and not self.persistent:
            raise ValueError("QuantTile: prefetch needs a persistent grid (pN)")

    @classmethod
    def parse(cls, spec: str) -> "QuantTile":
        """``BLOCK_G:num_warps[:ROWS][:flat][:pN][:pf][:ev]`` (``,`` works for ``:``
        between the first two, as MOE_DISPATCH_FP8_BLOCK writes them)."""
        parts = [p for p in spec.replace(",", ":").split(":") if p]
        try:
            kw = dict(block_g=int(parts[0]), num_warps=int(parts[1]))
            for p in parts[2:]:
                if p.isdigit():
                    kw["rows"] = int(p)
                elif p == "flat":
                    kw["flat"] = True
                elif p == "pf":
                    kw["prefetch"] = True
                elif p == "ev":
                    kw["evict"] = True
                elif p[0] == "p" and p[1:].isdigit():
                    kw["persistent"] = int(p[1:])
                else:
                    raise ValueError(p)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"bad quantise tile {spec!r} ({exc}): write "
                             f"BLOCK_G:num_warps[:ROWS][:flat][:pN][:pf][:ev], e.g. "
                             f"64:4 or 32:4:flat:p8") from None
        return cls(**kw)

    def __str__(self) -> str:
        parts = [str(self.block_g), str(self.num_warps)]
        parts += [str(self.rows)] if self.rows != 1 else []
        parts += ["flat"] if self.flat else []
        parts += [f"p{self.persistent}"] if self.persistent else []
        parts += ["pf"] if self.prefetch else []
        parts += ["ev"] if self.evict else []
        return ":".join(parts)


@functools.lru_cache(maxsize=None)
def _parse_tile(spec: str) -> QuantTile:
    return QuantTile.parse(spec)


def quant_tile(G: int) -> QuantTile:
    """The quantise kernel's configuration for G blocks per row: MOE_DISPATCH_FP8_QUANT
    (``QuantTile`` syntax) if set, else ``_tile(G)`` (whole rows, one per program)."""
    env = _env.get("MOE_DISPATCH_FP8_QUANT")
    if env:
        return _parse_tile(env)
    return QuantTile(*_tile(G))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int | None) -> int:
    if index is None:  # the interpreter (CPU): a few programs, so the loops run several tiles
        return 2
    return torch.cuda.get_device_properties(index).multi_processor_count


def quant_grid(tile: QuantTile, T: int, G: int, device: torch.device) -> tuple[int, int]:
    """(programs launched, tiles) of the quantise kernel with ``tile`` on T rows of G blocks
    on ``device`` (persistent: ``tile.persistent`` programs per SM, at most one per tile)."""
    if tile.flat:
        n_tiles = cdiv(T * G, tile.block_g)
    else:
        n_tiles = cdiv(T, tile.rows) * cdiv(G, tile.block_g)
    if not tile.persistent:
        return n_tiles, n_tiles
    if device.type == "cuda":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = _num_sms(None)
    return min(n_tiles, tile.persistent * sms), n_tiles


def quantize(x_TH: torch.Tensor, q_TH: torch.Tensor, s_TG: torch.Tensor,
             soft: bool | None = None, tile: QuantTile | str | None = None) -> None:
    """Quantise the rows of x_TH (inner stride 1) into q_TH (uint8 view of the e4m3 bytes,
    [T, >= H] with inner stride 1) and s_TG (float32 [T, >= G], inner stride 1). The rows of
    q / s may be the two parts of packed wire rows. soft: see the module doc (None: on
    under the interpreter). tile: the launch configuration (``QuantTile`` or its string;
    None: ``quant_tile(G)``); every configuration writes the same bytes."""
    T, H = x_TH.shape
    G = H // 128
    if tile is None:
        tile = quant_tile(G)
    elif isinstance(tile, str):
        tile = _parse_tile(tile)
    grid, n_tiles = quant_grid(tile, T, G, x_TH.device)
    if tile.flat and (n_tiles + grid) * tile.block_g >= 2 ** 31:
        raise ValueError(f"quantise tile {tile}: T * H / 128 = {T * G} blocks overflow the "
                         f"flat tile's int32 block ids; use a tile without 'flat'")
    _launch(_quant_kernel, (grid,), x_TH, q_TH, s_TG, T, G, n_tiles, x_TH.stride(0),
            q_TH.stride(0), s_TG.stride(0), BLOCK_G=tile.block_g, ROWS=tile.rows,
            FLAT=tile.flat, PERSISTENT=tile.persistent > 0, PREFETCH=tile.prefetch,
            EVICT=tile.evict, SOFT=_soft() if soft is None else soft,
            num_warps=tile.num_warps)


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
    _launch(_scatter_fp8_kernel, (N, max(1, cdiv(G, bg))),
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
