"""Per-layer budget-mode statuses of CUDA-graphed MoE layers, step by step (EP1 debugging).

``torchrun --standalone --nproc-per-node 1 benchmarks/scripts/graph_status_debug.py``:
prints each layer's status and the dispatcher's check flag for eager and graphed runs,
with and without autocast, so a status that differs between the two can be located.
"""
import torch
import torch.distributed as dist

from token_dispatcher import MoETokenDispatcher
from token_dispatcher.layer import MoELayer


def run(graph: bool, amp: bool, layers_n: int, T: int = 4096, check_inputs: bool = True,
        shared: bool = True, backend: str = "alltoall"):
    dev = torch.device("cuda", 0)

    def disp():
        return MoETokenDispatcher(16, backend=backend, max_rows_per_rank=T * 2 + 2048,
                                  check_inputs=check_inputs)
    d = disp()
    torch.manual_seed(0)
    layers = [MoELayer(512, 1024, 16, 2, dispatcher=d if shared else disp()).to(dev)
              for _ in range(layers_n)]
    for lay in layers:
        lay.enable_cuda_graph(graph)
    x = torch.randn(T, 512, device=dev, requires_grad=True)
    for step in range(4):
        with torch.autocast("cuda", torch.bfloat16, enabled=amp, cache_enabled=False):
            h, sts = x, []
            for lay in layers:
                m = lay(h)
                h = m.output
                sts.append(m.status)
        vals = [int(s.item()) for s in sts]
        h.float().square().mean().backward()
        print(f"graph={graph} amp={amp} layers={layers_n} check={check_inputs} step {step}: "
              f"statuses {vals}", flush=True)


if __name__ == "__main__":
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    import sys
    import traceback
    case = sys.argv[1:]
    kw = dict(graph=True, amp=True, layers_n=2)
    for item in case:
        k, v = item.split("=")
        kw[k] = v if k == "backend" else (int(v) if k in ("layers_n", "T") else v == "1")
    try:
        run(**kw)
    except Exception as exc:
        print(f"{kw}: {type(exc).__name__}: {exc}", flush=True)
        print("".join(traceback.format_exc().splitlines(True)[-14:]), flush=True)
    dist.destroy_process_group()
