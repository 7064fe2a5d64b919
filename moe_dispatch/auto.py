"""``backend="auto"``: pick a backend from the topology and what is installed.

The rule is written from measurements (``python -m moe_dispatch.bench``; BENCHMARKS.md), at
first from the anchors measured on a 4xH200 NVLink host at DeepEP's benchmark shape
(4096 tokens/rank, hidden 7168, top-8 of 256 experts, BF16):

* DeepEP's fused kernels dispatch in ~526 µs where the unfused NCCL path (counts, host
  sync, gather, ``all_to_all_single``) needs 1.10-1.17 ms: on GPUs that reach each other
  over NVLink a fused backend wins by ~2x, and the project's native fused backend
  (``nvshmem``, nothing to install beyond PyTorch) is built to match or beat DeepEP there.
* DeepEP's intranode kernels need every pair of GPUs to be peer-accessible, and its
  internode kernels need NVSHMEM; without those, NCCL's all-to-all is the fast path left.
* On the CPU only the torch.distributed backends run; ``alltoall`` moves ~2.2x fewer bytes
  than one row per (token, expert) and less than ``allgather`` beyond 2 ranks.

So: intranode NVLink -> nvshmem, else deepep, else alltoall; multi-node -> deepep when its
build has NVSHMEM, else alltoall; CPU -> alltoall. The choice and the reason are logged.
``auto`` only ever applies when the caller asked for it: an explicit backend name is used
as given.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """What the rule looks at; ``detect_topology`` measures it, tests inject it.

    device_type:      "cuda" or "cpu" (the device the EP group's collectives run on).
    group_size:       ranks in the EP group.
    num_nodes:        distinct hosts in the EP group.
    gpus_per_node:    GPUs visible on this host.
    peer_access:      True when, on every host, every pair of GPUs its ranks use can access
                      each other directly (NVLink or PCIe P2P; ``torch.cuda.can_device_access_peer``),
                      False when some pair cannot, None when it could not be checked.
    deepep_internode: DeepEP's build has NVSHMEM (needed for its internode kernels).
    available:        backend name -> "available" or the reason it is not (every rank's
                      view combined: a backend counts only if it is available everywhere).
    """

    device_type: str
    group_size: int
    num_nodes: int = 1
    gpus_per_node: int = 0
    peer_access: Optional[bool] = None
    deepep_internode: bool = False
    available: Dict[str, str] = field(default_factory=dict)


def choose_backend(group=None, device: Optional[torch.device] = None) -> Tuple[str, str]:
    """Return ``(backend name, reason)`` for the EP group ``group`` on ``device``.

    group:  the EP process group (None = WORLD when distributed, else one process).
    device: the device the dispatcher's tensors live on (None: CUDA if the group is NCCL).
    Collective when distributed (one small all-gather), so every rank must call it, and
    every rank gets the same answer.
    """
    topo = detect_topology(group, device)
    name, why = rule(topo)
    log.info("moe_dispatch auto backend: %s (%s)", name, why)
    return name, why


def rule(topo: Topology) -> Tuple[str, str]:
    """The decision, a pure function of the topology facts."""
    ok = {n for n, v in topo.available.items() if v == "available"}

    def have(n: str) -> bool:
        return n in ok

    if topo.device_type != "cuda":
        return "alltoall", ("CPU: only the torch.distributed backends run; alltoall sends each "
                            "token once per destination rank")
    if topo.group_size <= 1:
        return "alltoall", "one rank: no communication, alltoall only permutes locally"
    if topo.num_nodes > 1:
        if have("deepep") and topo.deepep_internode:
            return "deepep", (f"{topo.num_nodes} nodes: DeepEP internode kernels (NVLink inside a "
                              "node, RDMA via NVSHMEM across)")
        why = ("DeepEP is not available" if not have("deepep")
               else "DeepEP was built without NVSHMEM, so it has no internode kernels")
        return "alltoall", f"{topo.num_nodes} nodes and {why}: NCCL all-to-all"
    if topo.peer_access is False:
        return "alltoall", ("GPUs of this host cannot all reach each other peer-to-peer, which the "
                            "fused intranode kernels need: NCCL all-to-all")
    where = ("GPUs peer-accessible" if topo.peer_access else "peer access not verifiable")
    if have("nvshmem"):
        return "nvshmem", f"one node, {topo.group_size} {where}: native fused kernels over NVLink"
    if have("deepep"):
        return "deepep", (f"one node, {topo.group_size} {where}: DeepEP intranode kernels "
                          "(~2x the unfused NCCL path on 4xH200)")
    return "alltoall", (f"one node, {topo.group_size} {where}, but neither nvshmem nor deepep "
                        "is available: NCCL all-to-all")


# ----------------------------------------------------------------------------- detection

def _peer_access(devices) -> Optional[bool]:
    try:
        for a in devices:
            for b in devices:
                if a != b and not torch.cuda.can_device_access_peer(a, b):
                    return False
        return True
    except Exception:
        return None


def _deepep_internode() -> bool:
    """Whether the installed DeepEP has internode (NVSHMEM/RDMA) kernels. Asked of the
    library itself: its RDMA size hint raises when they were compiled out
    (``is_sm90_compiled()`` is no proxy: an SM90 build without NVSHMEM says True)."""
    try:
        import deep_ep
        cfg = deep_ep.Buffer.get_dispatch_config(16)
        cfg.get_rdma_buffer_size_hint(7168 * 2, 16)
        return True
    except Exception:
        return False


def _local_facts(device_type: str) -> dict:
    from .registry import available_backends

    gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return dict(host=socket.gethostname(), gpus=gpus, local_world=local_world,
                peer=_host_peer_access(gpus, local_world) if device_type == "cuda" else None,
                available=available_backends(),
                deepep_internode=_deepep_internode() if device_type == "cuda" else False)


def _host_peer_access(gpus: int, local_world: int) -> Optional[bool]:
    """Peer access among the GPUs this host's ranks use (devices 0..LOCAL_WORLD_SIZE-1, as
    torchrun assigns them). None when they are not all visible to this process (e.g. one
    GPU per process through CUDA_VISIBLE_DEVICES)."""
    n = local_world or 1
    if n == 1:
        return True
    if gpus < n:
        return None
    return _peer_access(list(range(n)))


def detect_topology(group=None, device: Optional[torch.device] = None) -> Topology:
    """Measure the facts ``rule`` needs, agreed across the group (one all-gather), so
    that every rank of the group reaches the same decision."""
    distributed = dist.is_available() and dist.is_initialized()
    if group is None and distributed:
        group = dist.group.WORLD
    if device is None:
        device = torch.device("cuda") if (distributed and dist.get_backend(group) == "nccl") \
            else torch.device("cpu")
    mine = _local_facts(device.type)
    if distributed and dist.get_world_size(group) > 1:
        facts = [None] * dist.get_world_size(group)
        dist.all_gather_object(facts, mine, group=group)
    else:
        facts = [mine]
    return combine_facts(facts, device.type)


def combine_facts(facts, device_type: str) -> Topology:
    """Every rank's local facts -> one ``Topology`` (pure, and the same on every rank).

    facts: per rank ``dict(host, gpus, local_world, peer, available, deepep_internode)``;
           ``peer`` is that rank's view of peer access on its host (True/False/None).
    """
    hosts = [f["host"] for f in facts]
    num_nodes = len(set(hosts))
    # A launcher-reported node size smaller than the group also means several nodes
    # (hostnames can coincide in containers).
    lws = [f["local_world"] for f in facts if f["local_world"]]
    if lws and min(lws) < len(facts):
        num_nodes = max(num_nodes, -(-len(facts) // min(lws)))
    peers = [f["peer"] for f in facts]
    if device_type != "cuda":
        peer = None
    elif any(p is False for p in peers):
        peer = False
    elif any(p is None for p in peers):
        peer = None
    else:
        peer = True
    names = set().union(*(f["available"] for f in facts))
    available = {}
    for n in sorted(names):
        bad = [f["available"].get(n, "not registered") for f in facts
               if f["available"].get(n) != "available"]
        available[n] = "available" if not bad else bad[0]
    return Topology(device_type=device_type, group_size=len(facts), num_nodes=num_nodes,
                    gpus_per_node=max(f["gpus"] for f in facts), peer_access=peer,
                    deepep_internode=all(f["deepep_internode"] for f in facts),
                    available=available)
