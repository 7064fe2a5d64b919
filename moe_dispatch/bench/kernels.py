"""HBM bandwidth of the fused permute / unpermute kernels on one GPU.

    python -m moe_dispatch.bench.kernels [--ranks 4] [--tokens 4096] [--hidden 7168]
                                         [--topk 8] [--experts 256] [--json out.json]

Builds the receiving side of one EP rank on the DeepEP shape (the rows a rank gets from
every rank, with their local expert ids), then times, with CUDA events (median of many
calls, ``triton.testing.do_bench``):
  * a 1 GiB device-to-device copy (the read+write ceiling of this GPU),
  * the Triton permute (each received row read once, written to each of its expert
    slots, probs alongside) and unpermute (float32 sum of each row's expert outputs),
  * the plan (``group_plan``) alone, and the plain torch path for comparison,
  * the ``nvshmem`` dispatch's staging copy and layout plan (its device work before the
    host sync).
Each kernel's bandwidth counts the bytes it must move (rows read + rows written, plus
ids and probs); the fraction is that bandwidth over the copy ceiling. Both kernels are
checked against the torch path before timing.
"""
from __future__ import annotations

import argparse
import json
import os


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The workload flags shared by the kernel benches (DeepEP's shape by default)."""
    ap.add_argument("--ranks", type=int, default=4, help="EP size the routing is drawn for")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--pad", type=int, default=None, help="pad_multiple (default: none)")


def copy_bandwidth(med, dev) -> float:
    """Bytes per second (read + write) of a 1 GiB device-to-device copy, timed by ``med``."""
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / med(lambda: dst.copy_(src))


def rank0_routing(R: int, T: int, E: int, K: int, dev):
    """DeepEP's draw (scores |randn| + 1, top-k) over R ranks of T tokens, as rank 0 receives
    it: every token with an expert in [0, L), once, carrying its K ids as local ids (-1
    elsewhere). Returns (idx [R * T, K] the global ids drawn, lid [N, K] int64, per-expert
    counts as host ints)."""
    import torch
    L = E // R
    idx = torch.topk(torch.randn(R * T, E, device=dev).abs() + 1, K, dim=-1).indices
    lid = torch.where(idx < L, idx, -1)
    lid = lid[(lid >= 0).any(1)].contiguous()
    return idx, lid, torch.bincount(lid[lid >= 0], minlength=L).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    ap.add_argument("--sweep", default="",
                    help="comma list of BLOCK_H:num_warps tile overrides to time as well, "
                         "e.g. 1024:4,2048:8 (MOE_DISPATCH_TRITON_BLOCK)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from triton.testing import do_bench

    from moe_dispatch import kernels
    from moe_dispatch.permute import group_plan, permute, unpermute

    if not torch.cuda.is_available():
        raise SystemExit("moe_dispatch.bench.kernels needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def med(fn) -> float:  # seconds
        return do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e-3

    copy_bw = copy_bandwidth(med, dev)

    R, T, E, K, H = args.ranks, args.tokens, args.experts, args.topk, args.hidden
    L = E // R
    idx, lid, counts = rank0_routing(R, T, E, K, dev)
    N = lid.shape[0]
    x = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    probs = torch.rand(N, K, device=dev)
    plan = group_plan(lid, L, counts, args.pad)
    M = plan.num_out_rows
    y = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    # Bytes each kernel must move: permute reads N rows and writes M rows (+ ids, probs in,
    # probs out); unpermute reads M rows and writes N rows (+ ids).
    esz = x.element_size()
    p_bytes = (N + M) * H * esz + N * K * (8 + 4) + M * 4
    u_bytes = (N + M) * H * esz + N * K * 8

    tp, pp = permute(x, probs, plan)
    tu = unpermute(y, plan)
    os.environ["MOE_DISPATCH_TRITON"] = "0"
    rp, rpp = permute(x, probs, plan)
    ru = unpermute(y, plan)
    t_torch_p = med(lambda: permute(x, probs, plan))
    t_torch_u = med(lambda: unpermute(y, plan))
    os.environ["MOE_DISPATCH_TRITON"] = "1"
    same = bool(torch.equal(tp, rp) and torch.equal(pp, rpp)
                and (tu.float() - ru.float()).abs().max().item() <= 1e-2 * ru.float().abs().max().item())

    pos, filled = kernels.plan_maps(plan)
    t_p = med(lambda: kernels.permute_rows(x, pos, M, filled, probs))
    t_u = med(lambda: kernels.reduce_rows(y, pos))
    t_plan = med(lambda: group_plan(lid, L, counts, args.pad))
    t_both = med(lambda: permute(x, probs, group_plan(lid, L, counts, args.pad)))

    # The nvshmem dispatch's work before its host sync, on the device: the staging copy of
    # this rank's tokens into its symmetric buffer, and the layout plan over R ranks' staged
    # ids (here every rank's ids live on this GPU: the same kernels, no NVLink).
    from moe_dispatch.kernels import _triton
    xs = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids_T = idx[:T].contiguous()
    pr_T = torch.rand(T, K, device=dev)
    st_x = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    st_i = torch.empty(T, K, device=dev, dtype=torch.int32)
    st_p = torch.empty(T, K, device=dev)
    meta = torch.zeros(16, device=dev, dtype=torch.int64)
    code = torch.zeros((), device=dev, dtype=torch.int64)
    t_stage = med(lambda: _triton.stage(xs, ids_T, pr_T, T, st_x, st_i, st_p, meta, code, T,
                                        H * esz))
    staged = [idx[r * T:(r + 1) * T].to(torch.int32).contiguous() for r in range(R)]
    metas = [torch.zeros(16, device=dev, dtype=torch.int64) for _ in range(R)]
    itab = torch.tensor([t.data_ptr() for t in staged], device=dev, dtype=torch.int64)
    mtab = torch.tensor([t.data_ptr() for t in metas], device=dev, dtype=torch.int64)
    status = torch.zeros(1, device=dev, dtype=torch.int32)
    lay_pos = torch.empty(R * T * K, device=dev, dtype=torch.int64)
    lay_host = torch.empty(R * 16 + L + 2, device=dev, dtype=torch.int64)
    t_layout = med(lambda: _triton.layout_plan(itab, mtab, status, T * K, 0, L, 1, 1 << 62,
                                               lay_pos, lay_host))

    sweep = {}
    for tile in [t for t in args.sweep.split(",") if t]:
        os.environ["MOE_DISPATCH_TRITON_BLOCK"] = tile.replace(":", ",")
        tp_ = med(lambda: kernels.permute_rows(x, pos, M, filled, probs))
        tu_ = med(lambda: kernels.reduce_rows(y, pos))
        os.environ.pop("MOE_DISPATCH_TRITON_BLOCK")
        sweep[tile] = {"permute_of_copy": p_bytes / tp_ / copy_bw,
                       "unpermute_of_copy": u_bytes / tu_ / copy_bw,
                       "permute_us": tp_ * 1e6, "unpermute_us": tu_ * 1e6}
        print(f"tile {tile:8s} permute {tp_ * 1e6:7.1f} us {p_bytes / tp_ / copy_bw:6.1%} | "
              f"unpermute {tu_ * 1e6:7.1f} us {u_bytes / tu_ / copy_bw:6.1%} of copy")

    res = {
        "gpu": torch.cuda.get_device_name(), "shape": dict(R=R, T=T, H=H, K=K, E=E, pad=args.pad),
        "rows_in": N, "rows_out": M, "matches_torch_path": same,
        "copy_ceiling_TBps": copy_bw / 1e12,
        "permute": {"us": t_p * 1e6, "TBps": p_bytes / t_p / 1e12, "of_copy": p_bytes / t_p / copy_bw},
        "unpermute": {"us": t_u * 1e6, "TBps": u_bytes / t_u / 1e12, "of_copy": u_bytes / t_u / copy_bw},
        "torch_permute_us": t_torch_p * 1e6, "torch_unpermute_us": t_torch_u * 1e6,
        "plan_us": t_plan * 1e6, "plan_plus_permute_us": t_both * 1e6, "sweep": sweep,
        "nvshmem_stage": {"us": t_stage * 1e6, "of_copy": 2 * T * H * esz / t_stage / copy_bw},
        "nvshmem_layout_us": t_layout * 1e6,
    }
    print(f"GPU {res['gpu']}: copy ceiling {copy_bw / 1e12:.2f} TB/s (1 GiB, read+write)")
    print(f"rows in {N}, rows out {M} (EP{R}, {T} tok/rank, H {H}, top-{K} of {E}, pad {args.pad})"
          f"; Triton == torch path: {same}")
    for name in ("permute", "unpermute"):
        r = res[name]
        print(f"{name:9s} {r['us']:8.1f} us  {r['TBps']:5.2f} TB/s  {r['of_copy']:6.1%} of copy")
    print(f"torch path: permute {t_torch_p * 1e6:.1f} us, unpermute {t_torch_u * 1e6:.1f} us; "
          f"group_plan {t_plan * 1e6:.1f} us; plan+permute {t_both * 1e6:.1f} us")
    print(f"nvshmem dispatch before its sync: stage {t_stage * 1e6:.1f} us "
          f"({res['nvshmem_stage']['of_copy']:.1%} of copy), layout over {R} ranks "
          f"{t_layout * 1e6:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if same else 3


if __name__ == "__main__":
    raise SystemExit(main())
