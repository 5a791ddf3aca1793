"""Probe: would fp8 GEMMs make small-moe's expert Newton–Schulz faster? GPU time of its GEMMs in bf16
and in fp8 e4m3 (one scale per tensor, fp32 accumulation), on one NS round of expert blocks.

    python benchmarks/scripts/ns_fp8_probe.py --json out.json        # on a Hopper GPU
    TRITON_INTERPRET=1 python benchmarks/scripts/ns_fp8_probe.py --check   # the fp8 kernel on a CPU

`ns_fp8_emulation.py` found that fp8 operands in the first 2 of the presets' 4 NS steps keep the
update (CPU emulation). This times what that could save, before any kernel in moespeed is built.
One round is `--blocks` (256, 768) blocks X (341 = the default 2^26-element round). Timed, each
as one CUDA graph replayed `--reps` times (GPU time only):

- gram: A = X X^T (256 x 256 per block): cuBLAS bf16 bmm, the Triton kernel below on bf16, and on fp8;
- px: X' = P X (P 256 x 256): the same three;
- quantize: X * s -> e4m3, the elementwise pass an fp8 step adds before its GEMMs.

The Triton kernel is a plain batched GEMM (C[z] = scale * L[z] @ R[z], bf16 out), the same code for
both dtypes, so the bf16/fp8 ratio of its two rows is the tensor cores' gain on these shapes.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import triton
import triton.language as tl

from moespeed.bench.common import git_commit, save_json

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
                                     (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]
            ] if not _INTERPRET else [triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4)]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "FP8"])
@triton.jit
def _bmm_kernel(l_ptr, r_ptr, c_ptr, M, N, K, s_lb, s_lm, s_lk, s_rb, s_rk, s_rn, s_cb, s_cm, s_cn, scale,
                FP8: tl.constexpr, INTERPRET: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[z] = scale * L[z] @ R[z]; L, R bf16 or fp8 e4m3 (FP8: the autotune key), fp32 accumulation,
    bf16 out; one program per (z, output tile); M, N, K multiples of the tiles. INTERPRET: bf16
    operands go through fp32 (the interpreter's bf16 dot is wrong; its fp8 dot is right)."""
    tiles_n = N // BN
    tiles = (M // BM) * tiles_n
    pid = tl.program_id(0)
    z = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    rm = (tile // tiles_n) * BM + tl.arange(0, BM)
    rn = (tile % tiles_n) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    l_ptrs = l_ptr + z * s_lb + rm[:, None] * s_lm + rk[None, :] * s_lk  # (BM, BK)
    r_ptrs = r_ptr + z * s_rb + rk[:, None] * s_rk + rn[None, :] * s_rn  # (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K // BK):
        lhs, rhs = tl.load(l_ptrs), tl.load(r_ptrs)
        if INTERPRET and not FP8:
            lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
        acc = tl.dot(lhs, rhs, acc)
        l_ptrs += BK * s_lk
        r_ptrs += BK * s_rk
    tl.store(c_ptr + z * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, (acc * scale).to(tl.bfloat16))


def bmm(L: torch.Tensor, R: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * L @ R for batches L (n, M, K), R (n, K, N) of bf16 or fp8 e4m3 (any strides): bf16 (n, M, N)."""
    n, M, K = L.shape
    N = R.shape[-1]
    out = torch.empty(n, M, N, dtype=torch.bfloat16, device=L.device)

    def grid(meta):
        return (n * (M // meta["BM"]) * (N // meta["BN"]),)

    _bmm_kernel[grid](L, R, out, M, N, K, *L.stride(), *R.stride(), *out.stride(), float(scale),
                      FP8=L.dtype == torch.float8_e4m3fn, INTERPRET=_INTERPRET)
    return out


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x * scale rounded to fp8 e4m3 (scale: a power of two that keeps |x| * scale <= 448)."""
    return (x * scale).to(torch.float8_e4m3fn)


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
    Xq, Pq = quantize(X, 256.0), quantize(P, 64.0)
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
        "quantize X": (lambda: quantize(X, 256.0), 0),
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
