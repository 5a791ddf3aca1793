"""Microbench: per-matrix Frobenius normalization of NS inputs (bf16 batches).

CUDA only. From the repository root: PYTHONPATH=$PWD python benchmarks/scripts/ns_normalize_microbench.py
(prints a line per shape (saved as benchmarks/results/s7_ns_normalize_microbench.txt)).
"""
import torch, triton, triton.language as tl

@triton.jit
def _sumsq_kernel(x_ptr, out_ptr, numel, chunks, BLOCK: tl.constexpr):
    z = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0)
    offs = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + z * numel + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(out_ptr + z * chunks + c, tl.sum(x * x))

def sumsq(X, BLOCK=8192):
    n = X.shape[0]; numel = X[0].numel(); chunks = triton.cdiv(numel, BLOCK)
    part = torch.empty(n, chunks, device=X.device, dtype=torch.float32)
    _sumsq_kernel[(chunks, n)](X, part, numel, chunks, BLOCK=BLOCK)
    return part.sum(1)

def t(fn, X0, reps=50):
    X = X0.clone(); fn(X); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(reps): fn(X)
    e.record(); e.synchronize(); return s.elapsed_time(e) / reps

for shape in [(235, 768, 256), (12, 3072, 768), (36, 384, 768), (12, 1344, 128)]:
    X0 = torch.randn(shape, device="cuda").bfloat16()
    res = {
      "current norm+div": t(lambda X: X.div_(X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)), X0),
      "norm only": t(lambda X: X.norm(dim=(-2, -1), keepdim=True), X0),
      "vector_norm view": t(lambda X: torch.linalg.vector_norm(X.view(X.shape[0], -1), dim=-1), X0),
      "foreach_norm": t(lambda X: torch._foreach_norm(list(X)), X0),
      "triton sumsq 8192": t(lambda X: sumsq(X), X0),
      "triton sumsq 2048": t(lambda X: sumsq(X, 2048), X0),
      "triton sumsq + mul_": t(lambda X: X.mul_(sumsq(X).sqrt().clamp(min=1e-7).reciprocal().to(X.dtype)[:, None, None]), X0),
      "triton sumsq + div_ fp32": t(lambda X: X.div_(sumsq(X).sqrt().clamp(min=1e-7)[:, None, None]), X0),
      "mul_ only": t(lambda X: X.mul_(1.0), X0),
    }
    ref = X0.float().norm(dim=(-2, -1)); mine = sumsq(X0).sqrt()
    gb = X0.numel() * 2 / 1e9
    print(shape, f"{gb*1e3:.0f} MB", " | ".join(f"{k} {v*1e3:.0f}us" for k, v in res.items()), f"| relerr {((mine-ref).abs()/ref).max():.1e}")
