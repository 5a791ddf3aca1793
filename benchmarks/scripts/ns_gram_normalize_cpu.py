"""CPU numbers behind session 11's notes on the gram-normalized Triton Newton–Schulz (no GPU needed):

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/scripts/ns_gram_normalize_cpu.py

1. Relative error of 5 bf16 NS steps against fp64 NS, per matrix, for the torch reference and the
   Triton path (interpreted), on random blocks with norms from 1e-3 to 1e2.
2. Relative difference of one Muon update (4 Polar Express steps) between the two paths.
3. The norm range both paths handle: the NS output's Frobenius norm for inputs scaled by 1e-25 ... 1e20.
4. small-moe's NS rounds per step at train.muon_batch_numel 2^26, 2^27, 2^28 (muon_plan, no kernels run).
"""
import torch

from moespeed.config import build_config
from moespeed.model.transformer import Transformer
from moespeed.optim import muon as M
from moespeed.optim import muon_plan as P
from moespeed.optim.build import build_optimizer
from moespeed.optim.polar_express import polar_express_coefficients


def exact_ns(X, steps):
    """NS in float64: the torch reference path run on a double copy."""
    Y = X.double()
    M._orthogonalize_(Y, steps, M.NS_COEFFICIENTS, M.EPS)
    return Y


g = torch.Generator().manual_seed(0)
print("1. bf16 NS (5 steps) vs fp64 NS, relative error per matrix")
for shape in [(6, 64, 192), (6, 192, 64), (4, 33, 17)]:
    X = (torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None, None]).bfloat16()
    exact = exact_ns(X, 5)
    for gemm in ("torch", "triton"):
        Y = X.clone()
        M._orthogonalize_(Y, 5, M.NS_COEFFICIENTS, M.EPS, gemm)
        err = (Y.double() - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))
        print(f"   {shape} {gemm:6} " + " ".join(f"{e:.4f}" for e in err.tolist()))

print("2. one Muon update, Triton path vs torch reference (4 Polar Express steps)")
shapes, updates = [(8, 64, 192), (8, 192, 64), (96, 96)], {}
for gemm in ("torch", "triton"):
    ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    start = [p.detach().clone() for p in ps]
    opt = M.Muon(ps, lr=0.02, ns_steps=4, ns_coefficients=polar_express_coefficients(4, 3e-3), ns_gemm=gemm,
                 fused=gemm == "triton", adjust_lr_fn="match_rms_adamw")
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))
    opt.step()
    updates[gemm] = torch.cat([(p.detach() - s).flatten() for p, s in zip(ps, start)])
print(f"   relative difference {((updates['triton'] - updates['torch']).norm() / updates['torch'].norm()).item():.4f}")

print("3. NS output norm for inputs scaled by s (random (2, 16, 24) blocks)")
for s in (1e-25, 1e-18, 1e-17, 1e-16, 1e-10, 1e10, 1e16, 1e17, 1e18, 1e20):
    X = (torch.randn(2, 16, 24, generator=g) * s).bfloat16()
    out = {}
    for gemm in ("torch", "triton"):
        Y = X.clone()
        M._orthogonalize_(Y, 5, M.NS_COEFFICIENTS, M.EPS, gemm)
        out[gemm] = " ".join(f"{v:.3g}" for v in Y.float().norm(dim=(-2, -1)).tolist())
    print(f"   s = {s:g}: {out}")

print("4. small-moe NS rounds per Muon step")
cfg = build_config("small-moe", None, [])
cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
opt = build_optimizer(Transformer(cfg.model), cfg.train)[0].optimizers["muon"]
for p in opt.param_groups[0]["params"]:
    p.grad = torch.zeros(1).expand(p.shape)
for bn in (2**26, 2**27, 2**28):
    plan = P.plan_classes(opt.param_groups, False, opt.merge_numel, P.PAD_FLOPS, bn)
    rounds = sum(len(P.round_sizes(c.n_blocks, max(1, bn // (c.rows * c.cols)))) for c in plan)
    print(f"   batch_numel 2^{bn.bit_length() - 1}: {len(plan)} classes, {rounds} rounds")
