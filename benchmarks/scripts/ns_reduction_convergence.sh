#!/usr/bin/env bash
# Less Newton-Schulz work on small-moe (#6), and what it costs in loss: val loss after 500 steps of
# 8 x 1024 tokens (Muon lr 3e-3) for each NAME and SEED (one H200; a run is stopped after RUN_TIMEOUT = 200 s):
#   pe4  the presets' 4 Polar Express steps (singular values >= 3e-3 aimed at)
#   pe3  3 Polar Express steps aimed at >= 1e-2 (band [0.72, 1.28]): a quarter fewer NS FLOPs
#   fp8  the presets' steps, the first one's GEMMs on fp8 e4m3 (train.muon_ns_fp8_first_step)
# From the repository root:  OUT=dir SEEDS="1 2" NAMES="pe4 pe3 fp8" bash benchmarks/scripts/ns_reduction_convergence.sh
# Writes OUT/convergence_<PRESET>_<NAME>_seed<SEED>.json and OUT/conv.log (the last val loss line of each run).
# PRESET (small-moe) and STEPS (500) change the run, e.g. PRESET=quickstart-moe STEPS=20 for a CPU smoke test.
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/ns_reduction}; mkdir -p "$OUT"
declare -A OPTIONS=(
  [pe4]=""
  [pe3]="--set train.muon_ns_steps 3 --set train.muon_ns_lowest 1e-2"
  [fp8]="--set train.muon_ns_fp8_first_step true"
)
for seed in ${SEEDS:-1}; do for name in ${NAMES:-pe4 pe3 fp8}; do
  dir=/tmp/ns_reduction_${PRESET:-small-moe}_${name}_seed$seed
  timeout "${RUN_TIMEOUT:-200}" python -m moespeed.bench.convergence --preset "${PRESET:-small-moe}" --steps "${STEPS:-500}" --eval-every 50 \
    --adamw-lrs "" --muon-lrs 3e-3 --set data.batch_size 8 --set train.eval_batches 10 --set train.seed "$seed" \
    ${OPTIONS[$name]} --out-dir "$dir" > "$dir.log" 2>&1
  echo "$name seed $seed: rc $? $(grep "val loss" "$dir.log" | tail -1)" | tee -a "$OUT/conv.log"
  cp "$dir/convergence.json" "$OUT/convergence_${PRESET:-small-moe}_${name}_seed$seed.json" 2>/dev/null
done; done
