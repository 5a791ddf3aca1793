#!/usr/bin/env bash
# The GPU checks session 15 built but could not run (no device time left), in one call (~8 min on an H200):
#  1. the CUDA-graph Muon tests after the review fixes, train.adamw_side_stream's CUDA test, the fp8 NS tests,
#     and the small-moe train step with the presets' settings, with train.adamw_side_stream, with
#     train.muon_stack_batches 1, with train.muon_ns_fp8_first_step, alternating, twice;
#  2. the fp8 NS GEMM probe.
# From the repository root:  OUT=dir MOESPEED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/scripts/pending_gpu_s15.sh
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/pending_gpu_s15}; mkdir -p "$OUT"
TESTS=1 RUNS="${RUNS-1 2}" NAMES="graph adamw_side stack1 fp8" OUT=$OUT bash benchmarks/scripts/muon_cuda_graph.sh
timeout 120 python benchmarks/scripts/ns_fp8_probe.py --json "$OUT/ns_fp8_probe.json" > "$OUT/ns_fp8_probe.log" 2>&1
echo "fp8 probe: rc $?"; grep -o "{'case'.*" "$OUT/ns_fp8_probe.log"
