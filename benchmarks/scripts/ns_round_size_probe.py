"""Does a smaller Newton–Schulz round pay on the GPU? (L2 residency against launch count.)

small-moe's NS products are short-K (K = 256 or 768) and move as many bytes as they compute: at the
default round of 2^26 elements (341 expert blocks, 134 MB per X) every product streams its operands
from HBM. A round of a few dozen blocks (X, A, B and the next X under ~25 MB) could keep them in L2
between the four steps, at the price of more, smaller launches. This probe times NS (4 Polar Express
steps, as the presets run it) on all 704 expert blocks of one orientation, cut into rounds of R blocks,
the rounds spread over S CUDA streams, everything captured in one CUDA graph and replayed (as
train.muon_cuda_graph runs Muon). GPU time per call of the whole set; every variant's result is
checked against the one-round result.
From the repository root: PYTHONPATH=$PWD python benchmarks/scripts/ns_round_size_probe.py  (writes $OUT/ns_round_size_probe.json)
"""
import json
import os

import torch
import triton

from moespeed.bench.common import git_commit
from moespeed.optim import newton_schulz as NS
from moespeed.optim.polar_express import polar_express_coefficients

BLOCKS = 704  # small-moe: 11 MoE layers x 64 experts, one orientation
SHAPES = [(256, 768), (768, 256)]
ROUNDS = [704, 341, 170, 85, 43, 22]  # blocks per round (341 = the default 2^26 elements)
STREAMS = [1, 2, 3]


def run_rounds(X: torch.Tensor, per_round: int, streams: list, gemm: str, coefficients) -> None:
    """NS in place on X (n, rows, cols), `per_round` matrices per call, round i on streams[i % S]."""
    main = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(main)
    for i, start in enumerate(range(0, X.shape[0], per_round)):
        with torch.cuda.stream(streams[i % len(streams)]):
            NS._orthogonalize_(X[start:start + per_round], 4, coefficients, NS.EPS, gemm)
    for s in streams:
        main.wait_stream(s)


def graph_time(fn, reps: int = 3) -> float:
    """GPU ms per call of fn, `reps` calls captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up: autotuning, compilation
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * reps)


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": os.environ.get("MOESPEED_COMMIT") or git_commit(),
           "command": "PYTHONPATH=$PWD python benchmarks/scripts/ns_round_size_probe.py",
           "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size, "rows": []}
    coefficients = polar_express_coefficients(4, 3e-3)
    pool = [torch.cuda.Stream() for _ in range(max(STREAMS))]
    g = torch.Generator(device="cuda").manual_seed(0)
    gemm = os.environ.get("GEMM", "tma")
    for rows, cols in SHAPES:
        X0 = torch.randn(BLOCKS, rows, cols, device="cuda", generator=g).bfloat16()
        X = X0.clone()
        ref = X0.clone()
        NS._orthogonalize_(ref, 4, coefficients, NS.EPS, gemm)
        for per_round in ROUNDS:
            for n_streams in STREAMS:
                if per_round == BLOCKS and n_streams > 1:
                    continue
                streams = pool[:n_streams]
                ms = graph_time(lambda: (X.copy_(X0), run_rounds(X, per_round, streams, gemm, coefficients)))
                X.copy_(X0)
                run_rounds(X, per_round, streams, gemm, coefficients)
                torch.cuda.synchronize()
                err = ((X.float() - ref.float()).norm() / ref.float().norm()).item()
                row = {"shape": [rows, cols], "blocks": BLOCKS, "per_round": per_round, "streams": n_streams,
                       "gemm": gemm, "ms": ms, "diff_vs_one_round": err}
                out["rows"].append(row)
                print(f"{rows}x{cols} x{BLOCKS} rounds of {per_round} on {n_streams} streams: {ms:.3f} ms "
                      f"(diff {err:.1e})", flush=True)
        copy_ms = graph_time(lambda: X.copy_(X0))
        out["rows"].append({"shape": [rows, cols], "copy_ms": copy_ms})
        print(f"  (the X copy included above: {copy_ms:.3f} ms)", flush=True)
        del X0, X, ref
    with open(os.path.join(os.environ.get("OUT", "."), "ns_round_size_probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
