"""PEER layer benchmark: ours (fused Triton) vs our PyTorch reference vs peer-pytorch 0.2.2.

    python -m moespeed.bench.peer --json benchmarks/results/peer.json

Default shape (the PEER paper's): d_model 1024, 1024 x 1024 = 1,048,576 single-neuron experts,
8 heads x 16 experts, 8192 tokens (4 x 2048), bf16 parameters and activations, GELU (peer-pytorch's
activation, so both compute the same function). Steps:
1. correctness on fresh random inputs: the fused expert mix (bf16) against the reference in fp32,
   and the whole layer with kernel=triton against kernel=reference (same bf16 weights);
2. per case, forward and forward+backward time (triton.testing.do_bench, median) and the peak
   memory of one forward+backward, net of everything allocated before it (parameters, inputs);
   parameter gradients are produced by the step, so they count (grads are None before it);
3. the expert mix alone (given the retrieval), to show the kernels' effective bandwidth.
Effective bandwidth counts the fewest DRAM bytes of the expert part: forward reads the selected
rows of `down` and `up` (2 * pairs * D * s bytes, pairs = tokens * heads * k, s = 2 for bf16);
forward+backward adds re-reading them (2 * pairs * D * s) and writing the dense table gradients
(2 * N * D * s). A failing case (import error, OOM) is reported and the others go on.
On a machine without CUDA it runs as a smoke test (CPU timer, no memory numbers; the Triton case
needs TRITON_INTERPRET=1 there), e.g. --tokens 64 --d-model 64 --sub-keys 16.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn

from moespeed.kernels import peer_triton
from moespeed.kernels.peer_triton import peer_experts_reference, peer_experts_triton
from moespeed.model.peer import PEER, PEERConfig

MIB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moespeed.bench.peer", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here (BENCHMARKING.md format)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch * seq)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (tokens must divide by it)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--sub-keys", type=int, default=1024, help="n: n * n experts")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16, help="experts per head per token")
    p.add_argument("--query-dim", type=int, default=128, help="per head; peer-pytorch dim_key = half")
    p.add_argument("--check-tokens", type=int, default=1024, help="tokens for the fp32 expert-mix check")
    p.add_argument("--cases", default="ours,reference,peer", help="comma list of ours,reference,peer")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measuring
def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor], device: torch.device) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA, a plain timer elsewhere."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], grad_to_none: list[torch.Tensor], device: torch.device) -> float | None:
    """Peak MiB allocated while fn() runs, net of what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / MIB
    for t in grad_to_none:
        t.grad = None
    return round(peak, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (NaN if either has a NaN)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def copy_gbps(device: torch.device) -> float | None:
    """Device copy ceiling: GB/s of a 1 GiB copy, counting read + write."""
    if device.type != "cuda":
        return None
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), [], device)
    return round(2 * src.numel() / ms / 1e6, 1)


# ----------------------------------------------------------------------------- the layers
def our_layer(args, device: torch.device, kernel: str) -> PEER:
    n = args.sub_keys
    cfg = PEERConfig(num_experts=n * n, product_key_dim=[n, n], num_experts_per_tok=args.topk,
                     num_heads=args.heads, query_dim=args.query_dim, activation="gelu", kernel=kernel)
    with device:
        return PEER(args.d_model, cfg).to(torch.bfloat16)


def peer_pytorch_layer(args, device: torch.device) -> nn.Module:
    """peer-pytorch 0.2.2 configured as the paper's PEER (softmax over competing top-k scores)."""
    from PEER_pytorch import PEER as PeerPytorch
    with device:
        layer = PeerPytorch(dim=args.d_model, heads=args.heads, num_experts=args.sub_keys ** 2,
                            num_experts_per_head=args.topk, dim_key=args.query_dim // 2,
                            product_key_topk=args.topk, non_competing_scores=False, activation=nn.GELU)
    return layer.to(torch.bfloat16)


def peer_pytorch_version() -> str:
    try:
        from importlib.metadata import version
        return "peer-pytorch " + version("PEER-pytorch")
    except Exception:  # noqa: BLE001 - metadata missing: name it without a version
        return "peer-pytorch"


# ----------------------------------------------------------------------------- correctness
def check_mix(args, device: torch.device) -> dict:
    """Fused expert mix (bf16 operands) vs the reference in fp32, outputs and all gradients."""
    T, D, N = args.check_tokens, args.d_model, args.sub_keys ** 2
    P = args.heads * args.topk
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16)
    rows = torch.randint(0, N, (T, P), device=device, generator=g)
    w = torch.rand(T, P, device=device, generator=g).softmax(-1)
    down = (torch.randn(N, D, device=device, generator=g) * 0.05).to(torch.bfloat16)
    up = (torch.randn(N, D, device=device, generator=g) * 0.05).to(torch.bfloat16)
    dy = torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16)
    out = []
    for fn, dtype in ((peer_experts_triton, torch.bfloat16), (peer_experts_reference, torch.float32)):
        ins = [t.detach().to(dtype if t is not w else torch.float32).requires_grad_()
               for t in (x, w, down, up)]  # retrieval weights stay fp32, as in the layer
        y = fn(ins[0], rows, ins[1], ins[2], ins[3], "gelu")
        y.backward(dy.to(dtype))
        out.append([y.detach()] + [t.grad for t in ins])
        del ins, y
    names = ("y", "grad_x", "grad_w", "grad_down", "grad_up")
    return {name: rel_err(a, b) for name, a, b in zip(names, *out)}


