#!/usr/bin/env bash
# Session 16 had no device time. After pending_gpu_s15.sh (its own call), this second call measures the
# algorithmic cuts of small-moe's Newton-Schulz work (#6):
#  1. Muon's time in the small-moe train step with 3 Polar Express steps (ns3) against the presets' 4,
#     alternating, twice (muon_cuda_graph.sh, no tests);
#  2. small-moe val loss after 500 steps, seed 1: the presets' 4 steps, 3 steps, the fp8 first step
#     (ns_reduction_convergence.sh).
# From the repository root:  OUT=dir MOESPEED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/scripts/pending_gpu_s16.sh
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/pending_gpu_s16}; mkdir -p "$OUT"
TESTS=0 RUNS="${RUNS-1 2}" NAMES="graph ns3" OUT=$OUT bash benchmarks/scripts/muon_cuda_graph.sh
SEEDS="${SEEDS-1}" NAMES="pe4 pe3 fp8" OUT=$OUT bash benchmarks/scripts/ns_reduction_convergence.sh
