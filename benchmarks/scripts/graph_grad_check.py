"""Gradients of a model whose MoE layers run as CUDA graphs, against the same model eager.

``torchrun --standalone --nproc-per-node 1 benchmarks/scripts/graph_grad_check.py [joint=1]
[both=1] [layers=N] [batch=B]``: builds the ``recipes/gpu_small.yaml`` model (bf16 autocast,
fp32 weights) twice from one seed, runs three training steps' forward + backward on each, and
prints per step the loss of each, the largest relative gradient difference over parameters,
and how many gradient entries are not finite. ``joint=1`` captures every layer of the second
model up front (``capture_moe_graphs``, what moe-train does); without it the second model runs
eagerly, and ``both=1`` says so explicitly (the noise floor of two eager runs). Session 5's
calls 7-10 ran an earlier form with a lazy per-layer capture and a ``mask=`` switch for
zeroing the grouped GEMM's unused rows; both were removed (NaN gradients; no effect).
"""
import sys

import torch
import torch.distributed as dist

from token_dispatcher import MoETokenDispatcher
from token_dispatcher.model import ModelConfig, MoETransformer, lm_loss


def build(cfg, budget, graph):
    d = MoETokenDispatcher(cfg.num_experts, backend="alltoall", max_rows_per_rank=budget)
    m = MoETransformer(cfg, d, seed=0).cuda()
    for lay in m.moe_layers():
        lay.enable_cuda_graph(graph)
    return m


def main():
    kw = dict(a.split("=") for a in sys.argv[1:])
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    cfg = ModelConfig(hidden=512, layers=int(kw.get("layers", 4)), heads=8, seq_len=512,
                      num_experts=16, top_k=2, ffn_hidden=1024, aux_loss_coeff=0.01,
                      z_loss_coeff=0.001)
    B = int(kw.get("batch", 16))
    budget = -(-int(1.25 * B * 512 * 2) // 256) * 256
    # both=1: two eager models (how far two identical eager runs differ: the noise floor).
    second = kw.get("both", "0") != "1"
    joint = kw.get("joint", "0") == "1"
    models = {"eager": build(cfg, budget, False),
              "graph": build(cfg, budget, second and not joint)}
    B_ = int(kw.get("batch", 16))
    if joint:  # capture every layer up front, in one call (MoETransformer.capture_moe_graphs)
        tok0 = torch.randint(0, 256, (B_, 512), device="cuda")
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            models["graph"].capture_moe_graphs(tok0)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        tok = torch.randint(0, 256, (B, 513), generator=g).cuda()
        res = {}
        for name, m in models.items():
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                out = m(tok[:, :-1])
            loss = lm_loss(out.logits_BSV, tok[:, 1:]) + out.aux_loss + out.z_loss
            loss.backward()
            if step == 0 and name == "graph":
                print("  router counts per layer:", out.tokens_per_expert_NE.tolist())
            res[name] = (float(loss), {n: p.grad for n, p in m.named_parameters()},
                         [int(s.item()) for s in out.statuses])
        (l0, g0, s0), (l1, g1, s1) = res["eager"], res["graph"]
        worst, bad, nonfinite = 0.0, "", 0
        for n in g0:
            a, b = g0[n], g1[n]
            if b is None or a is None:
                print(f"  step {step}: {n}: grad eager {a is not None} graph {b is not None}")
                continue
            nf = int((~torch.isfinite(b)).sum())
            nonfinite += nf
            if nf and step == 0:
                rows = (~torch.isfinite(b)).reshape(b.shape[0], -1).any(1).nonzero().flatten()
                print(f"  {n}: {nf} nonfinite of {b.numel()}, eager nonfinite "
                      f"{int((~torch.isfinite(a)).sum())}, dim0 slices {rows.tolist()[:20]}")
            fin = torch.isfinite(b)
            e = float((a - b)[fin].norm() / a.norm().clamp_min(1e-20))
            if e > worst:
                worst, bad = e, n
        print(f"step {step}: loss eager {l0:.6f} graph {l1:.6f} "
              f"status {s0} {s1} worst grad rel err {worst:.3g} ({bad}) nonfinite {nonfinite}",
              flush=True)
        with torch.no_grad():  # keep both models equal: same SGD step from the eager grads
            for (n, p0), (_, p1) in zip(models["eager"].named_parameters(),
                                        models["graph"].named_parameters()):
                if g0[n] is not None:
                    p0.add_(g0[n], alpha=-1e-3)
                    p1.copy_(p0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
