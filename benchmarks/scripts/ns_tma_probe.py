"""The persistent TMA NS GEMM (`_addmm_tma`) against the Triton one (`_addmm_triton`) and cuBLAS on
small-moe's NS shapes, and whole NS per class with each GEMM (GPU, Hopper or later).

Every time is GPU time per call, the calls replayed from a CUDA graph (as train.muon_cuda_graph runs
them). For each product shape: every TMA config forced on its own (time, and its error against fp32 products),
the autotuned pick of both Triton kernels, cuBLAS bmm (no D) and baddbmm. Then `_orthogonalize_` (4 Polar
Express steps, as the presets run it) per class with gemm triton / tma / poly.
From the repository root: PYTHONPATH=$PWD python benchmarks/scripts/ns_tma_probe.py   (writes $OUT/ns_tma_probe.json)
"""
import json
import os

import torch
import triton

from moespeed.bench.common import git_commit
from moespeed.kernels import muon_triton as K
from moespeed.optim import newton_schulz as NS
from moespeed.optim.polar_express import polar_express_coefficients

BATCH_NUMEL = 2**26  # train.muon_batch_numel: matrices per NS round = BATCH_NUMEL // (rows * cols)
# (label, rows, cols of the class); the products of one NS step on a wide (m, n) block: A A (m, m, m),
# B Y (m, n, m); tall blocks: Y B (n, m, m)
CLASSES = [("expert 256x768", 256, 768), ("expert 768x256", 768, 256), ("attn 384x768", 384, 768),
           ("mlp 768x768", 768, 768), ("dense 512x768", 512, 768)]


def timeit(fn, reps=20):
    """ms per call of fn as the CUDA-graphed Muon step runs it: `reps` calls captured in one CUDA graph
    and replayed (eager timing of short Triton launches measures the host: the first run of this probe
    timed the TMA kernel at 138 us eagerly, 65 us per call with its config forced)."""
    fn()  # autotuning, compilation
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def products(rows, cols):
    """(label, M, N, K) of the two addmm products per NS step (the Gram product is cuBLAS's)."""
    m, n = min(rows, cols), max(rows, cols)
    by = ("Y B", n, m, m) if rows > cols else ("B Y", m, n, m)
    return [("A A", m, m, m), by]


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": os.environ.get("MOESPEED_COMMIT") or git_commit(),
           "command": "PYTHONPATH=$PWD python benchmarks/scripts/ns_tma_probe.py", "gemm": [], "ns": []}
    base = K._addmm_tma_kernel.fn  # the jit function under the autotuner
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, rows, cols in CLASSES:
        count = BATCH_NUMEL // (rows * cols)
        for name, M, N, Kd in products(rows, cols):
            L, R, D = (torch.randn(s, device="cuda", generator=g).bfloat16() for s in [(count, M, Kd), (count, Kd, N),
                                                                                        (count, M, N)])
            C = torch.empty_like(D)
            ref = 0.5 * (L.float() @ R.float()) + 1.5 * D.float()  # (count, M, N)
            flops = 2 * count * M * N * Kd
            row = {"class": label, "product": name, "count": count, "M": M, "N": N, "K": Kd,
                   "triton_ms": timeit(lambda: K._addmm_triton(L, R, D, 0.5, 1.5, C)),
                   "triton_config": str(K._addmm_kernel.best_config),
                   "tma_ms": timeit(lambda: K._addmm_tma(L, R, D, 0.5, 1.5, C)),
                   "tma_config": str(K._addmm_tma_kernel.best_config),
                   "bmm_ms": timeit(lambda: torch.bmm(L, R)),
                   "baddbmm_ms": timeit(lambda: torch.baddbmm(D, L, R, beta=1.5, alpha=0.5))}
            row["tma_err"] = ((C.float() - ref).abs().max() / ref.abs().max()).item()
            configs = []
            for cfg in K._TMA_CONFIGS:
                kern = triton.autotune(configs=[cfg], key=["M", "N", "K"])(base)
                saved, K._addmm_tma_kernel = K._addmm_tma_kernel, kern
                try:
                    C.zero_()
                    ms = timeit(lambda: K._addmm_tma(L, R, D, 0.5, 1.5, C))
                    err = ((C.float() - ref).abs().max() / ref.abs().max()).item()
                    configs.append({"config": str(cfg), "ms": ms, "tflops": flops / ms / 1e9, "err": err})
                except Exception as exc:  # noqa: BLE001 - out of shared memory etc.
                    configs.append({"config": str(cfg), "error": repr(exc)[:200]})
                finally:
                    K._addmm_tma_kernel = saved
            row["tma_configs"] = configs
            for key in ("triton", "tma", "bmm", "baddbmm"):
                row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
            out["gemm"].append(row)
            print(f"{label} {name} x{count}: triton {row['triton_ms']*1e3:.0f}us ({row['triton_tflops']:.0f} TF/s) "
                  f"tma {row['tma_ms']*1e3:.0f}us ({row['tma_tflops']:.0f}) bmm {row['bmm_ms']*1e3:.0f}us "
                  f"({row['bmm_tflops']:.0f}) err {row['tma_err']:.1e} | tma pick {row['tma_config']}", flush=True)
            del L, R, D, C, ref
        coefficients = polar_express_coefficients(4, 3e-3)
        X0 = torch.randn(count, rows, cols, device="cuda", generator=g).bfloat16()
        X = X0.clone()
        row = {"class": label, "count": count}
        results = {}
        for gemm in ("torch", "triton", "tma", "poly"):
            X.copy_(X0)
            NS._orthogonalize_(X, 4, coefficients, NS.EPS, gemm)
            results[gemm] = X.float()
            row[f"{gemm}_ms"] = timeit(lambda: (X.copy_(X0), NS._orthogonalize_(X, 4, coefficients, NS.EPS, gemm)), 10)
        row["copy_ms"] = timeit(lambda: X.copy_(X0))  # included in each time above
        exact = X0.double()
        NS._orthogonalize_(exact, 4, coefficients, NS.EPS)
        for gemm, Y in results.items():
            row[f"{gemm}_err_vs_fp64"] = ((Y.double() - exact).norm() / exact.norm()).item()
        out["ns"].append(row)
        print(f"NS {label} x{count}: " + " ".join(f"{k} {row[k+'_ms']*1e3:.0f}us" for k in results)
              + f" (copy {row['copy_ms']*1e3:.0f}us) err tma {row['tma_err_vs_fp64']:.2e} triton "
              f"{row['triton_err_vs_fp64']:.2e}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "ns_tma_probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
