"""Benchmark of the fused linear + cross-entropy loss against its peers (CUDA only).

    python -m moespeed.bench.linear_ce --json benchmarks/results/linear_ce.json [--quick] [--sweep]

For each shape (N tokens, D hidden, V vocab; bf16), every case runs forward+backward
(`torch.autograd.grad` of the loss w.r.t. hidden and weight) and reports:
- rel. error of loss, grad_hidden, grad_weight vs the fp32 materialized reference (NaN fails),
- median ms (triton.testing.do_bench), peak MiB above the inputs, achieved TFLOP/s (3 GEMMs),
- speedup = liger_ms / case_ms (Liger with its defaults: bf16 weight-gradient accumulation).
Cases: naive (materialized logits), liger, liger with fp32 accumulation, cut-cross-entropy, and
moespeed chunked / triton (default: fp32 accumulation) / triton-lean (bf16 accumulation with
Liger's chunk size, i.e. Liger's memory). A failing case (ImportError, OOM, ...) is reported and
the others go on. A short table is printed last.
"""
import argparse
import datetime
import json
import sys
import traceback

import torch
import torch.nn.functional as F

from moespeed.bench.common import free_memory, git_commit, package_version, rel_err, save_json
from moespeed.kernels import linear_ce as lce

SHAPES = [(16384, 4096, 131072), (16384, 1024, 32768)]
QUICK_SHAPES = [(4096, 1024, 32768)]
IGNORED_FRACTION = 0.05
MIB = 2**20
DEVICE = "cuda"


def make_inputs(n, d, v, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(n, d, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device=DEVICE, generator=gen) * d**-0.5).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    ignored = torch.rand(n, device=DEVICE, generator=gen) < IGNORED_FRACTION
    targets[ignored] = -100
    return hidden, weight, targets


# ------------------------------------------------------------------------------ cases
def naive_loss(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)


def liger_case(accum_dtype):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, accum_dtype=accum_dtype)
    return lambda h, w, t: module(w, h, t)


def cce_case():
    from cut_cross_entropy import linear_cross_entropy as cce

    return lambda h, w, t: cce(h, w, t, ignore_index=-100)


def ours_case(**kwargs):
    return lambda h, w, t: lce.linear_cross_entropy(h, w, t, **kwargs)


def build_cases(n, d, v, sweep):
    """[(name, factory)]: factory() returns loss_fn(h, w, t), may raise ImportError."""
    lean_chunk = lce.lean_chunk_size(n, d, v)
    cases = [
        ("naive", lambda: naive_loss),
        ("liger", lambda: liger_case(None)),
        ("liger_fp32acc", lambda: liger_case(torch.float32)),
        ("cce", cce_case),
        ("ours_chunked", lambda: ours_case(backend="chunked")),
        ("ours_triton", lambda: ours_case(backend="triton")),
        (f"ours_triton_lean_c{lean_chunk}",
         lambda: ours_case(backend="triton", accum_dtype=None, chunk_size=lean_chunk)),
        (f"ours_triton_lean_c{lean_chunk}_no_overlap",
         lambda: ours_case(backend="triton", accum_dtype=None, chunk_size=lean_chunk,
                           overlap=False)),
    ]
    if sweep:
        cases.append(("ours_triton_no_overlap", lambda: ours_case(backend="triton", overlap=False)))
        for chunk in (1024, 4096):
            cases.append((f"ours_triton_c{chunk}", lambda c=chunk: ours_case(backend="triton",
                                                                          chunk_size=c)))
        for chunk in (1024, 2048):
            cases.append((f"ours_triton_bf16acc_c{chunk}",
                          lambda c=chunk: ours_case(backend="triton", accum_dtype=None,
                                                    chunk_size=c)))
    return cases


# ------------------------------------------------------------------------------ measuring
def fwd_bwd(loss_fn, h, w, t):
    loss = loss_fn(h, w, t)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss, grad_h, grad_w


def reference(h, w, t):
    """fp32 loss and grads from the materialized definition (TF32 off)."""
    hf = h.detach().float().requires_grad_()
    wf = w.detach().float().requires_grad_()
    loss, gh, gw = fwd_bwd(lambda a, b, c: lce.reference_linear_cross_entropy(a, b, c), hf, wf, t)
    return loss.detach(), gh, gw


def peak_mib(fn):
    """Peak allocated MiB above what was allocated before `fn` ran (inputs excluded)."""
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / MIB


