"""PEER layer benchmark: ours (fused Triton) vs our PyTorch reference vs peer-pytorch 0.2.2.

    python -m moespeed.bench.peer --json benchmarks/results/peer.json

Default shape (the PEER paper's): d_model 1024, 1024 x 1024 = 1,048,576 single-neuron experts,
8 heads x 16 experts, 8192 tokens (4 x 2048), bf16 parameters and activations, GELU (peer-pytorch's
activation, so both compute the same function). Steps:
1. correctness on fresh random inputs: the fused expert mix (bf16) against the reference in fp32;
   the whole layer with kernel=triton against kernel=reference (same bf16 weights); the fused
   retrieval against the fp32 reference (scores, ids, gradients); deferred table gradients and
   the fused table step against their references;
2. per layer case, forward and forward+backward time (triton.testing.do_bench, median) and the
   peak memory of one step, net of everything allocated before it (parameters, inputs,
   optimizer states); gradients produced by the step count (grads are None before it):
   - ours: dense table gradients (any optimizer), the direct comparison with peer-pytorch;
   - deferred: table_grad = deferred, forward+backward alone (the table gradients are left as
     factors) and forward+backward+update with PEERTableOptimizer(sgd) (the update included);
   - train: forward+backward+AdamW step for ours (dense grads + torch AdamW), ours deferred
     (lazy AdamW on the selected rows) and peer-pytorch (torch AdamW);
3. kernels alone: retrieval, expert mix (random rows) forward / backward, table step.
Effective bandwidth counts the fewest DRAM bytes of the expert part (s = 2 for bf16, pairs =
tokens * heads * k): forward 2 * pairs * D * s; dense forward+backward adds 2 * pairs * D * s
(the rows again) and the dense table gradients 2 * N * D * s; deferred forward+backward adds
(pairs + touched) * D * s (down rows for grad_x, touched up rows once), and its SGD update
4 * touched * D * s (read and write the touched rows of both tables). A failing case (import
error, OOM) is reported and the others go on. On a machine without CUDA it runs as a smoke test
(CPU timer, no memory numbers), e.g. TRITON_INTERPRET=1 ... --tokens 64 --d-model 64 --sub-keys 16.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Callable

import torch
from torch import nn

from moespeed.bench.common import git_commit, peak_mib, rel_err, save_json, time_ms
from moespeed.kernels import peer_triton
from moespeed.kernels.peer_triton import (
    TableGradFactors,
    peer_experts_reference,
    peer_experts_triton,
    peer_table_step,
    product_key_topk_reference,
    product_key_topk_triton,
    table_step_reference,
)
from moespeed.model.peer import PEER, PEERConfig, PEERTableOptimizer

MIB = 2 ** 20
ALL_CASES = "ours,deferred,reference,peer,train,kernels"


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
    p.add_argument("--cases", default=ALL_CASES, help=f"comma list of {ALL_CASES}")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measuring
def measure(fns: dict[str, Callable[[], object]], grad_to_none: list[torch.Tensor], device: torch.device,
            peak_of: str | None = None) -> dict:
    """{name + '_ms': median ms} for each fn (after one warm-up call: compile / autotune), and
    'peak_mib' of fns[peak_of]."""
    out = {}
    for name, fn in fns.items():
        fn()
        out[name + "_ms"] = round(time_ms(fn, grad_to_none, device), 3)
    if peak_of:
        out["peak_mib"] = peak_mib(fns[peak_of], grad_to_none, device)
    return out



def copy_gbps(device: torch.device) -> float | None:
    """Device copy ceiling: GB/s of a 1 GiB copy, counting read + write."""
    if device.type != "cuda":
        return None
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [], device)
    return round(2 * src.numel() / ms / 1e6, 1)


def cleanup(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def attempt(fn: Callable[[], dict], device: torch.device) -> dict:
    """fn(), or {'error': ...} (an OOM or a missing peer must not stop the run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report and go on
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        cleanup(device)


# ----------------------------------------------------------------------------- the layers
def our_layer(args, device: torch.device, kernel: str, table_grad: str = "dense") -> PEER:
    n = args.sub_keys
    cfg = PEERConfig(num_experts=n * n, product_key_dim=[n, n], num_experts_per_tok=args.topk,
                     num_heads=args.heads, query_dim=args.query_dim, activation="gelu", kernel=kernel,
                     table_grad=table_grad)
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


def layer_inputs(args, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, D) bf16 requiring grad and an upstream gradient dy of the same shape."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(args.tokens // args.seq, args.seq, args.d_model, device=device, generator=g,
                    dtype=torch.bfloat16)
    return x.requires_grad_(), torch.randn(x.shape, device=device, generator=g, dtype=torch.bfloat16)


