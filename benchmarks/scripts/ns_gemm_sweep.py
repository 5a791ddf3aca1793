"""Sweep Triton configs of Muon's NS addmm on the shapes of small / small-moe's classes (H100).

CUDA only. From the repository root: PYTHONPATH=$PWD python benchmarks/scripts/ns_gemm_sweep.py
(prints a line per shape, writes $OUT/ns_gemm_sweep.json).
"""
import itertools, json, os, torch, triton
from moespeed.kernels import muon_triton as K

# (label, n, M, N, K): B = bA + cA^2 is (m, m, m); the update is B Y (m, m) @ (m, n) or Y B for tall
SHAPES = [("moe A^2 256", 235, 256, 256, 256), ("moe BY 256x768", 235, 256, 768, 256),
          ("moe YB 768x256", 235, 768, 256, 256),
          ("small A^2 384", 36, 384, 384, 384), ("small BY 384x768", 36, 384, 768, 384),
          ("small A^2 768", 12, 768, 768, 768), ("small BY 768x3072", 12, 768, 3072, 768)]
cfgs = []
for bm, bn, bk, w, st in itertools.product([64, 128], [64, 128, 256], [64, 128], [4, 8], [2, 3, 4]):
    smem = st * (bm * bk + bk * bn) * 2
    if smem > 200_000 or (bm * bn >= 128 * 256 and w == 4) or (bm * bn <= 64 * 64 and w == 8):
        continue
    cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st))
print(len(cfgs), "configs", flush=True)
base = K._addmm_kernel.fn  # heuristics(jit)

def timeit(fn, reps=30):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(reps): fn()
    e.record(); e.synchronize(); return s.elapsed_time(e) / reps

out = {}
for label, n, M, N, Kd in SHAPES:
    L = torch.randn(n, M, Kd, device="cuda").bfloat16(); R = torch.randn(n, Kd, N, device="cuda").bfloat16()
    D = torch.randn(n, M, N, device="cuda").bfloat16(); C = torch.empty_like(D)
    flops = 2 * n * M * N * Kd
    default = timeit(lambda: K._addmm_triton(L, R, D, 0.5, 1.5, C))
    cub = timeit(lambda: torch.baddbmm(D, L, R, beta=1.5, alpha=0.5))
    bmm = timeit(lambda: torch.bmm(L, R))
    res = []
    for cfg in cfgs:
        kern = triton.autotune(configs=[cfg], key=["M", "N", "K"])(base)
        grid = lambda meta: (n * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        f = lambda: kern[grid](*K._addmm_args(L, R, D, 0.5, 1.5, C), SCALED=False, INTERPRET=False, NO_D=False)
        try:
            res.append((timeit(f), str(cfg)))
        except Exception as exc:  # out of resources
            pass
    res.sort()
    out[label] = dict(default_ms=default, baddbmm_ms=cub, bmm_ms=bmm, best=res[:5], tflops_default=flops / default / 1e9,
                      tflops_best=flops / res[0][0] / 1e9)
    print(f"{label}: default {default*1e3:.0f}us ({flops/default/1e9:.0f} TF/s)  baddbmm {cub*1e3:.0f}us  bmm {bmm*1e3:.0f}us  "
          f"best {res[0][0]*1e3:.0f}us ({flops/res[0][0]/1e9:.0f} TF/s) {res[0][1]} | 2nd {res[1][0]*1e3:.0f} {res[1][1]} | 3rd {res[2][0]*1e3:.0f} {res[2][1]}", flush=True)
json.dump(out, open(os.environ.get("OUT", ".") + "/ns_gemm_sweep.json", "w"), indent=1)
