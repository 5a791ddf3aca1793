"""Benchmark the DeepSeekMoE layer: fwd+bwd in bf16 vs a per-expert loop and torchtitan 0.3.0's MoE.

    python -m moespeed.bench.moe --json benchmarks/results/moe.json

Per shape and routing (balanced random, Zipf-like skew through the selection bias), it first checks
our fast path against the fp32 per-expert loop on fresh random inputs (relative errors of the output
and of every gradient; NaN fails), then times forward+backward (triton do_bench, median) and the peak
memory net of the inputs, for: ours (`auto` -> grouped_mm), ours with `padded_bmm`, the naive loop,
torchtitan (same weights and routing bias; null if it does not import), a dense SwiGLU of the same
FLOPs and a bf16 8192^3 matmul (the ceilings). FLOPs count the routed + shared expert GEMMs actually
computed (2*m*n*k each, x3 for fwd+bwd); the router is not counted. Prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from moespeed.bench.common import git_commit, package_version, peak_mib, rel_err, save_json, time_ms
from moespeed.model.moe import MoE, MoEConfig

SHAPES = {  # tokens = batch * seq_len
    "A": dict(batch=4, seq_len=4096, d_model=2048, n_routed_experts=64, moe_inter_dim=1408,
              num_experts_per_tok=6, n_shared_experts=2),
    "B": dict(batch=8, seq_len=2048, d_model=768, n_routed_experts=64, moe_inter_dim=256,
              num_experts_per_tok=6, n_shared_experts=1),
    "tiny": dict(batch=2, seq_len=64, d_model=64, n_routed_experts=8, moe_inter_dim=32,
                 num_experts_per_tok=2, n_shared_experts=1),  # CPU smoke test of this script
}
ROUTINGS = ("balanced", "zipf")
ZIPF_MAX_OVER_MEAN = 4.0  # target load of the busiest expert / mean load in the skewed case


# -- measuring -------------------------------------------------------------------------------------

def attempt(notes: list[str], label: str, fn: Callable, *args):
    """fn(*args), or None with the error noted (a failing peer or an OOM must not stop the run)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - report and continue
        notes.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


# -- the modules -----------------------------------------------------------------------------------

def moe_config(shape: dict, dispatch: str = "auto") -> MoEConfig:
    keys = ("n_routed_experts", "moe_inter_dim", "num_experts_per_tok", "n_shared_experts")
    return MoEConfig(activation="swiglu", score_func="softmax", norm_topk_prob=True, dispatch=dispatch,
                     **{k: shape[k] for k in keys})


def zipf_bias(m: MoE, x: torch.Tensor, target: float) -> torch.Tensor:
    """Selection bias -alpha*log(1+i), alpha bisected so the busiest expert gets ~target x the mean load."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    ranks = torch.log1p(torch.arange(m.cfg.n_routed_experts, device=x.device, dtype=torch.float32))
    lo, hi = 0.0, 1.0
    for _ in range(20):
        alpha = (lo + hi) / 2
        m.expert_bias.copy_(-alpha * ranks)
        if max_over_mean(m, x2) < target:
            lo = alpha
        else:
            hi = alpha
    return -(lo + hi) / 2 * ranks


@torch.no_grad()
def max_over_mean(m: MoE, x2: torch.Tensor) -> float:
    counts = m.route(x2).counts.float()
    return float(counts.max() / counts.mean())


def build_torchtitan(ours: MoE):
    """torchtitan 0.3.0's MoE with our weights and selection bias (raises ImportError if absent)."""
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (GroupedExperts, MoE as TitanMoE, RoutedExperts,
                                              TokenChoiceTopKRouter)
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg, d = ours.cfg, ours.d_model
    e, h, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.num_experts_per_tok
    hs = cfg.n_shared_experts * h
    titan = TitanMoE.Config(
        num_experts=e,
        load_balance_coeff=1e-3,  # gives it the expert_bias_E buffer (aux-loss-free balancing)
        router=TokenChoiceTopKRouter.Config(
            num_experts=e, gate=Linear.Config(in_features=d, out_features=e), top_k=k,
            score_func=cfg.score_func, route_norm=cfg.norm_topk_prob, route_scale=cfg.route_scale),
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=d, hidden_dim=h, num_experts=e),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k)),
        shared_experts=FeedForward.Config(w1=Linear.Config(in_features=d, out_features=hs),
                                          w2=Linear.Config(in_features=hs, out_features=d),
                                          w3=Linear.Config(in_features=d, out_features=hs)),
    ).build()
    titan = titan.to(device=ours.w1.device, dtype=ours.w1.dtype)
    with torch.no_grad():
        titan.router.gate.weight.copy_(ours.gate)
        experts = titan.routed_experts.inner_experts
        experts.w1_EFD.copy_(ours.w1.transpose(1, 2))  # (E, H, D)
        experts.w3_EFD.copy_(ours.w3.transpose(1, 2))  # (E, H, D)
        experts.w2_EDF.copy_(ours.w2.transpose(1, 2))  # (E, D, H)
        for name in ("w1", "w2", "w3"):
            getattr(titan.shared_experts, name).weight.copy_(getattr(ours.shared, name).weight)
        titan.expert_bias_E.copy_(ours.expert_bias)
    return titan.train()