def check_layer(args, layer: PEER, device: torch.device) -> dict:
    """The bf16 layer with kernel=triton vs kernel=reference at the benchmark shape (so the kernels
    are autotuned for it): output and every gradient."""
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(args.tokens // args.seq, args.seq, args.d_model, device=device, generator=g,
                    dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    out = []
    for kernel in ("triton", "reference"):
        layer.cfg.kernel = kernel
        xi = x.clone().requires_grad_()
        y = layer(xi)
        params = [xi] + list(layer.parameters())
        out.append([y.detach()] + list(torch.autograd.grad(y, params, dy)))
        del y
    layer.cfg.kernel = "triton"
    names = ["y", "grad_x"] + ["grad_" + n for n, _ in layer.named_parameters()]
    return {name: rel_err(a, b) for name, a, b in zip(names, *out)}


# ----------------------------------------------------------------------------- cases
def time_layer(layer: nn.Module, args, device: torch.device) -> dict:
    """Forward and forward+backward ms and the fwd+bwd peak MiB of one layer on fresh inputs."""
    x = torch.randn(args.tokens // args.seq, args.seq, args.d_model, device=device,
                    dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    params = [x] + list(layer.parameters())

    def fwd_bwd():
        layer(x).backward(dy)

    fwd_bwd()  # compile / autotune
    res = {"fwd_ms": bench_ms(lambda: layer(x), params, device),
           "fwd_bwd_ms": bench_ms(fwd_bwd, params, device),
           "peak_mib": peak_mib(fwd_bwd, params, device)}
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}


def time_mix(args, device: torch.device) -> dict:
    """The expert mix alone (random retrieval): fused kernels vs reference, bf16."""
    T, D, N, P = args.tokens, args.d_model, args.sub_keys ** 2, args.heads * args.topk
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    rows = torch.randint(0, N, (T, P), device=device)
    w = torch.rand(T, P, device=device).softmax(-1).requires_grad_()
    down = nn.Parameter(torch.randn(N, D, device=device, dtype=torch.bfloat16) * 0.02)
    up = nn.Parameter(torch.randn(N, D, device=device, dtype=torch.bfloat16) * 0.02)
    dy = torch.randn_like(x)
    tensors = [x, w, down, up]
    out = {}
    for name, fn in (("ours", peer_experts_triton), ("reference", peer_experts_reference)):
        try:
            fn(x, rows, w, down, up, "gelu").backward(dy)  # compile / autotune
            out[name] = {
                "fwd_ms": round(bench_ms(lambda: fn(x, rows, w, down, up, "gelu"), tensors, device), 3),
                "fwd_bwd_ms": round(bench_ms(lambda: fn(x, rows, w, down, up, "gelu").backward(dy),
                                             tensors, device), 3),
                "peak_mib": peak_mib(lambda: fn(x, rows, w, down, up, "gelu").backward(dy), tensors, device)}
        except Exception as e:  # noqa: BLE001 - report and go on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        cleanup(device)
    out["touched_rows"] = int(torch.unique(rows).numel())
    return out


def cleanup(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_case(name: str, make: Callable[[], nn.Module], args, device: torch.device) -> dict:
    """Build and time one layer; any error (import, OOM, ...) becomes {'error': ...}."""
    layer = None
    try:
        layer = make()
        return time_layer(layer, args, device)
    except Exception as e:  # noqa: BLE001 - report and go on
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        del layer
        cleanup(device)


# ----------------------------------------------------------------------------- report
def bytes_moved(args) -> tuple[int, int]:
    """(forward bytes, forward+backward bytes) of the expert part, bf16 tables (see module doc)."""
    pairs = args.tokens * args.heads * args.topk
    row = args.d_model * 2
    fwd = 2 * pairs * row
    return fwd, 2 * fwd + 2 * args.sub_keys ** 2 * row


def gbps(nbytes: int, ms: float | None) -> float | None:
    return round(nbytes / ms / 1e6, 1) if ms else None


def results(args, cases: dict, mix: dict, check: dict, peer_name: str) -> list[dict]:
    """Result rows in the BENCHMARKING.md format."""
    fwd_bytes, fb_bytes = bytes_moved(args)
    shape = {"tokens": args.tokens, "d_model": args.d_model, "num_experts": args.sub_keys ** 2,
             "product_key_dim": [args.sub_keys] * 2, "heads": args.heads, "experts_per_head": args.topk,
             "query_dim": args.query_dim, "dtype": "bfloat16", "activation": "gelu"}
    ours, ref, peer = (cases.get(k, {}) for k in ("ours", "reference", "peer"))
    grads_mib = 2 * args.sub_keys ** 2 * args.d_model * 2 / MIB
    rows = []
    for bench, key, nbytes in (("peer.fwd", "fwd_ms", fwd_bytes), ("peer.fwd_bwd", "fwd_bwd_ms", fb_bytes)):
        ours_ms, peer_ms = ours.get(key), peer.get(key)
        row = {"bench": bench, "shape": shape, "ours_ms": ours_ms,
               "ours_peak_mib": ours.get("peak_mib") if key == "fwd_bwd_ms" else None,
               "peer": peer_name, "peer_ms": peer_ms,
               "peer_peak_mib": peer.get("peak_mib") if key == "fwd_bwd_ms" else None,
               "speedup": round(peer_ms / ours_ms, 2) if ours_ms and peer_ms else None,
               "reference_ms": ref.get(key),
               "reference_peak_mib": ref.get("peak_mib") if key == "fwd_bwd_ms" else None,
               "tflops": None, "gbps": gbps(nbytes, ours_ms), "bytes_counted": nbytes,
               "errors": {k: v["error"] for k, v in cases.items() if "error" in v} or None,
               "notes": "whole layer (retrieval + experts); gbps = expert-part bytes / layer time"}
        if key == "fwd_bwd_ms":
            row["notes"] += (f"; peaks include the step's dense bf16 table gradients "
                             f"({grads_mib:.0f} MiB for down + up)")
            row["check"] = check
        rows.append(row)
    for name in ("ours", "reference"):
        m = mix.get(name, {})
        rows.append({"bench": f"peer.mix.fwd_bwd.{name}", "shape": shape, "ours_ms": m.get("fwd_bwd_ms"),
                     "fwd_ms": m.get("fwd_ms"), "ours_peak_mib": m.get("peak_mib"), "peer": None,
                     "peer_ms": None, "speedup": None, "tflops": None,
                     "gbps": gbps(fb_bytes, m.get("fwd_bwd_ms")), "fwd_gbps": gbps(fwd_bytes, m.get("fwd_ms")),
                     "touched_rows": mix.get("touched_rows"), "error": m.get("error"),
                     "notes": "expert mix alone on random rows (no retrieval)"})
    return rows


def table(rows: list[dict]) -> str:
    """A short text table of the result rows."""
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)
    lines = [f"{'bench':26} {'ours ms':>9} {'ref ms':>9} {'peer ms':>9} {'speedup':>8} "
             f"{'ours MiB':>9} {'peer MiB':>9} {'GB/s':>8}"]
    for r in rows:
        lines.append(f"{r['bench']:26} {f(r['ours_ms']):>9} {f(r.get('reference_ms')):>9} "
                     f"{f(r['peer_ms']):>9} {f(r['speedup']):>8} {f(r['ours_peak_mib'], '{:.0f}'):>9} "
                     f"{f(r.get('peer_peak_mib'), '{:.0f}'):>9} {f(r['gbps'], '{:.0f}'):>8}")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tokens % args.seq:
        args.seq = args.tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("no CUDA device: CPU smoke run (times are not meaningful)", file=sys.stderr)
    torch.manual_seed(0)
    wanted = set(args.cases.split(","))
    ceiling = copy_gbps(device)

    check: dict = {}
    try:
        layer = our_layer(args, device, "triton")
        check["layer"] = check_layer(args, layer, device)
        del layer
        cleanup(device)
        check["mix"] = check_mix(args, device)
    except Exception as e:  # noqa: BLE001 - report and go on
        check["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    cleanup(device)
    errs = [v for part in ("mix", "layer") for v in check.get(part, {}).values()]
    check["ok"] = bool(errs) and all(e <= 1e-2 for e in errs)  # NaN compares False: fails
    print("correctness (rel. error vs reference):", json.dumps(check), file=sys.stderr)

    makers = {"ours": lambda: our_layer(args, device, "triton"),
              "reference": lambda: our_layer(args, device, "reference"),
              "peer": lambda: peer_pytorch_layer(args, device)}
    cases = {}
    for name in ("ours", "reference", "peer"):
        if name in wanted:
            cases[name] = run_case(name, makers[name], args, device)
            print(name, json.dumps(cases[name]), file=sys.stderr)
    mix = time_mix(args, device) if "ours" in wanted else {}
    rows = results(args, cases, mix, check, peer_pytorch_version())

    if args.json:
        report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__,
                  "triton": getattr(peer_triton.triton, "__version__", None),
                  "commit": git_commit(), "date": datetime.date.today().isoformat(),
                  "command": "python -m moespeed.bench.peer " + " ".join(sys.argv[1:] if argv is None else argv),
                  "ceilings": {"copy_gbps": ceiling}, "results": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    print(table(rows))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
