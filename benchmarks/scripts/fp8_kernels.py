"""HBM bandwidth of the FP8-wire kernels on one GPU, as a fraction of a device copy.

    python benchmarks/scripts/fp8_kernels.py [--ranks 4] [--tokens 4096] [--hidden 7168]
        [--topk 8] [--experts 256] [--pad N] [--sweep 8:4,4:2,...] [--json out.json]

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
torch reference (``moe_dispatch.kernels.fp8``) first. ``--sweep BLOCK_G:num_warps,...``
times other tiles (``MOE_DISPATCH_FP8_BLOCK``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_dispatch.bench.kernels import add_shape_args, copy_bandwidth, rank0_routing  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    ap.add_argument("--sweep", default="", help="BLOCK_G:num_warps tiles to time as well")
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

    def quant():
        _fp8.quantize(x_T, qv.view(torch.uint8), sv)

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
    fns = {"quantise": quant, "dequant_permute": deq, "raw_permute": raw,
           "bf16_permute": bf16_permute}

    def time_all():
        out_ = {}
        for name, fn in fns.items():
            t = med(fn)
            out_[name] = {"us": t * 1e6, "TBps": nbytes[name] / t / 1e12,
                          "of_copy": nbytes[name] / t / copy_bw}
        return out_

    res = {"gpu": torch.cuda.get_device_name(),
           "shape": dict(R=R, T=T, H=H, K=K, E=E, pad=args.pad), "rows_in": N, "rows_out": M,
           "matches_reference": bool(ok), "copy_TBps": copy_bw / 1e12,
           "tile": dict(zip(("BLOCK_G", "num_warps"), _fp8._tile(G))), "kernels": time_all(),
           "sweep": {}}
    for tile in [t for t in args.sweep.split(",") if t]:
        os.environ["MOE_DISPATCH_FP8_BLOCK"] = tile.replace(":", ",")
        res["sweep"][tile] = time_all()
        os.environ.pop("MOE_DISPATCH_FP8_BLOCK")

    print(f"GPU {res['gpu']}: copy {copy_bw / 1e12:.2f} TB/s (1 GiB, read+write)")
    print(f"EP{R}, {T} tok/rank, H {H}, top-{K} of {E}, pad {args.pad}: quantise {T} rows; "
          f"permute {N} wire rows -> {M} rows; matches the torch reference: {ok}")
    for tile, table in [("default " + str(res["tile"]), res["kernels"])] + \
            [(f"tile {k}", v) for k, v in res["sweep"].items()]:
        print(tile)
        for name, r in table.items():
            print(f"  {name:16s} {r['us']:8.1f} us  {r['TBps']:5.2f} TB/s  "
                  f"{r['of_copy']:6.1%} of copy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 3


def _cpu(plan):
    """The same plan on the CPU (the torch reference path needs host tensors)."""
    import dataclasses
    return dataclasses.replace(plan, **{f.name: getattr(plan, f.name).cpu()
                                        for f in dataclasses.fields(plan)
                                        if hasattr(getattr(plan, f.name), "cpu")})


if __name__ == "__main__":
    raise SystemExit(main())