@torch.no_grad()
def peer_agreement(ours: MoE, x: torch.Tensor) -> float:
    """Relative difference of torchtitan's output from ours, both built in fp32 (same routing; its
    experts still run in bf16). Checks that the peer does the same work. (In bf16 its router runs in
    bf16 -- autocast to fp32 is ignored -- so a few near-tie tokens pick other experts.)"""
    ours32 = copy.deepcopy(ours).float().eval()
    titan32 = build_torchtitan(ours32)
    return rel_err(titan32(x.float()), ours32(x.float())[0])


def fwd_bwd_fn(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of `module` on x with output gradient dy (plus the aux loss if any)."""
    def step():
        out = module(x)
        if isinstance(out, tuple):
            y, aux = out
            torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
        else:
            out.backward(dy)
    return step


def dense_swiglu_fn(tokens: int, d_model: int, hidden: int, device, dtype):
    """A dense SwiGLU FFN of width `hidden` (same FLOPs as the MoE when hidden = k*H + shared width)."""
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    w1, w3 = (torch.randn(hidden, d_model, device=device, dtype=dtype).mul_(0.02).requires_grad_() for _ in range(2))
    w2 = torch.randn(d_model, hidden, device=device, dtype=dtype).mul_(0.02).requires_grad_()
    dy = torch.randn(tokens, d_model, device=device, dtype=dtype)

    def step():
        F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2).backward(dy)
    return step, [x, w1, w2, w3]


def matmul_tflops(device, dtype, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / (time_ms(lambda: a @ b, [], device) * 1e-3) / 1e12


def moe_flops(shape: dict) -> float:
    """fwd+bwd FLOPs of the routed + shared SwiGLU expert GEMMs actually computed (3 GEMMs each)."""
    tokens = shape["batch"] * shape["seq_len"]
    rows = tokens * shape["num_experts_per_tok"] + tokens * shape["n_shared_experts"]
    return 3 * 3 * 2 * rows * shape["d_model"] * shape["moe_inter_dim"]


# -- one case ---------------------------------------------------------------------------------------

def check_against_reference(ours: MoE, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Relative errors of our bf16 fast path vs the fp32 per-expert loop (same weights, same routing)."""
    ref = copy.deepcopy(ours).float()
    ref.cfg = dataclasses.replace(ours.cfg, dispatch="naive_loop")
    results = {}
    for name, module, inp, grad in (("ours", ours, x, dy), ("ref", ref, x.float(), dy.float())):
        module.zero_grad(set_to_none=True)
        xi = inp.detach().clone().requires_grad_()
        y, aux = module(xi)
        torch.autograd.backward([y, aux], [grad, torch.ones_like(aux)])
        results[name] = {"out": y.detach(), "x": xi.grad, **{n: p.grad for n, p in module.named_parameters()}}
        module.zero_grad(set_to_none=True)
    errs = {f"grad_{k}" if k != "out" else k: rel_err(results["ours"][k], v) for k, v in results["ref"].items()}
    errs["max"] = max(errs.values()) if all(math.isfinite(v) for v in errs.values()) else float("nan")
    return errs


def run_case(shape_name: str, routing: str, device, dtype, with_peer: bool, dense: dict,
             compiled: bool) -> dict:
    shape = SHAPES[shape_name]
    notes: list[str] = []
    torch.manual_seed(0)
    ours = MoE(shape["d_model"], moe_config(shape)).to(device=device, dtype=dtype).train()
    x = torch.randn(shape["batch"], shape["seq_len"], shape["d_model"], device=device, dtype=dtype)
    dy = torch.randn_like(x)
    if routing == "zipf":
        ours.expert_bias.copy_(zipf_bias(ours, x, ZIPF_MAX_OVER_MEAN))
    x.requires_grad_()
    x2 = x.detach().view(-1, shape["d_model"])
    row = {"bench": "moe.fwd_bwd", "shape": {**shape, "tokens": x2.shape[0], "routing": routing,
                                                "activation": "swiglu", "dtype": str(dtype).split(".")[-1]},
           "dispatch": ours.dispatch_mode(x2), "load_max_over_mean": max_over_mean(ours, x2)}
    row["rel_err"] = attempt(notes, "check", check_against_reference, ours, x, dy)
    if row["rel_err"] is not None and not row["rel_err"]["max"] <= 1e-2:
        notes.append(f"CORRECTNESS FAILED: rel_err max {row['rel_err']['max']} > 1e-2")
    ours_params = [x, *ours.parameters()]
    step = fwd_bwd_fn(ours, x, dy)
    row["ours_ms"] = attempt(notes, "ours", time_ms, step, ours_params, device)
    row["ours_peak_mib"] = attempt(notes, "ours peak", peak_mib, step, ours_params, device)

    row["ours_compiled_ms"] = None
    if compiled:  # the whole layer under torch.compile, as a compiled model would run it
        row["ours_compiled_ms"] = attempt(notes, "ours compiled", time_ms, fwd_bwd_fn(torch.compile(ours), x, dy),
                                          ours_params, device)

    padded = copy.deepcopy(ours)
    padded.cfg = dataclasses.replace(ours.cfg, dispatch="padded_bmm")
    row["padded_bmm_ms"] = attempt(notes, "padded_bmm", time_ms, fwd_bwd_fn(padded, x, dy),
                                   [x, *padded.parameters()], device)
    del padded
    naive = copy.deepcopy(ours)
    naive.cfg = dataclasses.replace(ours.cfg, dispatch="naive_loop")
    row["naive_ms"] = attempt(notes, "naive_loop", time_ms, fwd_bwd_fn(naive, x, dy),
                              [x, *naive.parameters()], device)
    del naive

    row.update(peer=None, peer_ms=None, peer_peak_mib=None, peer_rel_err_fp32=None)
    titan = attempt(notes, "torchtitan", build_torchtitan, ours) if with_peer else None
    if titan is not None:
        row["peer"] = "torchtitan 0.3.0"
        titan_params = [x, *titan.parameters()]
        row["peer_rel_err_fp32"] = attempt(notes, "torchtitan fp32 check", peer_agreement, ours, x)
        row["peer_ms"] = attempt(notes, "torchtitan", time_ms, fwd_bwd_fn(titan, x, dy), titan_params, device)
        row["peer_peak_mib"] = attempt(notes, "torchtitan peak", peak_mib, fwd_bwd_fn(titan, x, dy),
                                       titan_params, device)
        del titan

    flops, ours_ms = moe_flops(shape), row["ours_ms"]
    row["gflop_fwd_bwd"] = flops / 1e9
    row["tflops"] = flops / (ours_ms * 1e-3) / 1e12 if ours_ms else None
    row["speedup"] = row["peer_ms"] / ours_ms if ours_ms and row["peer_ms"] else None
    row["speedup_vs_naive"] = row["naive_ms"] / ours_ms if ours_ms and row["naive_ms"] else None
    row["gbps"] = None
    row.update(dense)
    dense_tflops = dense.get("dense_swiglu_tflops")
    row["frac_of_dense_swiglu"] = row["tflops"] / dense_tflops if row["tflops"] and dense_tflops else None
    row["notes"] = "; ".join(notes)
    return row


def dense_ceilings(shape_name: str, device, dtype, matmul: float | None) -> dict:
    """Dense bf16 SwiGLU of the same FLOPs as the MoE (fwd+bwd) and the square-matmul ceiling."""
    shape, notes = SHAPES[shape_name], []
    tokens = shape["batch"] * shape["seq_len"]
    hidden = (shape["num_experts_per_tok"] + shape["n_shared_experts"]) * shape["moe_inter_dim"]
    step, tensors = dense_swiglu_fn(tokens, shape["d_model"], hidden, device, dtype)
    ms = attempt(notes, "dense swiglu", time_ms, step, tensors, device)
    del step, tensors
    return {"dense_swiglu_ms": ms, "dense_swiglu_width": hidden,
            "dense_swiglu_tflops": moe_flops(shape) / (ms * 1e-3) / 1e12 if ms else None,
            "matmul_8192_tflops": matmul}


# -- report -----------------------------------------------------------------------------------------

def environment(device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": package_version("triton"), "commit": git_commit(),
            "date": datetime.date.today().isoformat(),
            "command": "python -m moespeed.bench.moe " + " ".join(sys.argv[1:])}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE = [  # (header, width, cell)
    ("shape", 5, lambda r: r["shape_name"]),
    ("routing", 8, lambda r: r["shape"]["routing"]),
    ("imb", 4, lambda r: _fmt(r["load_max_over_mean"], ".1f")),
    ("ours ms", 8, lambda r: _fmt(r["ours_ms"], ".2f")),
    ("TFLOP/s", 7, lambda r: _fmt(r["tflops"], ".0f")),
    ("%dense", 6, lambda r: _fmt(r["frac_of_dense_swiglu"] and 100 * r["frac_of_dense_swiglu"], ".0f")),
    ("padded", 7, lambda r: _fmt(r["padded_bmm_ms"], ".2f")),
    ("naive", 7, lambda r: _fmt(r["naive_ms"], ".1f")),
    ("xnaive", 6, lambda r: _fmt(r["speedup_vs_naive"], ".1f")),
    ("titan", 7, lambda r: _fmt(r["peer_ms"], ".2f")),
    ("xtitan", 6, lambda r: _fmt(r["speedup"], ".2f")),
    ("MiB ours/titan", 15, lambda r: f"{_fmt(r['ours_peak_mib'], '.0f')}/{_fmt(r['peer_peak_mib'], '.0f')}"),
    ("relerr", 7, lambda r: _fmt(r["rel_err"] and r["rel_err"]["max"], ".1e")),
]


def print_table(rows: list[dict]) -> None:
    """One line per case, then the dense ceilings, compiled timings and notes."""
    for r in {r["shape_name"]: r for r in rows}.values():
        print(f"dense ceilings {r['shape_name']}: SwiGLU width {r['dense_swiglu_width']} "
              f"{_fmt(r['dense_swiglu_ms'], '.2f')} ms = {_fmt(r['dense_swiglu_tflops'], '.0f')} TFLOP/s; "
              f"bf16 8192^3 matmul {_fmt(r['matmul_8192_tflops'], '.0f')} TFLOP/s")
    for r in rows:
        case = f"{r['shape_name']}/{r['shape']['routing']}"
        if r["ours_compiled_ms"]:
            print(f"torch.compile {case}: {r['ours_compiled_ms']:.2f} ms")
        if r["notes"]:
            print(f"notes {case}: {r['notes']}")
    print(" ".join(f"{head:>{width}}" for head, width, _ in TABLE))
    for r in rows:
        print(" ".join(f"{cell(r):>{width}}" for _, width, cell in TABLE))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here (BENCHMARKING.md format)")
    p.add_argument("--shapes", default="A,B", help="comma-separated of " + ",".join(SHAPES))
    p.add_argument("--routing", default=",".join(ROUTINGS), help="balanced,zipf")
    p.add_argument("--no-peer", action="store_true", help="skip torchtitan")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(layer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    if device.type != "cuda":
        print("note: no CUDA: timings are CPU wall clock, only useful as a smoke test", file=sys.stderr)
    notes: list[str] = []
    matmul = attempt(notes, "matmul", matmul_tflops, device, dtype) if device.type == "cuda" else None
    rows = []
    for shape_name in args.shapes.split(","):
        dense = dense_ceilings(shape_name, device, dtype, matmul)
        for routing in args.routing.split(","):
            row = run_case(shape_name, routing, device, dtype, not args.no_peer, dense, args.compile)
            row["shape_name"] = shape_name
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("shape_name", "ours_ms", "peer_ms", "naive_ms", "notes")}),
                  file=sys.stderr, flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        save_json(args.json, {**environment(device), "results": rows})
    print_table(rows)


if __name__ == "__main__":
    main()
