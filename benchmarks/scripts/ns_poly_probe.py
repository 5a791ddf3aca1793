"""Probe: Newton–Schulz step as X <- P X with P = a I + b A + c A^2 formed first (one plain bmm for the
big product, no epilogue read of X) vs the current "a X + B X" addmm, per shape class of small / small-moe.

CUDA only. From the repository root: PYTHONPATH=$PWD python benchmarks/scripts/ns_poly_probe.py
(prints a line per class, writes $OUT/ns_poly_probe.json). Times one batched NS call (4 Polar Express
steps) per variant; errors are relative Frobenius distances to the same iteration in fp32.
"""
import json, os, torch
from moespeed.kernels import muon_triton as K
from moespeed.optim import newton_schulz as M
from moespeed.optim.polar_express import polar_express_coefficients

STEPS = 4
COEF = polar_express_coefficients(STEPS, 3e-3)
EPS = 1e-7
# (label, blocks per call, rows, cols): the rounds the optimizer runs (batch_numel 2^26 elements)
CLASSES = [("moe 256x768", 239, 256, 768), ("moe 768x256", 235, 768, 256), ("small 384x768", 36, 384, 768),
           ("small 768x3072", 12, 768, 3072), ("small 3072x768", 12, 3072, 768), ("1344x128", 12, 1344, 128)]


def fp32_ns(X0):
    X = X0.float()
    tall = X.shape[-2] > X.shape[-1]
    Y = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)
    for a, b, c in COEF:
        A = Y.mT @ Y if tall else Y @ Y.mT
        B = b * A + c * A @ A
        Y = a * Y + (Y @ B if tall else B @ Y)
    return Y


def poly(X, fold: bool, tri_b: bool):
    """In place on X (n, rows, cols) bf16."""
    tall = X.shape[-2] > X.shape[-1]
    if fold:
        A = X.mT @ X if tall else X @ X.mT  # unnormalized Gram (n, m, m)
        norm = A.diagonal(dim1=-2, dim2=-1).float().sum(-1).sqrt().clamp(min=EPS)  # ||X||_F (n,)
        K._scale_kernel[(-(-A[0].numel() // K._BLOCK), A.shape[0])](A, norm * norm, A[0].numel(), EPS * EPS,
                                                                     BLOCK=K._BLOCK, INTERPRET=False)
        Y = X
    else:
        Y = M._normalize_(X, EPS, "triton")
        A = None
    for i, (a, b, c) in enumerate(COEF):
        if A is None:
            A = Y.mT @ Y if tall else Y @ Y.mT
        if tri_b == "AT":  # P = A (c A + b I) + a I: one scaling pass and a plain bmm instead of baddbmm
            T = A.mul(c)
            T.diagonal(dim1=-2, dim2=-1).add_(b)
            P = torch.bmm(A, T)
        elif tri_b:
            P = K._addmm_triton(A, A, A, c, b, torch.empty_like(A))
        else:
            P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        if fold and i == 0:
            K._scale_kernel[(-(-P[0].numel() // K._BLOCK), P.shape[0])](P, norm, P[0].numel(), EPS,
                                                                         BLOCK=K._BLOCK, INTERPRET=False)
        out = X if i == STEPS - 1 else None
        Y = torch.bmm(Y, P, out=out) if tall else torch.bmm(P, Y, out=out)
        A = None
    return X


VARIANTS = {
    "current_triton": lambda X: M._orthogonalize_(X, STEPS, COEF, EPS, "triton"),
    "current_torch": lambda X: M._orthogonalize_(X, STEPS, COEF, EPS, "torch"),
    "poly_bmm": lambda X: poly(X, False, False),
    "poly_tritonB": lambda X: poly(X, False, True),
    "poly_AT": lambda X: poly(X, False, "AT"),
    "poly_bmm_fold": lambda X: poly(X, True, False),
    "poly_tritonB_fold": lambda X: poly(X, True, True),
}


def time_ms(fn, X0, reps=20):
    X = X0.clone()
    fn(X)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    total = 0.0
    for _ in range(reps):
        X.copy_(X0)
        s.record()
        fn(X)
        e.record()
        e.synchronize()
        total += s.elapsed_time(e)
    return total / reps


out = {"device": torch.cuda.get_device_name(), "coefficients": COEF, "steps": STEPS, "classes": {}}
torch.manual_seed(0)
for label, n, rows, cols in CLASSES:
    X0 = torch.randn(n, rows, cols, device="cuda").bfloat16()
    ref = fp32_ns(X0)
    row = {}
    for name, fn in VARIANTS.items():
        X = X0.clone()
        fn(X)
        err = ((X.float() - ref).norm() / ref.norm()).item()
        row[name] = {"ms": time_ms(fn, X0), "rel_err_vs_fp32": err}
    out["classes"][label] = row
    print(label, " | ".join(f"{k} {v['ms']*1e3:.0f}us err {v['rel_err_vs_fp32']:.2e}" for k, v in row.items()), flush=True)
json.dump(out, open(os.environ.get("OUT", ".") + "/ns_poly_probe.json", "w"), indent=1)
