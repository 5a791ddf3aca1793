#!/usr/bin/env bash
# Muon's Newton-Schulz schedules compared on the convergence bench (small preset, 500 steps, Muon 3e-3 only):
#   bash benchmarks/scripts/polar_express_convergence.sh SEED NAME:COEFFICIENTS:STEPS:LOWEST ...
# e.g. ... 1 std5:standard:5:1e-3 pe5:polar_express:5:1e-3 pe4:polar_express:4:1e-3
# Writes $OUT/convergence_<NAME>_seed<SEED>.json (or ./ when OUT is unset) after each run.
set -euo pipefail
seed=$1; shift
out=${OUT:-.}
for spec in "$@"; do
  IFS=: read -r name coefficients steps lowest <<<"$spec"
  start=$(date +%s)
  dir="/tmp/pe_${name}_seed${seed}"
  rm -rf "$dir"
  python -m moespeed.bench.convergence --preset small --steps 500 --eval-every 50 --adamw-lrs "" --muon-lrs 3e-3 \
    --set data.batch_size 8 --set train.eval_batches 10 --set train.seed "$seed" --set data.cache_dir /tmp/pe_cache \
    --set train.muon_ns_coefficients "$coefficients" --set train.muon_ns_steps "$steps" --set train.muon_ns_lowest "$lowest" \
    --out-dir "$dir" > "$dir.log" 2>&1 || { tail -20 "$dir.log"; exit 1; }
  cp "$dir/convergence.json" "$out/convergence_${name}_seed${seed}.json"
  echo "$name seed $seed: $(tail -1 "$dir.log") ($(( $(date +%s) - start )) s)"
done
