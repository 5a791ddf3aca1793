#!/usr/bin/env bash
# The GPU checks session 11 could not finish (its device time ran out), in four calls on one GPU (`tests` twice, `bench`, `sweep`; each under 10 minutes):
#   1. the README's test command on the GPU box, one test file at a time (a file that hangs or fails is
#      named in OUT/pytest.log; session 11 fixed two GPU-box failures on CPU: the EP-layer tests now
#      spawn their workers, and bench.compile_check's CPU test pins --device cpu);
#   2. the Muon train-step share of both small presets with the committed defaults;
#   3. seeds 2 and 3 of the `small` convergence run with the Triton NS normalized through its Gram
#      matrix (session 11 ran seed 1 only: 3.6362; before the change 3.6312 / 3.6724 / 3.6203);
#   4. (`sweep`) small-moe's Muon time at train.muon_batch_numel 2^26 (default, 10 NS rounds per step)
#      and 2^28 (6 rounds: fewer launches, bigger temporaries), alternating, twice; then the Muon tests
#      on the GPU. (Session 13 also timed a fused update here, since removed: BENCHMARKS.md.)
# From the repository root:  OUT=dir bash benchmarks/scripts/gpu_checks.sh tests|bench|sweep
#   e.g. gpu_checks.sh tests 'tests/test_[a-l]*.py', then gpu_checks.sh tests 'tests/test_[m-z]*.py'
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
if [ "${1:-}" = tests ]; then  # optional 2nd argument: which files, e.g. 'tests/test_[a-l]*.py' (the
# whole suite took over 7 minutes on the GPU box: split it over two calls)
for f in ${2:-tests/test_*.py}; do
  timeout 240 python -m pytest -p no:cacheprovider -W ignore -o addopts="" -q --tb=short -rfE "$f" > "$OUT/$(basename "$f" .py).log" 2>&1
  echo "$f: rc $? $(tail -1 "$OUT/$(basename "$f" .py).log")" | tee -a "$OUT/pytest.log"
done
exit
fi
if [ "${1:-}" = sweep ]; then
for i in 1 2; do for bn in 67108864 268435456; do
  timeout 100 python -m moespeed.bench.train_step --presets small-moe --optimizers muon --steps 20 --warmup 6 \
    --set train.muon_batch_numel $bn --json "$OUT/sweep_${bn}_$i.json" 2>&1 | tail -1 | sed "s/^/batch_numel $bn: /"
done; done
timeout 60 python -m pytest -p no:cacheprovider -W ignore -o addopts="" -q --tb=short tests/test_muon.py 2>&1 | tail -3
exit
fi
timeout 150 python -m moespeed.bench.train_step --presets small,small-moe --optimizers muon --steps 15 --warmup 6 \
  --json "$OUT/train_step.json" 2>&1 | tail -3
for seed in 2 3; do
  timeout 100 python -m moespeed.bench.convergence --preset small --steps 500 --eval-every 50 --adamw-lrs "" --muon-lrs 3e-3 \
    --set data.batch_size 8 --set train.eval_batches 10 --set train.seed $seed --out-dir /tmp/conv_$seed 2>&1 \
    | grep "val loss" | tail -1 | sed "s/^/small seed $seed: /" | tee -a "$OUT/conv.log"
  cp /tmp/conv_$seed/convergence.json "$OUT/convergence_small_seed$seed.json"
done
