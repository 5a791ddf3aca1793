"""One Newton–Schulz step with fp8 e4m3 GEMM operands (`train.muon_ns_fp8_first_step`).

Hopper's tensor cores multiply fp8 at twice the bf16 rate. NS tolerates fp8 operands in its first
step only: there a Y dominates and B Y is small. On expert-shaped (256 x 768) blocks with 4 Polar
Express steps, fp8 in step 1 left the output 8.6e-3 to 1.2e-2 from fp64 NS (bf16: 8.6e-3 to
9.2e-3). From step 2 on, a Y and B Y nearly cancel and fp8's 3-bit mantissa shows: fp8 in steps 1-2
pushed the band's top to 13.6 on (64, 192) blocks, where the later steps' polynomials blow up
(benchmarks/scripts/ns_fp8_emulation.py). Muon allows fp8 in the first step only.

Scaling: e4m3 holds |x| <= 448 with 3 mantissa bits. Every operand gets one power-of-two scale,
fixed by a bound instead of read from the data (no amax pass): the step's input Y has singular
values below FP8_BOUND (a Frobenius-normalized input starts at <= 1, and the schedules keep them
near [0.7, 1.2]), so |Y_ij| <= FP8_BOUND, |A_ij| <= FP8_BOUND^2 for A = Y Y^T, and |B_ij| <= the
largest |b l + c l^2| over the eigenvalues l in [0, FP8_BOUND^2] of A for B = b A + c A^2. Each
operand is produced already scaled (the normalization pass and the GEMM epilogues apply the
scales), so quantizing is one cast. The bounds leave slack (after a Frobenius normalization the
first step's scaled Y stays below 256, since |Y_ij| <= 1, and A and B well below 448 too); a value
beyond 448 would saturate from torch 2.12 on and become NaN before.

The products accumulate in fp32 and are stored in bf16 like the bf16 path's. GEMMs: the Triton
kernel (`_addmm_triton`, fp8 operands) on CUDA; on a CPU the reference, the same rounding with fp32
products (`fp8_mm_reference`, also the tests' yardstick); on GPUs without fp8 tensor cores (below
compute capability 8.9) the reference too. Gram Newton–Schulz (`ns_method = gram`) has no fp8 steps.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..kernels.muon_triton import _addmm_triton, triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_BOUND = 1.6  # singular values of an NS step's input stay below this


def fp8_scale(bound: float) -> float:
    """The largest power of two s with bound * s <= FP8_MAX (exact in any float format)."""
    return 2.0 ** math.floor(math.log2(FP8_MAX / bound))


FP8_Y_SCALE = fp8_scale(FP8_BOUND)  # Y's scale (256): |Y_ij| <= FP8_BOUND -> <= 409.6


def poly_bound(b: float, c: float, top: float = FP8_BOUND**2) -> float:
    """max |b l + c l^2| over l in [0, top]: a bound on the entries of b A + c A^2 for a symmetric
    A with eigenvalues in [0, top] (its spectral norm bounds every entry)."""
    points = [top] + ([-b / (2 * c)] if c and 0 < -b / (2 * c) < top else [])
    return max(abs(b * x + c * x * x) for x in points)


def fp8_mm_reference(L: Tensor, R: Tensor, D: Tensor | None, alpha: float, beta: float,
                     out: Tensor | None = None) -> Tensor:
    """alpha * L @ R + beta * D for e4m3 batches L (n, M, K), R (n, K, N): fp32 products of the
    exact e4m3 values, rounded to bf16 once (D None: alpha * L @ R)."""
    result = alpha * torch.bmm(L.float(), R.float())  # (n, M, N)
    if D is not None:
        result += beta * D.float()
    if out is None:
        return result.bfloat16()
    return out.copy_(result)


@functools.lru_cache(maxsize=None)
def fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 e4m3 in hardware (CUDA compute capability 8.9 and up, with
    Triton; Triton refuses e4m3 below it, e.g. on an A100)."""
    return device.type == "cuda" and triton is not None and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_mm(L: Tensor, R: Tensor, D: Tensor | None, alpha: float, beta: float, gemm: str,
            out: Tensor | None = None) -> Tensor:
    """`fp8_mm_reference`'s product by the Triton kernel (on a GPU with fp8 tensor cores whatever the
    bf16 steps' GEMM, and for gemm = "triton" on a CPU under TRITON_INTERPRET=1) or by the reference
    (elsewhere, e.g. an A100: correct, not faster)."""
    if fp8_tensor_cores(L.device) or (gemm == "triton" and not L.is_cuda):
        shape = (L.shape[0], L.shape[1], R.shape[-1])
        target = torch.empty(shape, dtype=torch.bfloat16, device=L.device) if out is None else out
        return _addmm_triton(L, R, D, alpha, beta, target)
    return fp8_mm_reference(L, R, D, alpha, beta, out)


def fp8_step(Ys: Tensor, a: float, b: float, c: float, gemm: str, out: Tensor | None = None) -> Tensor:
    """One NS step Y <- a Y + (b A + c A^2) Y, A = Y Y^T (tall blocks: Y <- a Y + Y (b A + c A^2),
    A = Y^T Y) for a bf16 batch Y (n, rows, cols) with singular values below FP8_BOUND, given as
    Ys = FP8_Y_SCALE * Y (the normalization pass scales it for free), its three GEMMs on e4m3
    operands; returns the unscaled bf16 result (into `out` if given, which must not be Ys).
    Every operand is produced already scaled, so each quantization is one cast (saturating)."""
    tall = Ys.shape[-2] > Ys.shape[-1]
    s_y, s_a, s_b = FP8_Y_SCALE, fp8_scale(FP8_BOUND**2), fp8_scale(poly_bound(b, c))
    Yq = Ys.to(FP8)  # (n, rows, cols)
    left, right = (Yq.mT, Yq) if tall else (Yq, Yq.mT)
    As = _fp8_mm(left, right, None, s_a / s_y**2, 0.0, gemm)  # s_a A, (n, m, m), m = min(rows, cols)
    Aq = As.to(FP8)
    Bs = _fp8_mm(Aq, Aq, As, s_b * c / s_a**2, s_b * b / s_a, gemm)  # s_b (b A + c A^2) (A symmetric)
    left, right = (Yq, Bs.to(FP8)) if tall else (Bs.to(FP8), Yq)
    return _fp8_mm(left, right, Ys, 1 / (s_b * s_y), a / s_y, gemm, out=out)  # a Y + B Y (or Y B)
