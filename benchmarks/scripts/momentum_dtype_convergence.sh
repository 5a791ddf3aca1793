#!/usr/bin/env bash
# Session 10 convergence runs (one H200; ~6 minutes): Muon with fp32 vs bf16 momentum buffers
# (train.muon_momentum_dtype) on `small` (seeds 1-3) and `small-moe` (seed 1), and the `poly` NS GEMM
# on `small` (seed 1). 500 steps of 8 x 1024 tokens, Muon lr 3e-3. From the repository root:
#   OUT=dir bash benchmarks/scripts/momentum_dtype_convergence.sh   # OUT/conv.log, OUT/convergence_*.json
# benchmarks/results/s10_convergence_momentum_dtype.json gathers the results.
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/momentum_dtype}; mkdir -p "$OUT"
conv() { # preset seed momentum_dtype ns_gemm timeout_s
  local d=/tmp/conv_$1_$2_$3_$4
  timeout "$5" python -m moespeed.bench.convergence --preset "$1" --steps 500 --eval-every 50 --adamw-lrs "" --muon-lrs 3e-3 \
    --set data.batch_size 8 --set train.eval_batches 10 --set train.seed "$2" --set train.muon_momentum_dtype "$3" \
    --set train.muon_ns_gemm "$4" --out-dir "$d" 2>&1 | grep "val loss" | tail -1 | sed "s/^/$1 seed $2 $3 $4: /" | tee -a "$OUT/conv.log"
  cp "$d/convergence.json" "$OUT/convergence_$1_seed$2_$3_$4.json"
}
for seed in 1 2 3; do
  conv small $seed float32 auto 240
  conv small $seed bfloat16 auto 120
done
conv small 1 float32 poly 120
conv small-moe 1 float32 auto 180
conv small-moe 1 bfloat16 auto 150
