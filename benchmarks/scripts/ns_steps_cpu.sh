#!/usr/bin/env bash
# Fewer Newton-Schulz steps on the CPU quickstart (#6): val loss after the preset's 300 steps for each NAME and SEED
#   std5  the quickstart presets' 5 standard steps
#   pe4   the small presets' 4 Polar Express steps (singular values >= 3e-3 aimed at)
#   pe3   3 Polar Express steps aimed at >= 1e-2 (band [0.72, 1.28])
# From the repository root:  OUT=dir SEEDS="1 2" NAMES="std5 pe4 pe3" bash benchmarks/scripts/ns_steps_cpu.sh
# Writes OUT/ns_steps.log (each run's command and its last val loss line); PRESET (quickstart-moe) picks the model.
set -uo pipefail
OUT=${OUT:-/tmp/ns_steps_cpu}; mkdir -p "$OUT"
declare -A OPTIONS=(
  [std5]="--train.muon_ns_coefficients standard --train.muon_ns_steps 5"
  [pe4]="--train.muon_ns_coefficients polar_express --train.muon_ns_steps 4 --train.muon_ns_lowest 3e-3"
  [pe3]="--train.muon_ns_coefficients polar_express --train.muon_ns_steps 3 --train.muon_ns_lowest 1e-2"
)
for seed in ${SEEDS:-1 2}; do for name in ${NAMES:-std5 pe4 pe3}; do
  dir=$OUT/${PRESET:-quickstart-moe}_${name}_seed$seed; rm -rf "$dir"; start=$(date +%s)
  cmd="moespeed train --preset ${PRESET:-quickstart-moe} --train.seed $seed --train.run_dir $dir ${OPTIONS[$name]}"
  $cmd > "$dir.log" 2>&1
  echo "$name seed $seed: rc $? $(grep "val loss" "$dir.log" | tail -1) ($(( $(date +%s) - start )) s)  [$cmd]" | tee -a "$OUT/ns_steps.log"
done; done
