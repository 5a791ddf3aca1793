#!/usr/bin/env bash
# train.muon_cuda_graph on one GPU: its GPU tests, then the Muon time of small-moe with and without the
# graph, alternating, twice. From the repository root:  OUT=dir bash benchmarks/scripts/muon_cuda_graph.sh
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/muon_cuda_graph}; mkdir -p "$OUT"
timeout 200 python -m pytest -p no:cacheprovider -W ignore -o addopts="" -q --tb=short -rfE tests/test_muon_graph.py \
  tests/test_muon.py "tests/test_train.py::test_cuda_compiled_moe_training_matches_eager[muon_cuda_graph]" \
  > "$OUT/pytest.log" 2>&1
echo "tests: rc $? $(tail -1 "$OUT/pytest.log")"
for i in 1 2; do for graph in false true; do
  timeout 100 python -m moespeed.bench.train_step --presets small-moe --optimizers muon --steps 15 --warmup 6 \
    --set train.muon_cuda_graph $graph --json "$OUT/train_step_graph_${graph}_$i.json" 2>&1 | tail -1 \
    | sed "s/^/graph $graph run $i: /"
done; done
grep -h -o '"muon_graph_[a-z]*": [0-9]*' "$OUT"/train_step_graph_true_*.json | tr '\n' ' '
