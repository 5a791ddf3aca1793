"""Benchmark the Muon optimizer step: ours (batched NS) vs torch.optim.Muon (one matrix at a time).

    python -m moespeed.bench.muon --json benchmarks/results/muon.json
    python -m moespeed.bench.muon --smoke            # tiny shapes, runs on CPU

Cases: "dense" = the hidden matrices of a ~100M-param transformer (12 layers, d_model 768: q, k, v, o
[768, 768], MLP up [3072, 768], down [768, 3072]); "moe" = expert stacks of a DeepSeek-V2-Lite-like
MoE (L layers x 64 experts x {gate, up: [1408, 2048], down: [2048, 1408]}). Params, grads and momentum
are fp32; NS runs in bf16. Each case first checks one step of ours against torch.optim.Muon (relative
error of the param update), then times a full step (median of triton's do_bench), the NS alone,
and the step's peak memory net of params, grads and optimizer state.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys

import torch

from moespeed.optim.muon import Muon, newton_schulz, ns_flops

HP = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")


def dense_shapes(layers: int = 12, d: int = 768, ff: int = 3072) -> list[tuple[int, ...]]:
    return [s for _ in range(layers) for s in [(d, d)] * 4 + [(ff, d), (d, ff)]]


def moe_shapes(layers: int = 8, experts: int = 64, d: int = 2048, ff: int = 1408) -> list[tuple[int, ...]]:
    return [s for _ in range(layers) for s in [(experts, ff, d), (experts, ff, d), (experts, d, ff)]]


def _time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn() (triton do_bench on CUDA, else a few wall-clock runs)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        except ImportError:
            pass
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record(); fn(); end.record(); torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
    import time
    times = []
    for _ in range(3):
        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def _peak_mib(fn, device: torch.device) -> float | None:
    """Peak memory of fn() above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _make(shapes, device) -> list[torch.Tensor]:
    """Leaf fp32 params (no autograd, so per-expert views are leaves too) with random grads."""
    params = [torch.randn(s, device=device) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _expert_views(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """2-D views for torch.optim.Muon: each expert of a 3-D stack is its own param (grad = view)."""
    views = []
    for p in params:
        if p.ndim == 2:
            views.append(p)
            continue
        for e in range(p.shape[0]):
            v = p[e]  # (rows, cols) view
            v.grad = p.grad[e]
            views.append(v)
    return views


def check_vs_torch(shapes, device) -> float:
    """Relative error of our one-step param update vs torch.optim.Muon's (on copies)."""
    ours = _make(shapes, device)
    ref = [p.clone() for p in ours]
    for p, q in zip(ref, ours):
        p.grad = q.grad.clone()
    start = [p.clone() for p in ours]
    Muon(ours, **HP).step()
    torch.optim.Muon(_expert_views(ref), **HP).step()
    num = sum(((a - s) - (b - s)).float().pow(2).sum() for a, b, s in zip(ours, ref, start))
    den = sum((b - s).float().pow(2).sum() for b, s in zip(ref, start))
    err = (num / den).sqrt().item()
    if err != err:  # NaN
        raise FloatingPointError("NaN in the Muon update")
    return err


def ns_only_ms(shapes, device, batch_numel: int) -> float:
    """Time of newton_schulz over all blocks, in the optimizer's batches (one batch per shape timed)."""
    blocks: dict[tuple[int, int], int] = {}
    for s in shapes:
        blocks[s[-2:]] = blocks.get(s[-2:], 0) + (s[0] if len(s) == 3 else 1)
    total = 0.0
    for (rows, cols), n in blocks.items():
        per_call = min(n, max(1, batch_numel // (rows * cols)))
        X = torch.randn(per_call, rows, cols, device=device)  # (per_call, rows, cols)
        total += _time_ms(lambda: newton_schulz(X), device) * n / per_call
    return total


def bench_case(name: str, shapes, device, check_shapes) -> dict:
    blocks = [(s[-2], s[-1], s[0] if len(s) == 3 else 1) for s in shapes]
    flops = sum(ns_flops(r, c) * n for r, c, n in blocks)
    numel = sum(r * c * n for r, c, n in blocks)
    row = {"bench": f"muon.step.{name}", "shape": {"params": [list(s) for s in shapes[:6]],
           "n_params_tensors": len(shapes), "numel": numel, "ns_steps": 5, "dtype": "fp32 (NS bf16)"},
           "peer": f"torch.optim.Muon {torch.__version__}", "gbps": None}
    row["rel_err"] = check_vs_torch(check_shapes, device)
    params = _make(shapes, device)
    opt = Muon(params, **HP)
    opt.step()  # allocate momentum buffers
    row["ours_ms"] = _time_ms(opt.step, device)
    row["ours_peak_mib"] = _peak_mib(opt.step, device)
    row["tflops"] = flops / row["ours_ms"] / 1e9
    row["ns_ms"] = ns_only_ms(shapes, device, opt.batch_numel)
    row["ns_tflops"] = flops / row["ns_ms"] / 1e9
    del opt  # free our momentum buffers before the peer allocates its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        peer = torch.optim.Muon(_expert_views(params), **HP)
        peer.step()
        row["peer_ms"] = _time_ms(peer.step, device)
        row["peer_peak_mib"] = _peak_mib(peer.step, device)
        row["speedup"] = row["peer_ms"] / row["ours_ms"]
    except Exception as exc:  # noqa: BLE001 - report the peer's failure, keep ours
        row.update(peer_ms=None, peer_peak_mib=None, speedup=None, peer_error=repr(exc)[:300])
    row["notes"] = ("tflops = NS matmul FLOPs / full step time; ns_tflops = same FLOPs / NS-only "
                    "time; peak net of params, grads and state")
    return row


def matmul_ceiling(device) -> dict:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b, device)
    return {"bench": "ceiling.matmul_bf16", "shape": {"n": n}, "ours_ms": ms,
            "tflops": 2 * n**3 / ms / 1e9, "peer": None, "peer_ms": None, "speedup": None,
            "ours_peak_mib": None, "peer_peak_mib": None, "gbps": None, "notes": "bf16 n^3 matmul"}


def _cases(args) -> dict[str, tuple[list, list]]:
    """name -> (shapes to time, smaller shapes for the parity check)."""
    if args.smoke:
        return {"dense": (dense_shapes(2, 64, 256), dense_shapes(1, 64, 256)),
                "moe": (moe_shapes(1, 4, 64, 48), moe_shapes(1, 2, 64, 48))}
    return {"dense": (dense_shapes(), dense_shapes(2)),
            "moe": (moe_shapes(args.moe_layers), moe_shapes(1, 4))}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def _print_table(results: list[dict]) -> None:
    def fmt(v, spec):
        width = int(spec.split(".")[0])
        return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)
    print(f"{'bench':<22}{'ours ms':>10}{'torch ms':>10}{'speedup':>9}{'TFLOP/s':>9}"
          f"{'NS TF/s':>9}{'peak MiB':>10}{'rel err':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['bench']:<22} ERROR {r['error'][:80]}")
            continue
        print(f"{r['bench']:<22}{fmt(r.get('ours_ms'), '10.2f')}{fmt(r.get('peer_ms'), '10.2f')}"
              f"{fmt(r.get('speedup'), '9.2f')}{fmt(r.get('tflops'), '9.1f')}"
              f"{fmt(r.get('ns_tflops'), '9.1f')}{fmt(r.get('ours_peak_mib'), '10.0f')}"
              f"{fmt(r.get('rel_err'), '10.1e')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moespeed.bench.muon", description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results to this path (BENCHMARKING.md format)")
    ap.add_argument("--cases", default="dense,moe", help="comma-separated: dense, moe")
    ap.add_argument("--moe-layers", type=int, default=8, help="MoE layers in the 'moe' case")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    args = ap.parse_args(argv)
    if not hasattr(torch.optim, "Muon"):
        print("torch.optim.Muon is missing (needs torch >= 2.9)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: run with --smoke for a CPU check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = [matmul_ceiling(device)]
    cases = _cases(args)
    for name in args.cases.split(","):
        try:
            shapes, check_shapes = cases[name]
            results.append(bench_case(name, shapes, device, check_shapes))
        except Exception as exc:  # noqa: BLE001 - one failing case must not stop the others
            results.append({"bench": f"muon.step.{name}", "error": repr(exc)[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton_version, "commit": _commit(),
               "date": datetime.date.today().isoformat(),
               "command": "python -m moespeed.bench.muon " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv),
               "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    _print_table(results)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