def run_case(name, factory, inputs, ref, flops):
    from triton.testing import do_bench

    h, w, t = inputs
    row = {"case": name}
    try:
        loss_fn = factory()
        loss, gh, gw = fwd_bwd(loss_fn, h, w, t)  # also warms up / compiles
        errs = [rel_err(loss, ref[0]), rel_err(gh, ref[1]), rel_err(gw, ref[2])]
        del loss, gh, gw
        row.update(err_loss=errs[0], err_grad_hidden=errs[1], err_grad_weight=errs[2])
        row["correct"] = all(e <= 1e-2 for e in errs)  # NaN compares False
        row["peak_mib"] = peak_mib(lambda: fwd_bwd(loss_fn, h, w, t))
        free_memory()
        row["ms"] = do_bench(lambda: fwd_bwd(loss_fn, h, w, t), warmup=300, rep=2000,
                             return_mode="median")
        row["tflops"] = flops / row["ms"] / 1e9
    except Exception as exc:  # noqa: BLE001 - report and continue with the next case
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not isinstance(exc, ImportError):
            traceback.print_exc()
    free_memory()
    return row


CE_CONFIGS = [(None, None), (4096, 8), (8192, 16), (16384, 16), (32768, 32)]  # (block, warps)


def ce_kernel_gbps(n_rows, v, dtype, block=None, num_warps=None):
    """Bandwidth of the Triton softmax/gradient step alone on a (n_rows, V) logits chunk.

    Counts 2 reads + 1 write of the chunk (pass 2 may hit L2, so > HBM bandwidth is possible).
    """
    from triton.testing import do_bench

    logits = torch.randn(n_rows, v, device=DEVICE).to(dtype)
    targets = torch.randint(0, v, (n_rows,), device=DEVICE)
    row_loss = torch.empty(n_rows, device=DEVICE)
    scale = torch.tensor(1.0 / n_rows, device=DEVICE)
    work = logits.clone()

    def step():
        work.copy_(logits)  # timed separately below and subtracted
        lce._ce_chunk_triton(work, targets, row_loss, scale, -100, 0.0, 0.0, True,
                             block=block, num_warps=num_warps)

    ms = do_bench(step, return_mode="median") - do_bench(lambda: work.copy_(logits),
                                                         return_mode="median")
    bytes_moved = 3 * n_rows * v * logits.element_size()  # 2 reads + 1 write
    return ms, bytes_moved / ms / 1e6


def chunk_parts_ms(n, d, v, chunk, dtype):
    """Median ms of each step of one chunk, alone: the three GEMMs, the CE kernel, and the
    grad_W product with a bf16 (beta=1) and an fp32 accumulator. Shows where small chunks lose."""
    from triton.testing import do_bench

    h = torch.randn(chunk, d, device=DEVICE).to(dtype)
    w = torch.randn(v, d, device=DEVICE).to(dtype) * 0.02
    logits = torch.empty(chunk, v, device=DEVICE, dtype=dtype)
    targets = torch.randint(0, v, (chunk,), device=DEVICE)
    row_loss = torch.empty(chunk, device=DEVICE)
    scale = torch.tensor(1.0 / n, device=DEVICE)
    grad_h = torch.empty(chunk, d, device=DEVICE, dtype=dtype)
    acc16 = torch.zeros(v, d, device=DEVICE, dtype=dtype)
    torch.mm(h, w.t(), out=logits)
    lce._ce_chunk_triton(logits, targets, row_loss, scale, -100, 0.0, 0.0, True)
    parts = {
        "logits_mm": do_bench(lambda: torch.mm(h, w.t(), out=logits), return_mode="median"),
        "grad_h_mm": do_bench(lambda: torch.mm(logits, w, out=grad_h), return_mode="median"),
        "grad_w_addmm_bf16": do_bench(lambda: lce._addmm_into(acc16, logits.t(), h, False),
                                      return_mode="median"),
    }
    acc16 = None  # frees its memory (the lambda above has run)
    acc32 = torch.zeros(v, d, device=DEVICE)
    parts["grad_w_addmm_fp32"] = do_bench(lambda: lce._addmm_into(acc32, logits.t(), h, False),
                                          return_mode="median")
    acc32 = None
    work = logits.clone()
    parts["ce_kernel"] = do_bench(lambda: (work.copy_(logits), lce._ce_chunk_triton(
        work, targets, row_loss, scale, -100, 0.0, 0.0, True)), return_mode="median") - do_bench(
        lambda: work.copy_(logits), return_mode="median")
    return {k: round(val, 4) for k, val in parts.items()}


