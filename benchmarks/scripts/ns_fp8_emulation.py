"""Would fp8 Newton-Schulz GEMMs keep Muon's update? A CPU emulation, no GPU kernel.

Newton-Schulz as the small presets run it (4 Polar Express steps, lowest 3e-3) on 32 blocks of
small-moe's expert shape (256 x 768), with two spectra: power-law singular values (s_i ~ i^-0.7)
and a flat one (Gaussian entries). The GEMM operands are rounded to bf16 (as today) or, in the first k steps, to fp8 e4m3 with
a per-matrix scale (what Hopper's fp8 tensor cores take, accumulating in fp32); products and the
other steps are rounded to bf16 like the bf16 path. Printed: the mean relative error against the same
iteration in fp64, the output's singular-value band, and the cosine to the exact polar factor U V^T.

    PYTHONPATH=$PWD python benchmarks/scripts/ns_fp8_emulation.py
"""
import torch
from moespeed.optim.polar_express import polar_express_coefficients

torch.manual_seed(0)
E4M3_MAX = 448.0

def q_bf16(x):
    return x.to(torch.bfloat16).to(torch.float64)

def q_e4m3(x):  # per-matrix scale to the e4m3 range (amax -> 448), round, unscale
    s = x.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-30) / E4M3_MAX
    return (x / s).to(torch.float8_e4m3fn).to(torch.float64) * s

def ns(G, coeffs, fp8_steps, exact=False):
    """NS of each matrix of G (n, m, cols), m <= cols; fp8 operands in the first fp8_steps steps."""
    X = G / G.norm(dim=(-2, -1), keepdim=True)
    X = X if exact else q_bf16(X)
    for k, (a, b, c) in enumerate(coeffs):
        q = (lambda t: t) if exact else (q_e4m3 if k < fp8_steps else q_bf16)
        A = q(X) @ q(X).mT          # (n, m, m), fp32/fp64 accumulation
        A = A if exact else q_bf16(A)
        B = b * A + c * (q(A) @ q(A))
        B = B if exact else q_bf16(B)
        X = a * X + q(B) @ q(X)
        X = X if exact else q_bf16(X)
    return X

coeffs = polar_express_coefficients(4, 3e-3)
n, m, cols = 32, 256, 768
U = torch.linalg.qr(torch.randn(n, m, m, dtype=torch.float64))[0]
V = torch.linalg.qr(torch.randn(n, cols, m, dtype=torch.float64))[0]
S = torch.arange(1, m + 1, dtype=torch.float64) ** -0.7
spectra = {  # name -> (G, its exact polar factor U V^T)
    "power-law s_i ~ i^-0.7": (U @ torch.diag_embed(S.expand(n, m)) @ V.mT, U @ V.mT),
    "flat (Gaussian entries)": None,
}
gaussian = torch.randn(n, m, cols, dtype=torch.float64)
u, _, vh = torch.linalg.svd(gaussian, full_matrices=False)
spectra["flat (Gaussian entries)"] = (gaussian, u @ vh)
for spectrum, (G, polar) in spectra.items():
    print(f"-- {spectrum}")
    ref = ns(G, coeffs, 0, exact=True)
    for label, k in [("bf16 (today)", 0), ("fp8 step 1", 1), ("fp8 steps 1-2", 2), ("fp8 steps 1-3", 3),
                     ("fp8 all 4", 4)]:
        out = ns(G, coeffs, k)
        err = ((out - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).mean().item()
        sv = torch.linalg.svdvals(out)
        cos = ((out * polar).sum(dim=(-2, -1)) / (out.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))).mean().item()
        print(f"{label:14} rel. error vs fp64 NS {err:.2e}   singular values [{sv.min():.3f}, {sv.max():.3f}]   "
              f"cos to polar {cos:.4f}")
    sv = torch.linalg.svdvals(ref)
    print(f"{'fp64 NS':14} singular values [{sv.min():.3f}, {sv.max():.3f}]")

# moespeed's own fp8 steps (moespeed/optim/ns_fp8.py: scales from bounds, not amax) on flat blocks of two
# sizes: the singular-value band after the 4 steps with fp8 in the first k
from moespeed.optim.newton_schulz import EPS, _orthogonalize_  # noqa: E402

print("-- moespeed _orthogonalize_(fp8_steps=k), flat spectrum, 8 blocks")
for shape in [(8, 64, 192), (8, 256, 768)]:
    G = torch.randn(shape)
    for k in (0, 1, 2):
        X = G.bfloat16()
        _orthogonalize_(X, 4, coeffs, EPS, "torch", fp8_steps=k)
        sv = torch.linalg.svdvals(X.double())
        print(f"{str(shape[1:]):11} fp8 steps {k}: singular values [{sv.min():.3f}, {sv.max():.3f}]")

# moespeed's fp8 first step against the exact first step, and the whole NS against fp64 NS, as multiples of
# the bf16 path's error (the figures tests/test_ns_fp8.py bounds), on its shapes and both spectra
from moespeed.optim import ns_fp8  # noqa: E402


def power_law(n: int, rows: int, cols: int) -> torch.Tensor:
    m = min(rows, cols)
    u = torch.linalg.qr(torch.randn(n, rows, m, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, cols, m, dtype=torch.float64))[0]
    return u @ torch.diag_embed((torch.arange(1, m + 1, dtype=torch.float64) ** -0.7).expand(n, m)) @ v.mT


def exact_steps(X: torch.Tensor, per_step) -> torch.Tensor:
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in per_step:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * A @ A
        X = a * X + (X @ B if tall else B @ X)
    return X


print("-- moespeed fp8 first step / bf16, error multiples: one step vs the exact step; whole NS vs fp64 NS")
for spectrum in ("flat", "power-law"):
    for shape in [(4, 64, 192), (4, 192, 64), (2, 256, 768)]:
        torch.manual_seed(0)
        G = torch.randn(shape, dtype=torch.float64) if spectrum == "flat" else power_law(*shape)
        X = G / G.norm(dim=(-2, -1), keepdim=True)
        exact = exact_steps(X, coeffs[:1])
        bf16 = exact_steps(X.bfloat16().double(), coeffs[:1]).bfloat16().double()
        fp8 = ns_fp8.fp8_step((X * ns_fp8.FP8_Y_SCALE).bfloat16(), *coeffs[0], "torch").double()
        one = ((fp8 - exact).norm() / (bf16 - exact).norm()).item()
        full = exact_steps(X, coeffs)
        errs = []
        for k in (0, 1):
            Y = G.float().bfloat16()
            _orthogonalize_(Y, 4, coeffs, EPS, "torch", fp8_steps=k)
            errs.append(((Y.double() - full).norm() / full.norm()).item())
        print(f"{spectrum:9} {str(shape[1:]):11} one step {one:.2f}x   whole NS {errs[1] / errs[0]:.2f}x "
              f"({errs[1]:.2e} vs {errs[0]:.2e})")
