"""HBM bandwidth of the FP8-wire kernels on one GPU, as a fraction of a device copy.

    python benchmarks/scripts/fp8_kernels.py [--ranks 4] [--tokens 4096] [--hidden 7168]
        [--topk 8] [--experts 256] [--pad N] [--sweep 64:4:ev,32:4:flat:p8,...]
        [--sweep-kernels quantise] [--rounds 3] [--json out.json]

On DeepEP's benchmark shape (one EP rank's side, BF16 tokens), with CUDA-event medians
(``triton.testing.do_bench``):
  * copy:       a 1 GiB device-to-device copy, the read+write ceiling;
  * quantise:   the sender's pass, T tokens [T, H] BF16 -> packed wire rows (H e4m3 bytes +
                H / 128 float32 scales per token);
  * dequant-permute: the receiver's pass, N received wire rows -> M expert-grouped BF16 rows
                (each wire row read once, dequantised, written to each of its expert rows;
                probs alongside); with ``--pad`` the padding rows are zeroed too;
  * raw permute: the same rows as e4m3 + scales (``out.tokens_fp8`` / ``out.scales``, made
                on first use);
  * for scale: the BF16 permute (``kernels.permute_rows``) of the same rows.
Bandwidth counts the bytes a kernel must move (rows read + rows written, plus ids and probs);
"of copy" is that over the copy's bandwidth. Every kernel is checked bit for bit against the
torch reference (``moe_dispatch.kernels.fp8``) first.

``--sweep`` times other launch configurations side by side, in this process: each entry a
quantise tile (``moe_dispatch.kernels._fp8.QuantTile``: ``BLOCK_G:num_warps[:ROWS][:flat]
[:pN][:pf][:ev]``, what ``MOE_DISPATCH_FP8_QUANT`` takes) for the quantise kernel, and
its ``BLOCK_G:num_warps`` (``MOE_DISPATCH_FP8_BLOCK``) for the permutes (``--sweep-kernels``
picks which kernels the sweep times). Every quantise tile's output is checked bit for bit
against the default tile's (itself checked against the torch reference) on the benchmark's
rows, and against the torch reference on a small adversarial batch (all-zero block, -0.0,
tiny blocks, rows not a multiple of any tile), before it is timed: ``bit_exact`` per entry.
``--rounds N`` times the default and every entry N times, interleaved (drift between
entries averages out), and reports each one's median round. ``--sweep quant`` is
``QUANT_SWEEP``, the quantise tiles most likely to beat the default (tests/test_fp8_wire.py
checks each bit for bit and compiles it for sm_90):

    python3 benchmarks/scripts/fp8_kernels.py --sweep quant --sweep-kernels quantise \\
        --rounds 5 --json fp8_sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_dispatch.bench.kernels import add_shape_args, copy_bandwidth, rank0_routing  # noqa: E402

# The default's footprint without idle lanes at G 56 (8 blocks x 8 rows), 32 / 16-block flat
# tiles (more programs resident, no idle lanes), persistent grids sized to the programs an SM
# holds (ptxas register counts for sm_90: 64:4 and 8:4:8 96 registers, 5 programs per SM;
# 32:4:flat 60, 8; 16:2:flat 64, 16), a prefetching loop, evict-first / streaming hints.
QUANT_SWEEP = ("64:4:ev,8:4:8,8:4:8:ev,8:4:4,32:4:flat,32:4:flat:ev,64:4:flat,16:2:flat,"
               "16:4:flat,64:8:flat,64:8:2,32:4:flat:p8,16:2:flat:p16,32:4:flat:p4:pf,"
               "8:4:8:p5,32:4:flat:p8:ev")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    ap.add_argument("--sweep", default="",
                    help="comma list of quantise tiles to time as well, "
                         "BLOCK_G:num_warps[:ROWS][:flat][:pN][:pf][:ev], or quant "
                         "(QUANT_SWEEP)")
    ap.add_argument("--sweep-kernels", default="all",
                    help="comma list of the kernels the sweep times (quantise, "
                         "dequant_permute, raw_permute, bf16_permute) or all")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the default and the sweep this many times, interleaved; "
                         "report the median round")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from triton.testing import do_bench

    from moe_dispatch import kernels
    from moe_dispatch.backends import wire
    from moe_dispatch.kernels import _fp8, fp8
    from moe_dispatch.permute import group_plan

    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernels.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def med(fn) -> float:  # seconds
        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3

    copy_bw = copy_bandwidth(med, dev)

    R, T, E, K, H = args.ranks, args.tokens, args.experts, args.topk, args.hidden
    L, G, W = E // R, H // fp8.BLOCK, fp8.packed_width(H)
    _, lid, counts = rank0_routing(R, T, E, K, dev)
    N = lid.shape[0]
    plan = group_plan(lid, L, counts, args.pad)
    pos, filled = kernels.plan_maps(plan)
    M = plan.num_out_rows
    probs = torch.rand(N, K, device=dev)

    x_T = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    x_N = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    wire_N = fp8.quantize_packed(x_N)

    # Correctness first: the kernels against the torch reference, bit for bit.
    ok = torch.equal(fp8.quantize_packed(x_T).cpu(), fp8.pack(*fp8.quantize_reference(x_T.cpu())))
    tok, pr, rows = wire._dequant_permute(wire_N, probs, plan, H, torch.bfloat16)
    q, s = rows.rows()
    ref_tok, ref_pr, ref_rows = wire._dequant_permute(wire_N.cpu(), probs.cpu(), _cpu(plan),
                                                      H, torch.bfloat16)
    rq, rs = ref_rows.rows()
    ok = ok and torch.equal(tok.cpu(), ref_tok) and torch.equal(pr.cpu(), ref_pr) \
        and torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) \
        and torch.equal(s.cpu(), rs)

    packed_T = torch.empty(T, W, dtype=torch.uint8, device=dev)
    qv, sv = fp8.unpack(packed_T, H)
    out = torch.empty(M, H, dtype=torch.bfloat16, device=dev)
    probs_M = torch.empty(M, device=dev)
    q_M = torch.empty(M, H, dtype=torch.uint8, device=dev)
    s_M = torch.empty(M, G, device=dev)

    def deq():
        _fp8.scatter(wire_N, H, pos, out_MH=out, probs_NK=probs, probs_M=probs_M,
                     filled_M=filled)

    def raw():
        _fp8.scatter(wire_N, H, pos, q_MH=q_M, s_MG=s_M, filled_M=filled)

    def bf16_permute():
        kernels.permute_rows(x_N, pos, M, filled, probs)

    ids = N * K * 8
    nbytes = {
        "quantise": T * H * 2 + T * W,
        "dequant_permute": N * W + M * H * 2 + ids + N * K * 4 + M * 4,
        "raw_permute": N * W + M * W + ids,
        "bf16_permute": N * H * 2 + M * H * 2 + ids + N * K * 4 + M * 4,
    }
    permutes = {"dequant_permute": deq, "raw_permute": raw, "bf16_permute": bf16_permute}
    sweep_kernels = list(nbytes) if args.sweep_kernels == "all" else \
        [k for k in args.sweep_kernels.split(",") if k]
    for k in sweep_kernels:
        if k not in nbytes:
            raise SystemExit(f"--sweep-kernels: unknown kernel {k!r} (one of {list(nbytes)})")

    default = _fp8.quant_tile(G)
    sweep = QUANT_SWEEP if args.sweep == "quant" else args.sweep
    tiles = [_fp8.QuantTile.parse(t) for t in sweep.split(",") if t]
    tiles = list(dict.fromkeys(tiles))  # once each, in order

    # Every tile's bytes: the benchmark's rows against the default tile's (checked against
    # the reference above), and a small adversarial batch against the torch reference.
    x_adv = _adversarial(37, H).to(dev)
    adv_ref = fp8.pack(*fp8.quantize_reference(x_adv.cpu()))
    packed_default = fp8.quantize_packed(x_T)

    def bit_exact(tile) -> bool:
        ok_ = True
        for x_, ref in ((x_T, packed_default), (x_adv, adv_ref.to(dev))):
            got = torch.full((x_.shape[0], W), 0xAB, dtype=torch.uint8, device=dev)
            gq, gs = fp8.unpack(got, H)
            _fp8.quantize(x_, gq.view(torch.uint8), gs, tile=tile)
            ok_ = ok_ and torch.equal(got, ref)
        return bool(ok_)

    def time_config(tile, names) -> dict:
        """Times the named kernels with quantise tile ``tile`` (and its BLOCK_G:num_warps for
        the permutes; None: the defaults)."""
        out_ = {}
        if tile is not None and any(n != "quantise" for n in names):
            os.environ["MOE_DISPATCH_FP8_BLOCK"] = f"{tile.block_g},{tile.num_warps}"
        try:
            for name in names:
                if name == "quantise":
                    t = med(lambda: _fp8.quantize(x_T, qv.view(torch.uint8), sv, tile=tile))
                else:
                    t = med(permutes[name])
                out_[name] = {"us": t * 1e6, "TBps": nbytes[name] / t / 1e12,
                              "of_copy": nbytes[name] / t / copy_bw}
        finally:
            os.environ.pop("MOE_DISPATCH_FP8_BLOCK", None)
        return out_

    configs = [("default", None, list(nbytes))] + \
        [(str(t), t, sweep_kernels) for t in tiles]
    exact = {str(t): bit_exact(t) for t in tiles}
    rounds = {label: [] for label, _, _ in configs}
    for _ in range(max(1, args.rounds)):
        for label, tile, names in configs:
            if label == "default" or exact[label]:  # a tile with wrong bytes is not timed
                rounds[label].append(time_config(tile, names))

    def median_round(label) -> dict:
        runs = rounds[label]
        if not runs:
            return {}
        return {name: sorted((r[name] for r in runs), key=lambda v: v["us"])[len(runs) // 2]
                for name in runs[0]}

    res = {"gpu": torch.cuda.get_device_name(),
           "shape": dict(R=R, T=T, H=H, K=K, E=E, pad=args.pad), "rows_in": N, "rows_out": M,
           "matches_reference": bool(ok), "copy_TBps": copy_bw / 1e12,
           "tile": dict(zip(("BLOCK_G", "num_warps"), _fp8._tile(G))),
           "quant_tile": str(default), "rounds": max(1, args.rounds),
           "kernels": median_round("default"), "sweep": {}}
    for label, tile, _ in configs[1:]:
        grid = _fp8.quant_grid(tile, T, G, x_T.device)
        res["sweep"][label] = dict(median_round(label), bit_exact=exact[label],
                                   programs=grid[0], tiles=grid[1],
                                   quantise_of_copy_rounds=[r["quantise"]["of_copy"]
                                                            for r in rounds[label]
                                                            if "quantise" in r])
    res["kernels"]["quantise"]["of_copy_rounds"] = [r["quantise"]["of_copy"]
                                                    for r in rounds["default"]]
    timed = [("default " + str(default), res["kernels"])] + \
        [(k, v) for k, v in res["sweep"].items() if "quantise" in v]
    best = max(timed, key=lambda kv: kv[1]["quantise"]["of_copy"])
    res["best_quantise"] = {"tile": best[0].replace("default ", ""),
                            "of_copy": best[1]["quantise"]["of_copy"]}
    all_exact = all(exact.values())

    print(f"GPU {res['gpu']}: copy {copy_bw / 1e12:.2f} TB/s (1 GiB, read+write)")
    print(f"EP{R}, {T} tok/rank, H {H}, top-{K} of {E}, pad {args.pad}: quantise {T} rows; "
          f"permute {N} wire rows -> {M} rows; matches the torch reference: {ok}; "
          f"median of {res['rounds']} round(s)")
    print(f"default: quantise tile {default}, permute tile {res['tile']}")
    for name, r in res["kernels"].items():
        print(f"  {name:16s} {r['us']:8.1f} us  {r['TBps']:5.2f} TB/s  "
              f"{r['of_copy']:6.1%} of copy")
    for label, r in res["sweep"].items():
        print(f"tile {label}: bit-exact {r['bit_exact']}, {r['programs']} programs, "
              f"{r['tiles']} tiles")
        for name in (n for n in nbytes if n in r):
            v = r[name]
            print(f"  {name:16s} {v['us']:8.1f} us  {v['TBps']:5.2f} TB/s  "
                  f"{v['of_copy']:6.1%} of copy")
    print(f"best quantise: {res['best_quantise']['tile']} at "
          f"{res['best_quantise']['of_copy']:.1%} of copy; every tile bit-exact: {all_exact}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok and all_exact else 3


def _adversarial(T, H):
    """Rows spanning 11 decades, an all-zero block, a -0.0, a block far below its row and
    one near the float32 floor (bf16)."""
    import torch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g) * torch.logspace(-8, 3, T).unsqueeze(1)
    x[0, :128] = 0
    x[1, 5] = -0.0
    x[2, :128] *= 1e-6
    x[T - 1, -128:] *= 1e-30
    return x.to(torch.bfloat16)


def _cpu(plan):
    """The same plan on the CPU (the torch reference path needs host tensors)."""
    import dataclasses
    return dataclasses.replace(plan, **{f.name: getattr(plan, f.name).cpu()
                                        for f in dataclasses.fields(plan)
                                        if hasattr(getattr(plan, f.name), "cpu")})


if __name__ == "__main__":
    raise SystemExit(main())
