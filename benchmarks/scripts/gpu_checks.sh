#!/usr/bin/env bash
# The GPU checks session 10 could not run (its device time ran out), for one ~6-minute call on one GPU:
#   1. the README's test command on the GPU box (session 10 changed how the CPU tests pick their device
#      and start their worker processes there, and moved Muon's step plan into muon_plan.py);
#   2. the Muon train-step share of both small presets with the committed defaults.
# From the repository root:  OUT=dir bash benchmarks/scripts/gpu_checks.sh   (OUT/pytest.log, OUT/train_step.json)
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
timeout 420 python -m pytest -p no:cacheprovider -W ignore -rfE > "$OUT/pytest.log" 2>&1
tail -15 "$OUT/pytest.log"
timeout 150 python -m moespeed.bench.train_step --presets small,small-moe --optimizers muon --steps 15 --warmup 6 \
  --json "$OUT/train_step.json" 2>&1 | tail -3
