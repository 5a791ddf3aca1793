"""Newton–Schulz orthogonalization, the core of Muon (moespeed.optim.muon batches and schedules it).

`newton_schulz(G)` maps each matrix of G (..., rows, cols) to about U V^T of its SVD U S V^T: the
quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, in bf16, on X = G / ||G||_F (so every
singular value starts in (0, 1]). Coefficients: one (a, b, c) for every step (NS_COEFFICIENTS,
torch.optim.Muon's) or one per step (moespeed/optim/polar_express.py). Tall blocks run the transposed
iteration, so the Gram matrix is always the small side. `_orthogonalize_` is the in-place batched
form the optimizer calls, with the GEMM choices ("torch", "triton", "poly") and the Gram variant;
`ns_flops` counts its matmul FLOPs. The plain-PyTorch path ("torch") is the reference; the others
are compared with it in tests/test_muon.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.muon_triton import (_addmm_tma, _addmm_triton, _normalize_gram_triton, _normalize_triton, tma_fits,
                                   tma_supported, triton)
from .ns_fp8 import FP8_Y_SCALE, fp8_step

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_METHODS = ("standard", "gram")  # gram: Gram Newton–Schulz for blocks with a long side >= 2x the short one
GRAM_RESTART = 3  # the Gram iteration re-anchors X at this step (bf16 drift; see _gram_orthogonalize_)
EPS = 1e-7
# auto: tma on Hopper or newer (H200 small-moe train step, session 18: Muon 6.59 vs 6.84 ms with triton),
# triton on older CUDA GPUs. H100 train step (train_step_muon_triton_*.json): triton for every class beat
# triton for classes of >= 64 blocks only (small: 4.15 vs 4.77 ms without streams).
# poly: X <- P X with P = a I + b A + c A^2 formed first (plain cuBLAS bmm; see _orthogonalize_).
# tune: on CUDA, time the three on the first NS call of each round shape, keep the fastest (per-class times
# in muon_gram_classes.json favour cuBLAS for some small classes, e.g. (1344, 128) x12: 0.46 vs 1.03 ms)
# tma: the Triton GEMM as a persistent kernel with TMA loads (Hopper and later; "triton" where a batch does not tile)
NS_GEMMS = ("torch", "triton", "tma", "poly", "auto", "tune")
TRITON_GEMMS = ("triton", "tma")  # the GEMMs that normalize through the first Gram matrix
TUNE_REPEATS = 3  # timed NS calls per GEMM choice when ns_gemm = "tune" (after one warm-up call)


def newton_schulz(G: Tensor, steps: int = NS_STEPS, coefficients=NS_COEFFICIENTS, eps: float = EPS) -> Tensor:
    """Orthogonalize each matrix of `G` (..., rows, cols) with the quintic Newton–Schulz iteration.

    coefficients: one (a, b, c) for every step, or a sequence of `steps` triples (one per step).
    Runs in bf16 and returns a new bf16 tensor of G's shape; every matrix is normalized on its own.
    """
    rows, cols = G.shape[-2:]
    X = G.reshape(-1, rows, cols).to(torch.bfloat16, memory_format=torch.contiguous_format,
                                     copy=True)  # (n, rows, cols)
    _orthogonalize_(X, steps, coefficients, eps)
    return X.view(G.shape)


def step_coefficients(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each NS step: one triple repeated, or one given per step (`steps` of them)."""
    if _one_triple(coefficients):
        return [tuple(float(x) for x in coefficients)] * steps
    try:
        per_step = [tuple(float(x) for x in abc) for abc in coefficients]
    except TypeError:
        per_step = []
    if len(per_step) != steps or any(len(abc) != 3 for abc in per_step):
        raise ValueError(f"Muon ns_coefficients: give three numbers (a, b, c) or {steps} triples, one per "
                         f"step; got {coefficients!r}")
    return per_step


