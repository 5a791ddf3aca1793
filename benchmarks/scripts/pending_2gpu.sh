#!/usr/bin/env bash
# The two-GPU measurements issue #8 still needs, in one or two calls of the device tool's `nvidia-h200-x2`
# (they could not run in session 7: multi-GPU machines were withheld). From the repository root:
#   bash benchmarks/scripts/pending_2gpu.sh        # writes $OUT/*.json and $OUT/pending_2gpu.log
# Each bench run writes its own JSON (BENCHMARKING.md format); set "commit" to the commit that ran.
# Budget: 5 calls of ~2-4 min (compile) each: more than one 10-minute device call; split the lines over
# two calls if needed. The `--timeout` guards stop a hung run.
set -uo pipefail
export PYTHONPATH=$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # KINDS.md: no NVLink multicast
OUT=${OUT:-/tmp/pending_2gpu}; mkdir -p "$OUT"
bench() { python -m moespeed.bench.distributed --steps 20 --timeout 140 "$@" 2>&1 | tail -8 | tee -a "$OUT/pending_2gpu.log"; }
# one allocation: the 1-GPU base, DDP = 2 (session 5: 1.87x), EP = 2 allgather with compute/comm reordering
bench --cases 1gpu,ddp2,ep2_allgather --set train.compile_overlap true --json "$OUT/distributed_ep_overlap.json"
# the chunked dispatch: one piece's exchange overlaps the other piece's expert FFN
bench --cases ep2_allgather --set train.compile_overlap true --set train.ep_chunks 2 --json "$OUT/distributed_ep_chunks2.json"
bench --cases ep2_allgather --set train.ep_chunks 2 --json "$OUT/distributed_ep_chunks2_nooverlap.json"
# the masked-row dispatch/combine (train.ep_masked_rows; the EP layer check above already times it as
# ep2_allgather_masked), then with the chunks and reordering if it helps
bench --cases ep2_allgather --set train.compile_overlap true --set train.ep_masked_rows true --json "$OUT/distributed_ep_masked.json"
bench --cases ep2_allgather --set train.compile_overlap true --set train.ep_masked_rows true --set train.ep_chunks 2 --json "$OUT/distributed_ep_masked_chunks2.json"
