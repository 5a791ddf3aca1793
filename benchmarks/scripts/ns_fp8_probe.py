"""Probe: would fp8 GEMMs make small-moe's expert Newton–Schulz faster? GPU time of its GEMMs in bf16
and in fp8 e4m3 (one scale per tensor, fp32 accumulation), on one NS round of expert blocks.

    python benchmarks/scripts/ns_fp8_probe.py --json out.json        # on a Hopper GPU
    TRITON_INTERPRET=1 python benchmarks/scripts/ns_fp8_probe.py --check   # the kernel on a CPU

`ns_fp8_emulation.py` found that only the first of the presets' 4 NS steps tolerates fp8 operands
(CPU emulation; `train.muon_ns_fp8_first_step`). This times what fp8 GEMMs can save on these shapes.
One round is `--blocks` (256, 768) blocks X (341 = the default 2^26-element round). Timed, each
as one CUDA graph replayed `--reps` times (GPU time only):

- gram: A = X X^T (256 x 256 per block): cuBLAS bf16 bmm, the Triton kernel below on bf16, and on fp8;
- px: X' = P X (P 256 x 256): the same three;
- cast X to fp8: the elementwise pass an fp8 step adds before its GEMMs (its input comes scaled).

The Triton rows use moespeed's NS kernel (`_addmm_triton`, autotuned, no D epilogue), the same code
for both dtypes, so the bf16/fp8 ratio of its rows is the gain `train.muon_ns_fp8_first_step` can
get from its GEMMs on these shapes.
"""
from __future__ import annotations

import argparse
import datetime

import torch
import triton

from moespeed.bench.common import git_commit, save_json
from moespeed.kernels.muon_triton import _addmm_triton

def bmm(L: torch.Tensor, R: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * L @ R by moespeed's NS kernel (`_addmm_triton`, no D) for batches L (n, M, K), R (n, K, N)
    of bf16 or fp8 e4m3 (any strides): bf16 (n, M, N)."""
    out = torch.empty(L.shape[0], L.shape[1], R.shape[-1], dtype=torch.bfloat16, device=L.device)
    return _addmm_triton(L, R, None, scale, 0.0, out)


def check() -> None:
    """The kernel against fp32 products of the same rounded operands (CPU: TRITON_INTERPRET=1)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        L = torch.randn(3, 64, 96, generator=g).to(dtype)
        R = torch.randn(3, 96, 32, generator=g).to(dtype).mT.contiguous().mT  # column-major, like X^T
        ref = 0.5 * (L.float() @ R.float())
        out = bmm(L, R, 0.5).float()
        # one bf16 rounding of the result (the interpreter truncates: up to 2^-7 relative)
        assert ((out - ref).abs() <= 2**-7 * ref.abs() + 1e-3).all(), (dtype, (out - ref).abs().max())
    print("fp8 probe kernel ok")


def graph_ms(fn, reps: int) -> float:
    """GPU time of one call of fn, from a CUDA graph of `reps` calls (warmed up and autotuned first)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=341)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=768)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--check", action="store_true", help="only check the kernel (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.check:
        return check()
    n, m, k = args.blocks, args.rows, args.cols
    X = torch.randn(n, m, k, device="cuda", dtype=torch.bfloat16)
    X /= X.float().norm(dim=(-2, -1), keepdim=True).bfloat16()  # ||X||_F = 1: |x| <= 1
    P = (torch.randn(n, m, m, device="cuda") / m**0.5).bfloat16()
    Xs = X * 256.0  # the fp8 step's scaled input
    Xq, Pq = Xs.to(torch.float8_e4m3fn), (P * 64.0).to(torch.float8_e4m3fn)
    XqT = Xq.mT  # (n, k, m) view, K-major for the Gram matrix's right operand
    Xq_kmajor = Xq.mT.contiguous().mT  # X stored column-major: the right operand of P X K-major
    cases = {
        "gram bf16 cublas": (lambda: torch.bmm(X, X.mT), 2 * n * m * m * k),
        "gram bf16 triton": (lambda: bmm(X, X.mT), 2 * n * m * m * k),
        "gram fp8 triton": (lambda: bmm(Xq, XqT, 1 / 256**2), 2 * n * m * m * k),
        "px bf16 cublas": (lambda: torch.bmm(P, X), 2 * n * m * m * k),
        "px bf16 triton": (lambda: bmm(P, X), 2 * n * m * m * k),
        "px fp8 triton (X row-major)": (lambda: bmm(Pq, Xq, 1 / (64 * 256)), 2 * n * m * m * k),
        "px fp8 triton (X column-major)": (lambda: bmm(Pq, Xq_kmajor, 1 / (64 * 256)), 2 * n * m * m * k),
        "cast X to fp8": (lambda: Xs.to(torch.float8_e4m3fn), 0),
        "transpose-copy X fp8": (lambda: Xq.mT.contiguous(), 0),
    }
    ref_gram, ref_px = (X.float() @ X.float().mT), (P.float() @ X.float())
    rows = []
    for name, (fn, flops) in cases.items():
        try:
            ms = graph_ms(fn, args.reps)
            row = {"case": name, "ms": ms, **({"tflops": flops / ms / 1e9} if flops else {})}
            if flops:
                ref = ref_gram if name.startswith("gram") else ref_px
                row["rel_err"] = float((fn().float() - ref).norm() / ref.norm())
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
            row = {"case": name, "notes": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(row, flush=True)
    if args.json:
        save_json(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "commit": git_commit(short=True),
                              "date": datetime.date.today().isoformat(),
                              "command": "python benchmarks/scripts/ns_fp8_probe.py "
                                         f"--blocks {n} --rows {m} --cols {k} --reps {args.reps}",
                              "results": rows})


if __name__ == "__main__":
    main()