def _orthogonalize_(X: Tensor, steps: int, coefficients, eps: float,
                    gemm: str = "torch", method: str = "standard", fp8_steps: int = 0) -> None:
    """Newton–Schulz in place: a contiguous bf16 batch X (n, rows, cols) becomes NS(X).

    Wide blocks: X <- a X + B X with B = b A + c A^2, A = X X^T (rows x rows). Tall blocks: the
    transposed iteration X <- a X + X B with A = X^T X (cols x cols). `gemm` computes the two
    "alpha L R + beta D" products: "torch" = baddbmm (cuBLAS; it first copies D into its output),
    "triton" = `_addmm_kernel` (reads D in the epilogue); or "poly" forms P = a I + b A + c A^2
    first (baddbmm on the small m x m side, a diagonal add) and then X <- P X with a plain bmm that
    writes its output and reads X once (same map, P rounded to bf16 once more: 1.04e-2 vs 0.90e-2
    relative to fp32 NS on (256, 768) blocks, s9_ns_poly_probe.json). "triton" also skips the
    normalization pass: ||X||_F^2 = trace(X X^T), so step 1 scales its Gram matrix by 1 / ||X||^2
    and its output by 1 / ||X|| (`_normalize_gram_triton`, a per-matrix factor in the GEMM epilogue);
    it rounds differently from "torch" but lands as close to exact NS (tests/test_muon.py). `method="gram"` runs
    `_gram_orthogonalize_` instead where `gram_pays`. The first `fp8_steps` steps run their GEMMs on
    fp8 e4m3 operands (`ns_fp8.fp8_step`; they need the normalized X, so no Gram normalization then).
    The optimizer calls this on slices of its stack; tests count the calls.
    """
    if method == "gram" and gram_pays(X.shape[-2], X.shape[-1]):
        _gram_orthogonalize_(X, steps, coefficients, eps)
        return
    tall = X.shape[-2] > X.shape[-1]
    # "triton" normalizes through the first Gram matrix: ||X||_F^2 = trace(X X^T), so step 1 runs on
    # A / ||X||^2 and scales its output by 1 / ||X||; no pass over X (H200 small-moe: a 0.20 ms kernel
    # instead of 0.59 ms of norm and scaling per step)
    via_gram = gemm in TRITON_GEMMS and fp8_steps == 0
    # ||Y||_F = 1 per matrix (or X, scaled in step 1); an fp8 first step takes it times its scale
    Y = X if via_gram else _normalize_(X, eps, gemm, times=FP8_Y_SCALE if fp8_steps else 1.0)
    for i, (a, b, c) in enumerate(step_coefficients(coefficients, steps)):
        out = X if i == steps - 1 and i > 0 else None  # the last step writes into X (Y no longer aliases it)
        if i < fp8_steps:
            Y = fp8_step(Y if i == 0 else Y * FP8_Y_SCALE, a, b, c, gemm, out=out)  # (n, rows, cols)
            continue
        A = Y.mT @ Y if tall else Y @ Y.mT  # (n, m, m), m = min(rows, cols)
        scale = None
        if i == 0 and via_gram:
            A, scale = _normalize_gram_triton(A, eps)  # A / ||X||^2 and 1 / ||X||, (n,) fp32
        if gemm == "poly":
            P = _polynomial(A, a, b, c)  # (n, m, m)
            Y = torch.bmm(Y, P, out=out) if tall else torch.bmm(P, Y, out=out)  # (n, rows, cols)
        else:
            B = _addmm(A, A, A, c, b, gemm)  # b A + c A^2, (n, m, m)
            left, right = (Y, B) if tall else (B, Y)
            Y = _addmm(left, right, Y, 1.0, a, gemm, out=out, scale=scale)  # (n, rows, cols)
    if Y is not X:  # steps == 1
        X.copy_(Y)


def _polynomial(A: Tensor, a: float, b: float, c: float) -> Tensor:
    """P = a I + b A + c A^2 for a batch of square A (n, m, m): the map one NS step applies."""
    P = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
    P.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
    return P


def _normalize_(X: Tensor, eps: float, gemm: str = "torch", times: float = 1.0) -> Tensor:
    """X (n, rows, cols) in place: each matrix divided by max(its Frobenius norm, eps), times `times`
    (a power of two: the fp8 step's scale, exact). With the Triton GEMMs a Triton scaling pass (the
    broadcast division is slow on the GPU)."""
    if gemm in TRITON_GEMMS or (gemm == "poly" and X.is_cuda and triton is not None):
        return _normalize_triton(X, eps, times)
    return X.div_(X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps) / times)


