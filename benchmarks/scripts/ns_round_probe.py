"""Probe: GPU time of small-moe's expert Newton–Schulz at several round sizes (`train.muon_batch_numel`),
without the CPU in the way.

    python benchmarks/scripts/ns_round_probe.py --json out.json

The expert blocks of `small-moe` (1408 x (256, 768), 4 polar_express steps) are orthogonalized in
rounds of at most N elements, as Muon does; each configuration is timed twice: eagerly (CUDA events
around 10 back-to-back repetitions: CPU launch time shows if it exceeds the GPU's) and as one CUDA
graph replayed 10 times (GPU time only). The question: do rounds small enough for a round's bf16
stack (2 B per element) to stay in the L2 cache between an NS step's GEMMs pay, once launch costs
are out of the picture?
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch

from moespeed.bench.common import git_commit
from moespeed.optim.muon_plan import round_sizes
from moespeed.optim.newton_schulz import EPS, _orthogonalize_, ns_flops
from moespeed.optim.polar_express import polar_express_coefficients


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=1408)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=768)
    p.add_argument("--log2-numel", default="21,22,23,24,25,26,27")
    p.add_argument("--gemms", default="triton,poly,torch")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device("cuda")
    steps, coefficients = 4, polar_express_coefficients(4, 3e-3)
    stack = torch.randn(args.blocks, args.rows, args.cols, device=device, dtype=torch.bfloat16)
    flops = args.blocks * ns_flops(args.rows, args.cols, steps)
    rows = []
    for gemm in args.gemms.split(","):
        for log2 in map(int, args.log2_numel.split(",")):
            per_round = max(1, 2**log2 // (args.rows * args.cols))
            sizes = round_sizes(args.blocks, per_round)

            def run():
                start = 0
                for size in sizes:
                    _orthogonalize_(stack[start:start + size], steps, coefficients, EPS, gemm)
                    start += size

            run()  # compile and autotune outside the timing and the capture
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(args.reps):
                run()
            e1.record()
            torch.cuda.synchronize()
            eager = e0.elapsed_time(e1) / args.reps
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            torch.cuda.synchronize()
            e0.record()
            for _ in range(args.reps):
                graph.replay()
            e1.record()
            torch.cuda.synchronize()
            replay = e0.elapsed_time(e1) / args.reps
            del graph
            torch.cuda.empty_cache()
            row = {"gemm": gemm, "batch_numel": 2**log2, "rounds": len(sizes), "round_mib": sizes[0] * args.rows * args.cols * 2 / 2**20,
                   "eager_ms": eager, "graph_ms": replay, "graph_tflops": flops / replay / 1e9}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(short=True),
                       "date": datetime.date.today().isoformat(),
                       "l2_mib": torch.cuda.get_device_properties(device).L2_cache_size / 2**20,
                       "command": "python benchmarks/scripts/ns_round_probe.py", "shape": [args.blocks, args.rows, args.cols],
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
