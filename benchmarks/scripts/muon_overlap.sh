#!/usr/bin/env bash
# train.muon_overlap on one GPU: its GPU tests, then the Muon time of small-moe (and small) with and without
# the overlap, alternating, twice. "exposed" = step minus forward+backward alone (bench/train_step.py).
# From the repository root:  OUT=dir bash benchmarks/scripts/muon_overlap.sh [presets]
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/muon_overlap}; mkdir -p "$OUT"
timeout 200 python -m pytest -p no:cacheprovider -W ignore -o addopts="" -q --tb=short -rfE tests/test_muon_overlap.py \
  "tests/test_train.py::test_cuda_compiled_moe_training_matches_eager[muon_overlap]" > "$OUT/pytest.log" 2>&1
echo "tests: rc $? $(tail -1 "$OUT/pytest.log")"
for i in 1 2; do for overlap in false true; do
  timeout 120 python -m moespeed.bench.train_step --presets "${1:-small-moe}" --optimizers muon --steps 15 --warmup 6 \
    --set train.muon_overlap $overlap --json "$OUT/train_step_overlap_${overlap}_$i.json" 2>&1 | tail -2 \
    | sed "s/^/overlap $overlap run $i: /"
done; done