def matmul_ceiling_tflops(dtype):
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=DEVICE).to(dtype)
    b = torch.randn(8192, 8192, device=DEVICE).to(dtype)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def copy_ceiling_gbps():
    from triton.testing import do_bench

    src = torch.empty(2**28, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6  # read + write


def bench_shape(n, d, v, dtype, sweep):
    print(f"\n== N={n} D={d} V={v} {dtype} ==", flush=True)
    inputs = make_inputs(n, d, v, dtype)
    ref = reference(*inputs)
    free_memory()
    flops = 3 * 2 * n * d * v
    rows = []
    for name, factory in build_cases(n, d, v, sweep):
        row = run_case(name, factory, inputs, ref, flops)
        row.update(shape={"N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", "")})
        print(json.dumps(row), flush=True)
        rows.append(row)
    del ref, inputs
    free_memory()
    return rows


def to_results(rows):
    """BENCHMARKING.md rows: ours_* / peer_* / speedup (= liger_ms / ours_ms) per case."""
    results = []
    liger = {json.dumps(r["shape"]): r for r in rows if r["case"] == "liger" and "ms" in r}
    for r in rows:
        peer = liger.get(json.dumps(r["shape"]))
        ours = r["case"].startswith("ours")
        out = {"bench": "linear_ce.fwd_bwd", **r,
               "ours_ms": r.get("ms") if ours else None,
               "ours_peak_mib": r.get("peak_mib") if ours else None,
               "peer": f"liger-kernel {package_version('liger-kernel')}" if peer else None,
               "peer_ms": peer["ms"] if peer else None,
               "peer_peak_mib": peer["peak_mib"] if peer else None,
               "speedup": (peer["ms"] / r["ms"]) if peer and "ms" in r else None,
               "gbps": None,
               "notes": None}
        results.append(out)
    return results


def print_table(results, extras):
    head = (f"{'shape N,D,V':>20} {'case':>28} {'ms':>8} {'peak MiB':>9} {'TFLOP/s':>8} "
            f"{'x liger':>7} {'err loss':>9} {'err dh':>9} {'err dW':>9}")
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        s = r["shape"]
        shape = f"{s['N']},{s['D']},{s['V']}"
        if "error" in r:
            print(f"{shape:>20} {r['case']:>28}  ERROR {r['error'][:70]}")
            continue
        sp = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        print(f"{shape:>20} {r['case']:>28} {r['ms']:8.2f} {r['peak_mib']:9.0f} "
              f"{r['tflops']:8.1f} {sp:>7} {r['err_loss']:9.2e} {r['err_grad_hidden']:9.2e} "
              f"{r['err_grad_weight']:9.2e}{'' if r['correct'] else '  WRONG'}")
    for key, value in extras.items():
        print(f"{key}: {value}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (BENCHMARKING.md format)")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES}")
    parser.add_argument("--sweep", action="store_true", help="also other chunk sizes/accums")
    parser.add_argument("--shape", action="append", help="N,D,V (repeatable), replaces defaults")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("linear_ce bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shape:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    dtype = torch.bfloat16
    extras = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": package_version("triton"), "liger": package_version("liger-kernel"),
              "cce": package_version("cut-cross-entropy"),
              "auto_uses_triton": lce.triton_works("cuda")}
    try:
        extras["matmul_8192_tflops"] = round(matmul_ceiling_tflops(dtype), 1)
        extras["copy_gbps"] = round(copy_ceiling_gbps())
        chunk = lce.default_chunk_size(shapes[0][0], shapes[0][2], 2)
        for block, warps in CE_CONFIGS if args.sweep else CE_CONFIGS[:1]:
            ce_ms, ce_gbps = ce_kernel_gbps(chunk, shapes[0][2], dtype, block, warps)
            key = f"ce_kernel_{chunk}x{shapes[0][2]}_block{block or 'default'}_warps{warps or ''}"
            extras[key] = f"{ce_ms:.3f} ms, {ce_gbps:.0f} GB/s"
        if args.sweep:
            n, d, v = shapes[0]
            for chunk in sorted({lce.lean_chunk_size(n, d, v), 1024, 4096}):
                extras[f"chunk_parts_ms_{n}x{d}x{v}_c{chunk}"] = chunk_parts_ms(n, d, v, chunk,
                                                                                dtype)
                free_memory()
    except Exception as exc:  # noqa: BLE001 - extras are optional
        extras["extras_error"] = repr(exc)
    rows = []
    for n, d, v in shapes:
        rows += bench_shape(n, d, v, dtype, args.sweep)
    results = to_results(rows)
    extras["fp32_addmm_fused"] = lce._MIXED_ADDMM["ok"]  # False: the slower fallback was used
    if args.json:
        doc = {"device": extras["device"], "torch": extras["torch"], "triton": extras["triton"],
               "commit": git_commit(), "date": datetime.date.today().isoformat(),
               "command": "python -m moespeed.bench.linear_ce " + " ".join(sys.argv[1:]),
               "extras": extras, "results": results}
        save_json(args.json, doc)
    print_table(results, extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