def _faster_gemm(blocks: Tensor, steps: int, coefficients, eps: float,
                 method: str, fp8_steps: int = 0) -> str:
    """"torch", "triton", "poly" or (Hopper and later) "tma", whichever orthogonalizes copies of `blocks`
    faster on their CUDA device: one warm-up call each (Triton autotunes there), then TUNE_REPEATS timed
    calls (CUDA events; the host waits once). `blocks` itself is not touched."""
    trial = torch.empty_like(blocks)
    times = {}
    for gemm in ("torch", "triton", "poly") + (("tma",) if tma_supported(blocks.device) else ()):
        trial.copy_(blocks)
        _orthogonalize_(trial, steps, coefficients, eps, gemm, method, fp8_steps)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TUNE_REPEATS):
            trial.copy_(blocks)
            _orthogonalize_(trial, steps, coefficients, eps, gemm, method, fp8_steps)
        end.record()
        end.synchronize()
        times[gemm] = start.elapsed_time(end)
    return min(times, key=times.get)


def gram_pays(rows: int, cols: int) -> bool:
    """Gram Newton–Schulz does fewer FLOPs than the standard iteration when the long side is >= 2x the short."""
    return max(rows, cols) >= 2 * min(rows, cols)


def _gram_orthogonalize_(X: Tensor, steps: int, coefficients, eps: float,
                         restart: int = GRAM_RESTART) -> None:
    """Newton–Schulz in place on X (n, rows, cols), iterating on the small m x m Gram matrix.

    Every step maps X to P(A) X with P(A) = a I + b A + c A^2 and A = X X^T (m = the short side), so
    after k steps X_k = Q_k X_0 with Q_k a polynomial in A_0. We carry Q (m, m) and A_k = P A_{k-1} P
    instead of X, and touch the long side only to form A_0 and to apply Q. In bf16, Q and A drift
    apart over more than ~3 steps; at step `restart` X is re-anchored (X <- Q X, A <- X X^T). In the
    tests the result then deviates from exact arithmetic 1.0-2.3x as much as the standard bf16
    iteration does (1-4%), with the same singular-value band. FLOPs for a wide m x n block, 5 steps,
    restart 3: 8 m^2 n + 28 m^3 vs 20 m^2 n + 10 m^3 (768 x 256: 26% fewer; 3072 x 768: 33% fewer),
    and X is read or written 7 times instead of 15.
    """
    per_step = step_coefficients(coefficients, steps)
    tall = X.shape[-2] > X.shape[-1]
    X.div_(X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))  # ||X||_F = 1 per matrix

    def gram(Y: Tensor) -> Tensor:  # (n, m, m)
        return Y.mT @ Y if tall else Y @ Y.mT

    def apply(Q: Tensor) -> Tensor:  # Q X on the short side (Q is symmetric: X Q for tall blocks)
        return X @ Q if tall else Q @ X

    A, Q = gram(X), None
    for k, (a, b, c) in enumerate(per_step):
        if k == restart and Q is not None:
            X.copy_(apply(Q))
            A, Q = gram(X), None
        P = _polynomial(A, a, b, c)
        Q = P if Q is None else P @ Q
        if k + 1 < steps and k + 1 != restart:  # the next step needs A; a restart recomputes it
            A = P @ (A @ P)
    X.copy_(apply(Q))


def _addmm(L: Tensor, R: Tensor, D: Tensor, alpha: float, beta: float, gemm: str,
           out: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """alpha * L @ R + beta * D for bf16 batches L (n, M, K), R (n, K, N), D (n, M, N); each matrix
    times scale[z] if given (n,) fp32 (Triton only)."""
    if gemm in TRITON_GEMMS:
        out = torch.empty_like(D) if out is None else out
        if gemm == "tma" and tma_fits(L, R, D, out):
            return _addmm_tma(L, R, D, alpha, beta, out, scale)
        return _addmm_triton(L, R, D, alpha, beta, out, scale)
    if scale is not None:
        raise ValueError("_addmm: a per-matrix scale needs gemm='triton' or 'tma'")
    if out is None:
        return torch.baddbmm(D, L, R, beta=beta, alpha=alpha)
    return torch.baddbmm(D, L, R, beta=beta, alpha=alpha, out=out)


def ns_flops(rows: int, cols: int, steps: int = NS_STEPS) -> int:
    """Matmul FLOPs of `newton_schulz` on one (rows, cols) matrix."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)  # X X^T and B X: 2 m^2 n each; A A: 2 m^3


def _one_triple(coefficients) -> bool:
    """True for one (a, b, c) of numbers, False for a per-step sequence of triples."""
    return len(coefficients) == 3 and all(isinstance(x, (int, float)) for x in coefficients)


def _hashable(coefficients) -> tuple:
    """ns_coefficients as nested tuples, as class keys need: (a, b, c) or ((a, b, c), ...)."""
    return tuple(coefficients) if _one_triple(coefficients) else tuple(map(tuple, coefficients))
