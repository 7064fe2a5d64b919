#!/usr/bin/env bash
# Session 9 (2026-12-08), development CPU only (AMD EPYC, 2 cores, Python 3.11, torch 2.13.0+cpu,
# Triton 3.8.0); no GPU was lent. Old trees: `git archive <commit> moe_dispatch token_dispatcher`.
set -e
for c in 0bd2a31 fa3e6a3; do mkdir -p /tmp/trees/$c && git archive $c moe_dispatch token_dispatcher | tar -x -C /tmp/trees/$c; done
D=benchmarks/runs/2026-12-08/session9
python3 benchmarks/scripts/host_python_cpu.py --trees /tmp/trees/0bd2a31,$PWD --iters 80 --json $D/host_python_vs_0bd2a31.json > $D/host_python_vs_0bd2a31.txt
python3 benchmarks/scripts/host_python_cpu.py --trees /tmp/trees/fa3e6a3,$PWD --iters 80 --json $D/host_python_vs_fa3e6a3.json > $D/host_python_vs_fa3e6a3.txt
python3 benchmarks/scripts/launch_key_cpu.py --trees /tmp/trees/fa3e6a3,/tmp/trees/0bd2a31,$PWD --json $D/launch_key_run1.json > $D/launch_key_run1.txt  # and again: _run2
python3 benchmarks/scripts/budget_launches_cpu.py alltoall --exact > $D/exact_launches_cpu.txt; python3 benchmarks/scripts/budget_launches_cpu.py allgather --exact >> $D/exact_launches_cpu.txt
python3 benchmarks/scripts/host_python_cpu.py --backends alltoall --modes exact --sections --iters 80 --json $D/alltoall_exact_steps.json > $D/alltoall_exact_steps.txt
