#!/usr/bin/env bash
# train.muon_cuda_graph on one GPU: its GPU tests, then small-moe's Muon time in the train step for each
# variant, alternating, twice (one allocation: hosts differ a lot between allocations); then, with
# SLOW_RUNS="1 2", the same on an emulated slow host. TESTS=0 skips the tests, RUNS="" the normal runs,
# NAMES picks variants (plain graph graph_poly27 adamw_side stack1 fp8 ns3), e.g. NAMES="graph adamw_side stack1 fp8"
# times train.adamw_side_stream, train.muon_stack_batches 1 and train.muon_ns_fp8_first_step against the
# presets' settings; ns3 is 3 Polar Express steps aimed at singular values >= 1e-2 instead of 4 at >= 3e-3.
# From the repository root:  OUT=dir MOESPEED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/scripts/muon_cuda_graph.sh
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/muon_cuda_graph}; mkdir -p "$OUT"
if [ "${TESTS:-1}" = 1 ]; then
  timeout 240 python -m pytest -p no:cacheprovider -W ignore -o addopts="" -q --tb=short -rfE tests/test_muon_graph.py \
    tests/test_muon.py tests/test_ns_fp8.py "tests/test_train.py::test_cuda_compiled_moe_training_matches_eager[muon_cuda_graph]" \
    > "$OUT/pytest.log" 2>&1
  echo "tests: rc $? $(tail -1 "$OUT/pytest.log")"
fi
declare -A VARIANTS=(  # the small presets set train.muon_cuda_graph = true since session 15
  [plain]="--set train.muon_cuda_graph false"
  [graph]="--set train.muon_cuda_graph true"
  [graph_poly27]="--set train.muon_cuda_graph true --set train.muon_ns_gemm poly --set train.muon_batch_numel 134217728"
  [adamw_side]="--set train.muon_cuda_graph true --set train.adamw_side_stream true"
  [stack1]="--set train.muon_cuda_graph true --set train.muon_stack_batches 1"
  [fp8]="--set train.muon_cuda_graph true --set train.muon_ns_fp8_first_step true"
  [ns3]="--set train.muon_cuda_graph true --set train.muon_ns_steps 3 --set train.muon_ns_lowest 1e-2"
)
for i in ${RUNS-1 2}; do for name in ${NAMES:-plain graph graph_poly27}; do
  timeout 120 python -m moespeed.bench.train_step --presets small-moe --optimizers muon --steps 15 --warmup 6 \
    ${VARIANTS[$name]} --json "$OUT/train_step_${name}_$i.json" 2>&1 | tail -1 | sed "s/^/$name run $i: /"
done; done
# An emulated slow host (BURNERS busy loops share one core with all of the bench's threads; see slow_host_train_step.py)
for i in ${SLOW_RUNS:-}; do for name in ${NAMES:-plain graph graph_poly27}; do
  timeout 240 python benchmarks/scripts/slow_host_train_step.py --burners ${BURNERS:-1} --presets small-moe \
    --optimizers muon --steps 15 --warmup 6 ${VARIANTS[$name]} --json "$OUT/slow_${BURNERS:-1}_${name}_$i.json" \
    2>&1 | tail -1 | sed "s/^/slow host (${BURNERS:-1} burners): $name run $i: /"
done; done
grep -H -o '"muon_graph_[a-z]*": [0-9]*' "$OUT"/*graph*.json
