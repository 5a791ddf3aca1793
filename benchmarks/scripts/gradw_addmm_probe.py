"""Probe of the fused linear-CE lean mode's weight-gradient update C[V, D] += G[K, V]^T @ H[K, D]
(K = 512 chunk rows, V = 131072, D = 4096, bf16): cuBLAS addmm against a plain mm (no read of C) and
a Triton GEMM that loads C before or after its K loop (does overlapping C's read-modify-write pay?).

    PYTHONPATH=$PWD python benchmarks/scripts/gradw_addmm_probe.py   # CUDA; OUT=dir also writes OUT/gradw_probe.json
On CPU (TRITON_INTERPRET=1) it only checks the Triton kernel on a small shape.
Session 10 (H200): s10_gradw_addmm_probe.json.
"""
import json, os
import torch, triton, triton.language as tl

def configs():
    out = []
    for bm, bn, bk, w, s in [(128,128,64,4,3),(128,128,64,8,3),(128,128,64,4,4),(128,256,64,8,3),(256,128,64,8,3),
                             (128,256,64,8,4),(64,256,64,4,4),(128,128,128,8,3),(256,128,64,8,4)]:
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s))
    return out if not os.environ.get("TRITON_INTERPRET") else out[:1]

@triton.autotune(configs=configs(), key=["V", "D", "K"], restore_value=["c_ptr"])
@triton.jit
def addmm_t_kernel(g_ptr, h_ptr, c_ptr, V, D, K, stride_g, stride_h, stride_c,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EARLY_C: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    c_ptrs = c_ptr + offs_m[:, None] * stride_c + offs_n[None, :]
    mask_c = (offs_m[:, None] < V) & (offs_n[None, :] < D)
    if EARLY_C:
        c = tl.load(c_ptrs, mask=mask_c, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        offs_k = k + tl.arange(0, BK)
        a = tl.load(g_ptr + offs_k[:, None].to(tl.int64) * stride_g + offs_m[None, :],
                    mask=(offs_k[:, None] < K) & (offs_m[None, :] < V), other=0.0)  # (BK, BM)
        b = tl.load(h_ptr + offs_k[:, None] * stride_h + offs_n[None, :],
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < D), other=0.0)  # (BK, BN)
        if INTERPRET:
            a = a.to(tl.float32); b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc)
    if not EARLY_C:
        c = tl.load(c_ptrs, mask=mask_c, other=0.0)
    acc += c.to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)

def addmm_t(c, g, h, early):
    K, V = g.shape; D = h.shape[1]
    grid = lambda m: (triton.cdiv(V, m["BM"]) * triton.cdiv(D, m["BN"]),)
    addmm_t_kernel[grid](g, h, c, V, D, K, g.stride(0), h.stride(0), c.stride(0), EARLY_C=early, INTERPRET=os.environ.get('TRITON_INTERPRET') == '1')
    return c

def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    K, V, D = (512, 131072, 4096) if dev == "cuda" else (64, 256, 128)
    torch.manual_seed(0)
    g = (torch.randn(K, V, device=dev) * 1e-3).bfloat16()
    h = torch.randn(K, D, device=dev).bfloat16()
    c0 = (torch.randn(V, D, device=dev) * 1e-2).bfloat16()
    ref = (c0.float() + g.float().t() @ h.float())
    res = {}
    for early in (False, True):
        c = addmm_t(c0.clone(), g, h, early)
        err = ((c.float() - ref).norm() / ref.norm()).item()
        res[f"triton_early{int(early)}_err"] = err
    if dev != "cuda":
        print(res); return
    from triton.testing import do_bench
    c = c0.clone()
    res["cublas_bf16_ms"] = do_bench(lambda: torch.addmm(c, g.t(), h, out=c))
    res["cublas_bf16_ht_ms"] = do_bench(lambda: c.t().addmm_(h.t(), g))  # C^T += H^T G
    cf = c0.float()
    res["cublas_fp32c_ms"] = do_bench(lambda: torch.addmm(cf, g.t(), h, out_dtype=torch.float32, out=cf))
    res["cublas_mm_noacc_ms"] = do_bench(lambda: torch.mm(g.t(), h, out=c))
    for early in (False, True):
        res[f"triton_early{int(early)}_ms"] = do_bench(lambda: addmm_t(c, g, h, early))
        res[f"triton_early{int(early)}_cfg"] = str(addmm_t_kernel.best_config)
    res["triton_fp32c_ms"] = do_bench(lambda: addmm_t(cf, g, h, True))
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = do_bench(lambda: a @ a); res["matmul_8192_tflops"] = 2 * 8192**3 / t / 1e9
    flop = 2 * K * V * D
    for k in list(res):
        if k.endswith("_ms"):
            res[k.replace("_ms", "_tflops")] = flop / res[k] / 1e9
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT")
    if out:
        json.dump(res, open(f"{out}/gradw_probe.json", "w"), indent=1)

main()