def touched_rows(layer: PEER, x: torch.Tensor) -> int:
    """Distinct table rows the layer selects for x (for the bytes of row-wise updates)."""
    with torch.no_grad():
        return int(torch.unique(layer.table_rows(layer.retrieve(x, fused=layer.use_triton(x))[1])).numel())


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
    are autotuned for it): output and every gradient. Both retrievals score in fp32; they can
    differ only where two candidates tie to fp32 rounding."""
    x, dy = layer_inputs(args, device, seed=2)
    out = []
    for kernel in ("triton", "reference"):
        layer.cfg.kernel = kernel
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        params = [xi] + list(layer.parameters())
        out.append([y.detach()] + list(torch.autograd.grad(y, params, dy)))
        del y
    layer.cfg.kernel = "triton"
    names = ["y", "grad_x"] + ["grad_" + n for n, _ in layer.named_parameters()]
    return {name: rel_err(a, b) for name, a, b in zip(names, *out)}


def check_retrieval(args, device: torch.device) -> dict:
    """Fused retrieval (bf16 queries and keys) vs the fp32 reference: scores, the share of equal
    expert ids, and the gradients of the queries and keys for one upstream gradient."""
    T, H, n, dk = args.tokens, args.heads, args.sub_keys, args.query_dim // 2
    g = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(T, H, 2, dk, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    keys = (torch.randn(1, 2, n, dk, device=device, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    ds = torch.randn(T, H, args.topk, device=device, generator=g)
    res = []
    for fn in (product_key_topk_triton, product_key_topk_reference):
        scores, ids = fn(q, keys, args.topk)
        res.append((scores.detach(), ids, *torch.autograd.grad(scores, (q, keys), ds)))
    return {"scores": rel_err(res[0][0], res[1][0]), "ids_equal": (res[0][1] == res[1][1]).float().mean().item(),
            "grad_q": rel_err(res[0][2], res[1][2]), "grad_keys": rel_err(res[0][3], res[1][3])}


def check_deferred(args, device: torch.device) -> dict:
    """Deferred table gradients and the fused table step vs their references (small table, fp32
    tables, so the kernel's own error shows): factors -> dense grads vs the dense-gradient
    kernel; the Triton step (sgd, lazy adamw) vs `table_step_reference` on the same factors."""
    T, D, R, P = args.check_tokens, args.d_model, min(65536, args.sub_keys ** 2), args.heads * args.topk
    g = torch.Generator(device=device).manual_seed(4)
    x = torch.randn(T, D, device=device, generator=g)
    rows = torch.randint(0, R, (T, P), device=device, generator=g)
    w = torch.rand(T, P, device=device, generator=g).softmax(-1)
    down = torch.randn(R, D, device=device, generator=g) * 0.05
    up = torch.randn(R, D, device=device, generator=g) * 0.05
    dy = torch.randn(T, D, device=device, generator=g)
    tables = [down.clone().requires_grad_(), up.clone().requires_grad_()]
    y = peer_experts_triton(x, rows, w, *tables, "gelu")
    dense = torch.autograd.grad(y, tables, dy)
    factors = TableGradFactors()
    y = peer_experts_triton(x.requires_grad_(), rows, w, down, up, "gelu", factors)
    y.backward(dy)
    out = dict(zip(("grad_down", "grad_up"), (rel_err(a, b) for a, b in zip(factors.dense(R), dense))))
    for algorithm in ("sgd", "adamw"):
        hp = {"algorithm": algorithm, "lr_down": 1e-2, "lr_up": 2e-2, "wd_down": 0.1, "wd_up": 0.0,
              "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "step": 3}
        after = []
        for step in (peer_table_step, table_step_reference):
            d, u = down.clone(), up.clone()
            states = {k: torch.full_like(down, 0.01) for k in
                      ("exp_avg_down", "exp_avg_sq_down", "exp_avg_up", "exp_avg_sq_up")}
            step(factors, d, u, states, hp)
            after.append((d - down, u - up))  # the updates themselves, not the tables
        out[f"{algorithm}_update_down"] = rel_err(after[0][0], after[1][0])
        out[f"{algorithm}_update_up"] = rel_err(after[0][1], after[1][1])
    return out


def run_checks(args, device: torch.device) -> dict:
    check: dict = {}
    for name, fn in (("layer", lambda: check_layer(args, our_layer(args, device, "triton"), device)),
                     ("mix", lambda: check_mix(args, device)),
                     ("retrieval", lambda: check_retrieval(args, device)),
                     ("deferred", lambda: check_deferred(args, device))):
        check[name] = attempt(fn, device)
    errs = [v for part in check.values() for k, v in part.items() if k not in ("ids_equal", "error")]
    failed = [name for name, part in check.items() if "error" in part]
    ids_ok = check["retrieval"].get("ids_equal", 0.0) >= 0.99  # near-equal scores may swap places
    check["ok"] = bool(errs) and not failed and ids_ok and all(e <= 1e-2 for e in errs)  # NaN fails
    return check


# ----------------------------------------------------------------------------- layer cases
def case_layer(args, device, kernel: str) -> dict:
    """Our layer with dense table gradients: forward, forward+backward, peak."""
    layer = our_layer(args, device, kernel)
    x, dy = layer_inputs(args, device)
    params = [x] + list(layer.parameters())
    return measure({"fwd": lambda: layer(x), "fwd_bwd": lambda: layer(x).backward(dy)}, params, device,
                   peak_of="fwd_bwd")


def case_deferred(args, device) -> dict:
    """Deferred table gradients: forward+backward alone (factors dropped after each call) and
    with a PEERTableOptimizer(sgd) update of the touched rows."""
    layer = our_layer(args, device, "triton", "deferred")
    x, dy = layer_inputs(args, device)
    params = [x] + list(layer.parameters())
    opt = PEERTableOptimizer([layer.down, layer.up], lr=1e-3, algorithm="sgd")

    def fwd_bwd():
        layer(x).backward(dy)
        layer.table_grad.clear()

    def fwd_bwd_update():
        layer(x).backward(dy)
        opt.step()
        opt.zero_grad()

    out = measure({"fwd_bwd": fwd_bwd}, params, device, peak_of="fwd_bwd")
    upd = measure({"fwd_bwd_update": fwd_bwd_update}, params, device, peak_of="fwd_bwd_update")
    out.update(fwd_bwd_update_ms=upd["fwd_bwd_update_ms"], update_peak_mib=upd["peak_mib"],
               touched_rows=touched_rows(layer, x))
    return out


def case_peer(args, device) -> dict:
    layer = peer_pytorch_layer(args, device)
    x, dy = layer_inputs(args, device)
    params = [x] + list(layer.parameters())
    return measure({"fwd": lambda: layer(x), "fwd_bwd": lambda: layer(x).backward(dy)}, params, device,
                   peak_of="fwd_bwd")


def case_train(args, device) -> dict:
    """Forward+backward+AdamW step: ours dense + torch AdamW, ours deferred + lazy AdamW on the
    tables (torch AdamW for the rest), peer-pytorch + torch AdamW. Optimizer states are created
    in the warm-up step, so the peaks exclude them."""
    fused = device.type == "cuda" or None
    out = {}
    for name in ("ours", "deferred", "peer"):
        def run() -> dict:
            if name == "peer":
                layer = peer_pytorch_layer(args, device)
            else:
                layer = our_layer(args, device, "triton", "dense" if name == "ours" else "deferred")
            x, dy = layer_inputs(args, device)
            tables = [layer.down, layer.up] if name == "deferred" else []
            rest = [p for p in layer.parameters() if all(p is not t for t in tables)]
            opts = [torch.optim.AdamW(rest, lr=1e-4, fused=fused)]
            if tables:
                opts.append(PEERTableOptimizer(tables, lr=1e-4, algorithm="adamw"))

            def step():
                layer(x).backward(dy)
                for opt in opts:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            res = measure({"step": step}, [x], device, peak_of="step")
            return {"step_ms": res["step_ms"], "peak_mib": res["peak_mib"]}
        out[name] = attempt(run, device)
    return out


# ----------------------------------------------------------------------------- kernels alone
def kernel_times(args, device: torch.device) -> dict:
    """Retrieval, expert mix (random rows) and table step, each alone."""
    T, H, n, dk, D, N = args.tokens, args.heads, args.sub_keys, args.query_dim // 2, args.d_model, args.sub_keys ** 2
    P = H * args.topk
    out = {}

    def retrieval() -> dict:
        q = torch.randn(T, H, 2, dk, device=device, dtype=torch.bfloat16, requires_grad=True)
        keys = (torch.randn(1, 2, n, dk, device=device) * 0.1).to(torch.bfloat16).requires_grad_()
        ds = torch.randn(T, H, args.topk, device=device)
        res = {}
        for name, fn in (("ours", product_key_topk_triton), ("reference", product_key_topk_reference)):
            r = measure({"fwd": lambda: fn(q, keys, args.topk),
                         "fwd_bwd": lambda: fn(q, keys, args.topk)[0].backward(ds)}, [q, keys], device)
            res[name] = r
        return res

    def mix() -> dict:
        x = torch.randn(T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        rows = torch.randint(0, N, (T, P), device=device)
        w = torch.rand(T, P, device=device).softmax(-1).requires_grad_()
        down = nn.Parameter(torch.randn(N, D, device=device, dtype=torch.bfloat16) * 0.02)
        up = nn.Parameter(torch.randn(N, D, device=device, dtype=torch.bfloat16) * 0.02)
        dy = torch.randn_like(x)
        tensors = [x, w, down, up]
        factors = TableGradFactors()

        def deferred():
            peer_experts_triton(x, rows, w, down, up, "gelu", factors).backward(dy)
            factors.clear()

        res = {"touched_rows": int(torch.unique(rows).numel())}
        res["ours"] = attempt(lambda: measure(
            {"fwd": lambda: peer_experts_triton(x, rows, w, down, up, "gelu"),
             "fwd_bwd": lambda: peer_experts_triton(x, rows, w, down, up, "gelu").backward(dy),
             "fwd_bwd_deferred": deferred}, tensors, device, peak_of="fwd_bwd"), device)
        res["reference"] = attempt(lambda: measure(
            {"fwd": lambda: peer_experts_reference(x, rows, w, down, up, "gelu"),
             "fwd_bwd": lambda: peer_experts_reference(x, rows, w, down, up, "gelu").backward(dy)},
            tensors, device, peak_of="fwd_bwd"), device)
        # the table step on one backward's factors (in place; repeated updates are fine for timing)
        peer_experts_triton(x, rows, w, down, up, "gelu", factors).backward(dy)
        with torch.no_grad():
            for algorithm in ("sgd", "adamw"):
                states = ({k: torch.zeros(N, D, device=device) for k in
                           ("exp_avg_down", "exp_avg_sq_down", "exp_avg_up", "exp_avg_sq_up")}
                          if algorithm == "adamw" else {})
                hp = {"algorithm": algorithm, "lr_down": 1e-5, "lr_up": 1e-5, "wd_down": 0.0, "wd_up": 0.0,
                      "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "step": 1}
                res[f"table_step_{algorithm}"] = attempt(lambda: measure(
                    {"step": lambda s=states, h=hp: peer_table_step(factors, down, up, s, h)}, [], device), device)
        return res

    out["retrieval"] = attempt(retrieval, device)
    out["mix"] = attempt(mix, device)
    return out


# ----------------------------------------------------------------------------- report
def gbps(nbytes: int | None, ms: float | None) -> float | None:
    return round(nbytes / ms / 1e6, 1) if ms and nbytes else None


def row(bench: str, shape: dict, ours_ms, peer_ms=None, peer_name=None, nbytes=None, **extra) -> dict:
    """One result row in the BENCHMARKING.md format (speedup = peer_ms / ours_ms)."""
    r = {"bench": bench, "shape": shape, "ours_ms": ours_ms, "ours_peak_mib": None, "peer": peer_name,
         "peer_ms": peer_ms, "peer_peak_mib": None,
         "speedup": round(peer_ms / ours_ms, 2) if ours_ms and peer_ms else None,
         "tflops": None, "gbps": gbps(nbytes, ours_ms), "bytes_counted": nbytes}
    r.update(extra)
    return r


def results(args, cases: dict, kernels: dict, check: dict, peer_name: str) -> list[dict]:
    """Result rows in the BENCHMARKING.md format."""
    s, D, N = 2, args.d_model, args.sub_keys ** 2
    pairs = args.tokens * args.heads * args.topk
    fwd_bytes = 2 * pairs * D * s
    dense_bytes = 2 * fwd_bytes + 2 * N * D * s
    shape = {"tokens": args.tokens, "d_model": D, "num_experts": N, "product_key_dim": [args.sub_keys] * 2,
             "heads": args.heads, "experts_per_head": args.topk, "query_dim": args.query_dim,
             "dtype": "bfloat16", "activation": "gelu"}
    ours, ref, peer, dfr = (cases.get(k, {}) for k in ("ours", "reference", "peer", "deferred"))
    errors = {k: v["error"] for k, v in cases.items() if isinstance(v, dict) and "error" in v} or None
    touched = dfr.get("touched_rows")
    dfr_bytes = fwd_bytes + (pairs + touched) * D * s if touched else None
    rows = [
        row("peer.fwd", shape, ours.get("fwd_ms"), peer.get("fwd_ms"), peer_name, fwd_bytes,
            reference_ms=ref.get("fwd_ms"), errors=errors, notes="whole layer (retrieval + experts)"),
        row("peer.fwd_bwd", shape, ours.get("fwd_bwd_ms"), peer.get("fwd_bwd_ms"), peer_name, dense_bytes,
            ours_peak_mib=ours.get("peak_mib"), peer_peak_mib=peer.get("peak_mib"),
            reference_ms=ref.get("fwd_bwd_ms"), reference_peak_mib=ref.get("peak_mib"), check=check,
            notes=f"whole layer, dense table gradients (standard autograd, any optimizer); peaks include "
                  f"them ({2 * N * D * s / MIB:.0f} MiB bf16 for down + up); gbps = expert-part bytes / time"),
        row("peer.fwd_bwd.deferred", shape, dfr.get("fwd_bwd_ms"), peer.get("fwd_bwd_ms"), peer_name, dfr_bytes,
            ours_peak_mib=dfr.get("peak_mib"), peer_peak_mib=peer.get("peak_mib"), touched_rows=touched,
            notes="table_grad=deferred: table gradients left as factors for the optimizer step "
                  "(see peer.fwd_bwd_update.deferred_sgd for the update included)"),
        row("peer.fwd_bwd_update.deferred_sgd", shape, dfr.get("fwd_bwd_update_ms"), peer.get("fwd_bwd_ms"),
            peer_name, dfr_bytes + 4 * touched * D * s if touched else None,
            ours_peak_mib=dfr.get("update_peak_mib"), peer_peak_mib=peer.get("peak_mib"),
            notes="ours: forward+backward+SGD update of the touched rows; peer: forward+backward only"),
    ]
    train = cases.get("train", {})
    if train:
        t_ours, t_dfr, t_peer = (train.get(k, {}) for k in ("ours", "deferred", "peer"))
        rows.append(row("peer.train_step.adamw", shape, t_dfr.get("step_ms"), t_peer.get("step_ms"), peer_name,
                        ours_peak_mib=t_dfr.get("peak_mib"), peer_peak_mib=t_peer.get("peak_mib"),
                        dense_adamw_ms=t_ours.get("step_ms"), dense_adamw_peak_mib=t_ours.get("peak_mib"),
                        errors={k: v["error"] for k, v in train.items() if "error" in v} or None,
                        notes="forward+backward+optimizer step. ours: deferred tables + lazy AdamW (fp32 "
                              "moments, selected rows only); dense_adamw: dense grads + torch AdamW (fused); "
                              "peer: torch AdamW (fused). Peaks exclude optimizer states."))
    ret = kernels.get("retrieval", {})
    for key in ("fwd", "fwd_bwd"):
        o, r = ret.get("ours", {}), ret.get("reference", {})
        rows.append(row(f"peer.retrieval.{key}", shape, o.get(key + "_ms"), reference_ms=r.get(key + "_ms"),
                        error=ret.get("error"), notes="product-key top-k alone (q, keys random bf16)"))
    mix = kernels.get("mix", {})
    mo, mr = mix.get("ours", {}), mix.get("reference", {})
    mtouched = mix.get("touched_rows")
    mix_rows = (("fwd", fwd_bytes, mo.get("fwd_ms"), mr.get("fwd_ms")),
                ("fwd_bwd", dense_bytes, mo.get("fwd_bwd_ms"), mr.get("fwd_bwd_ms")),
                ("fwd_bwd_deferred", fwd_bytes + (pairs + mtouched) * D * s if mtouched else None,
                 mo.get("fwd_bwd_deferred_ms"), None))
    for key, nbytes, o_ms, r_ms in mix_rows:
        rows.append(row(f"peer.mix.{key}", shape, o_ms, nbytes=nbytes, reference_ms=r_ms,
                        ours_peak_mib=mo.get("peak_mib") if key == "fwd_bwd" else None,
                        reference_peak_mib=mr.get("peak_mib") if key == "fwd_bwd" else None,
                        touched_rows=mtouched, error=mo.get("error") or mix.get("error"),
                        notes="expert mix alone on random rows (no retrieval)"))
    for algorithm, per_row in (("sgd", 4), ("adamw", 20)):  # bf16 rows r/w (+ fp32 m, v r/w) of both tables
        st = mix.get(f"table_step_{algorithm}", {})
        rows.append(row(f"peer.table_step.{algorithm}", shape, st.get("step_ms"),
                        nbytes=per_row * mtouched * D if mtouched else None, touched_rows=mtouched,
                        error=st.get("error"), notes="fused row-wise update from one backward's factors"))
    return rows


def table(rows: list[dict]) -> str:
    """A short text table of the result rows."""
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)
    lines = [f"{'bench':34} {'ours ms':>9} {'ref ms':>9} {'peer ms':>9} {'speedup':>8} "
             f"{'ours MiB':>9} {'peer MiB':>9} {'GB/s':>8}"]
    for r in rows:
        lines.append(f"{r['bench']:34} {f(r['ours_ms']):>9} {f(r.get('reference_ms')):>9} "
                     f"{f(r['peer_ms']):>9} {f(r['speedup']):>8} {f(r['ours_peak_mib'], '{:.0f}'):>9} "
                     f"{f(r.get('peer_peak_mib'), '{:.0f}'):>9} {f(r['gbps'], '{:.0f}'):>8}")
        if r.get("dense_adamw_ms") is not None:
            lines.append(f"{'  (dense grads + torch AdamW)':34} {f(r['dense_adamw_ms']):>9} {'':>9} {'':>9} "
                         f"{'':>8} {f(r.get('dense_adamw_peak_mib'), '{:.0f}'):>9}")
    return "\n".join(lines)



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

    check = run_checks(args, device)
    print("correctness (rel. error vs reference):", json.dumps(check), file=sys.stderr)

    makers = {"ours": lambda: case_layer(args, device, "triton"),
              "deferred": lambda: case_deferred(args, device),
              "reference": lambda: case_layer(args, device, "reference"),
              "peer": lambda: case_peer(args, device),
              "train": lambda: case_train(args, device)}
    cases = {}
    for name, make in makers.items():
        if name in wanted:
            cases[name] = attempt(make, device)
            print(name, json.dumps(cases[name]), file=sys.stderr)
    kernels = attempt(lambda: kernel_times(args, device), device) if "kernels" in wanted else {}
    print("kernels", json.dumps(kernels), file=sys.stderr)
    rows = results(args, cases, kernels, check, peer_pytorch_version())

    if args.json:
        report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__,
                  "triton": getattr(peer_triton.triton, "__version__", None),
                  "commit": git_commit(), "date": datetime.date.today().isoformat(),
                  "command": "python -m moespeed.bench.peer " + " ".join(sys.argv[1:] if argv is None else argv),
                  "ceilings": {"copy_gbps": ceiling}, "results": rows}
        save_json(args.json, report)
    print(table(rows))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
