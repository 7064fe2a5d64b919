"""Shared setup of the EP4 scripts in this folder (run under torchrun, one GPU per rank):
the DeepEP benchmark shape, the bench's input sets and Clock, and DeepEP's ``Buffer``
called directly (layout + dispatch + our permute), as the bench's reference rows do."""
import os

import torch
import torch.distributed as dist

from moe_dispatch.bench.timing import Clock
from moe_dispatch.bench.workload import Shape, build_sets
from moe_dispatch.permute import group_plan, permute

SHAPE = Shape(4096, 7168, 8, 256)
E = SHAPE.experts
DEEPEP_SMS = 24  # as the bench's --deepep-sms default


def setup(num_sets: int = 4):
    """(rank, R, sets, clock): NCCL group, this rank's input sets, the bench's Clock."""
    rank, lr = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(lr)
    dev = torch.device("cuda", lr)
    dist.init_process_group("nccl", device_id=dev)
    R = dist.get_world_size()
    return rank, R, build_sets(SHAPE, rank, R, 0, num_sets, dev), Clock(dev, dist.group.WORLD)


def deepep_buffer(R: int):
    """(buffer, dispatch config) of DeepEP V1 over the world group."""
    import deep_ep
    deep_ep.Buffer.set_num_sms(DEEPEP_SMS)
    dcfg = deep_ep.Buffer.get_dispatch_config(R)
    ccfg = deep_ep.Buffer.get_combine_config(R)
    nvl = max(c.get_nvl_buffer_size_hint(SHAPE.hidden * 2, R) for c in (dcfg, ccfg))
    return deep_ep.Buffer(dist.group.WORLD, nvl, 0, explicitly_destroy=True), dcfg


def direct_permute(buf, dcfg, st, L: int, idx_TK=None, after_layout=None):
    """DeepEP layout + dispatch of input set ``st``, then our permute into expert-grouped
    rows. ``idx_TK`` overrides the set's ids; ``after_layout(n_expert)`` runs between."""
    idx = st.idx_TK if idx_TK is None else idx_TK
    ntr, ntrr, nte, itir, _ = buf.get_dispatch_layout(idx, E)
    if after_layout is not None:
        after_layout(nte)
    rx, ri, rw, counts, _, _ = buf.dispatch(
        st.x_TH, num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=ntrr, is_token_in_rank=itir,
        num_tokens_per_expert=nte, topk_idx=idx, topk_weights=st.probs_TK, config=dcfg)
    return permute(rx, rw, group_plan(ri, L, tokens_per_expert=counts))
