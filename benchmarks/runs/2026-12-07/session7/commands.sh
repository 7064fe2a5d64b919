#!/usr/bin/env bash
# Device call A (session 7): GPU tests of the new kernels, bench small (exact + budget, megatron-a2a beside),
# step graph host, moe-train eager vs step graph, FP8 quantise sweep, FP8 vs BF16 curves; hard deadline $DL s.
DL=${DL:-430}
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; python3 -c "import megatron.core as m;print('mcore',m.__version__)"; } > $R/env.txt 2>&1
T0=$(date +%s); tick() { echo "$1 rc $2 t=$(( $(date +%s)-T0 ))" >> $R/times.txt; }
cap() { local want=$1 left=$(( DL - ($(date +%s)-T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $want ] && echo $left || echo $want; }
timeout $(cap 110) torchrun --standalone --nproc-per-node 1 -m moe_dispatch.bench --shape small --backends alltoall,allgather,nvshmem --budget --check --iters 20 --warmup 5 --no-layer --json "$R/bench-{shape}.json" > $R/bench.txt 2>&1; tick bench $?
timeout $(cap 45) python3 benchmarks/scripts/step_graph_host.py --iters 10 --json $R/sgh.json > $R/sgh.txt 2>&1; tick sgh $?
TR="python3 -m token_dispatcher.train recipes/gpu_small.yaml --nproc 1 --no-progress --set train.plot=false"
for mode in step eager; do
  g=""; [ $mode != eager ] && g="--set train.cuda_graph=true --set train.cuda_graph_scope=$mode"
  timeout $(cap 40) $TR --steps 100 --out $R/g_$mode --set max_rows_per_rank=81920 $g > $R/g_$mode.txt 2>&1; tick g_$mode $?
  rm -rf $R/g_$mode/checkpoint*
done
timeout $(cap 60) python3 -m pytest -q -x tests/test_gpu_exact_fused.py tests/test_kernels.py -k "exact or layout or static" > $R/gpu_tests.txt 2>&1; tick tests $?
timeout $(cap 45) python3 benchmarks/scripts/fp8_kernels.py --sweep quant --sweep-kernels quantise --rounds 5 --json $R/fp8_sweep.json > $R/fp8_sweep.txt 2>&1; tick fp8 $?
for w in fp8 bf16 fp8; do
  [ $(cap 40) -lt 40 ] && break
  n=$(ls -d $R/train_${w}_* 2>/dev/null | wc -l)
  timeout $(cap 60) $TR --out $R/train_${w}_$n --set train.log_every=5 $([ $w = fp8 ] && echo --set wire_dtype=fp8) > $R/train_${w}_$n.txt 2>&1; tick train_${w}_$n $?
  rm -rf $R/train_${w}_$n/checkpoint*
done
cd $OUT && tar czf r.tgz r && rm -rf r
