"""Benchmark of every dispatch backend side by side: ``python -m moe_dispatch.bench``.

Dispatch and combine are timed separately (median of CUDA-event timings after warm-up, with
rotating input sets and an L2 flush per call) and reported in µs and GB/s counted the way
DeepEP counts (rows received, local rows included, × hidden × bytes per element), together
with the MoE-layer forward+backward throughput. Reference rows from DeepEP's ``Buffer``
called directly and from Megatron-Core's alltoall dispatcher appear when those libraries
import. See BENCHMARKS.md for recorded runs and the commands that produced them.
"""
from .cli import main, parse_args, run

__all__ = ["main", "parse_args", "run"]
