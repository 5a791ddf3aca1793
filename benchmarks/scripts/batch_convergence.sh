#!/usr/bin/env bash
# small-moe trained with Muon at different tokens per optimizer step, on equal tokens:
#   bash benchmarks/scripts/batch_convergence.sh BASE_STEPS NAME:GRAD_ACCUM:MUON_LR ...
# e.g. ... 400 b32k:1:3e-3 b64k:2:3e-3
# A run with grad_accum k (k x 32 x 1024 tokens per step) trains BASE_STEPS / k steps, warms up for 100 / k
# and evaluates every 50 / k steps, so every run sees the same tokens and is evaluated at the same token counts.
# Writes $OUT/convergence_<NAME>.json (or ./ when OUT is unset) after each run.
set -euo pipefail
base=$1; shift
out=${OUT:-.}
for spec in "$@"; do
  IFS=: read -r name accum lr <<<"$spec"
  start=$(date +%s)
  dir="/tmp/bc_${name}"
  rm -rf "$dir"
  python -m moespeed.bench.convergence --preset small-moe --steps $(( base / accum )) --eval-every $(( 50 / accum )) \
    --adamw-lrs "" --muon-lrs "$lr" --set train.grad_accum "$accum" --set train.warmup_steps $(( 100 / accum )) \
    --set train.eval_batches 10 --set data.cache_dir /tmp/bc_cache --out-dir "$dir" > "$dir.log" 2>&1 \
    || { tail -20 "$dir.log"; exit 1; }
  cp "$dir/convergence.json" "$out/convergence_${name}.json"
  echo "$name: $(tail -1 "$dir.log") ($(( $(date +%s) - start )) s)"
done
