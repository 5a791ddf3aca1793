#!/usr/bin/env bash
# The one-GPU Muon measurements issue #6 still needs after session 9 (its device time ran out), for
# one `nvidia-h200` (or H100) call of ~8 minutes. From the repository root:
#   bash benchmarks/scripts/pending_muon_gpu.sh     # writes $OUT/*.json and $OUT/pending_muon.log
# Set each JSON's "commit" to the commit that ran (the device copy's git HEAD may be older).
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/pending_muon}; mkdir -p "$OUT"
step() { timeout 200 python -m moespeed.bench.train_step --presets small-moe,small --optimizers muon --steps 15 --warmup 6 \
  "$@" 2>&1 | tail -3 | tee -a "$OUT/pending_muon.log"; }
# time: bf16 momentum buffers (train.muon_momentum_dtype), alone and with the poly NS GEMM, against the default
step --json "$OUT/ts_default.json"
step --set train.muon_momentum_dtype bfloat16 --json "$OUT/ts_bf16_momentum.json"
step --set train.muon_momentum_dtype bfloat16 --set train.muon_ns_gemm poly --json "$OUT/ts_bf16_momentum_poly.json"
# loss: small, 500 steps, seed 1, as in the session 8 Polar Express runs (3.0661 with fp32 momentum)
timeout 240 python -m moespeed.bench.convergence --preset small --steps 500 --eval-every 50 --adamw-lrs "" --muon-lrs 3e-3 \
  --set data.batch_size 8 --set train.eval_batches 10 --set train.seed 1 --set train.muon_momentum_dtype bfloat16 \
  --out-dir /tmp/pending_bf16_momentum 2>&1 | tail -1 | tee -a "$OUT/pending_muon.log"
cp /tmp/pending_bf16_momentum/convergence.json "$OUT/convergence_bf16_momentum_seed1.json" 2>/dev/null || true
