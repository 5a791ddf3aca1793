#!/usr/bin/env bash
# train.muon_ns_gemm = tma on one GPU: the Muon GPU tests, the GEMM/NS probe (ns_tma_probe.py), then
# small-moe's Muon time in the train step with auto (the Triton GEMM) and tma, alternating (RUNS="1 2"
# pairs; PRESETS picks presets). TESTS=0 and PROBE=0 skip those parts.
# From the repository root:  OUT=dir MOESPEED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/scripts/ns_tma_gpu.sh
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/ns_tma}; mkdir -p "$OUT"
if [ "${TESTS:-1}" = 1 ]; then
  timeout 300 python -m pytest -p no:cacheprovider -W ignore -o addopts="" -q --tb=short -rfE tests/test_muon_graph.py \
    tests/test_muon.py > "$OUT/pytest.log" 2>&1
  echo "tests: rc $? $(tail -1 "$OUT/pytest.log")"
fi
if [ "${PROBE:-1}" = 1 ]; then
  timeout 300 python benchmarks/scripts/ns_tma_probe.py > "$OUT/ns_tma_probe.log" 2>&1; echo "probe: rc $?"
  cat "$OUT/ns_tma_probe.log" | grep -v Warning
fi
for i in ${RUNS-1}; do for preset in ${PRESETS:-small-moe}; do for gemm in auto tma; do
  timeout 150 python -m moespeed.bench.train_step --presets $preset --optimizers muon --steps 15 --warmup 6 \
    --set train.muon_ns_gemm $gemm --json "$OUT/train_step_${preset}_${gemm}_$i.json" 2>&1 | tail -1 | sed "s/^/$preset $gemm run $i: /"
done; done; done
