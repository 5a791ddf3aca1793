"""Benchmark of cached decoding: MLA absorbed vs MLA expanded (naive) vs MHA of equal width (CUDA).

    python -m moespeed.bench.decode --json benchmarks/results/decode.json [--quick]

Models: the `small` preset (12 layers, d_model 768, 12 heads, MLA r 128 + p 16, bf16 weights) and the
same model with MHA attention (12 heads x 64). One decode step = one new token per sequence at
position ctx - 1 over a static cache of ctx positions (filled with random values), for batch 1, 16,
64 and ctx 4K, 16K, 32K. Paths (attention, decode kernel):
  mla_absorbed        latent cache, wkv_b absorbed into query/output (MQA in latent space), Triton
                      flash-decoding kernel (reads each cached latent once)
  mla_absorbed_torch  the same with batched matmuls + softmax (reads the cache twice)
  mla_expanded        latent cache, every cached latent re-expanded to per-head K and V (naive)
  mha, mha_torch      K and V cache of 12 heads x 64, Triton kernel / batched matmuls
The step (`hidden_states` with a tensor start position + logits) is captured in a CUDA graph
(--modes, default compile_graph,graph,eager: compile_graph = torch.compile'd (fusing the small
elementwise ops) then captured, graph = eager ops captured, compile, eager; the first that works is
used and the `mode` column says which).
Reported: ms per step (do_bench median), tokens/s = B / step time, and effective GB/s = bytes that
must be read per step (all weights once + every layer's cache for B x ctx tokens) / step time,
next to the measured copy bandwidth (read + write of 1 GiB). Correctness first: the compiled step's
logits vs the eager model's at a small context (bf16: rel. err <= 2e-2; NaN fails).
Goals: MLA cache >= 10x smaller than MHA's; decode at batch 64 x 16K context >= 50% of the copy
bandwidth. The cache ratio is 2 * d_model / (r + p) here (10.7x for the preset's r 128 + p 16; 5.3x
with --kv-lora-rank 256 --qk-rope-head-dim 32).
--kernel-sweep first times the decode kernel alone (one layer, B 64 x 16K) under several launch
configurations (see SWEEP); the model rows use the module defaults.
A case that does not fit in memory is skipped and says so.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch

from moespeed.bench.attention import environment, error_text
from moespeed.bench.common import free_memory, rel_err, save_json
from moespeed.generate import make_step

BATCHES = [1, 16, 64]
CONTEXTS = [4096, 16384, 32768]
PATHS = {  # name: (model.attention, MLA absorbed decode, model.decode_kernel)
    "mla_absorbed": ("mla", True, "triton"),
    "mla_absorbed_torch": ("mla", True, "torch"),
    "mla_expanded": ("mla", False, "torch"),
    "mha": ("mha", False, "triton"),
    "mha_torch": ("mha", False, "torch"),
}


MLA_DIMS: dict = {}  # overrides of the preset's kv_lora_rank / qk_rope_head_dim (command line)


def build_model(path: str):
    from moespeed.config import preset_config
    from moespeed.model.transformer import Transformer

    attention, absorb, kernel = PATHS[path]
    cfg = preset_config("small").model
    cfg.vocab_size, cfg.max_seq_len = 32768, max(CONTEXTS)
    for key, value in MLA_DIMS.items():
        setattr(cfg, key, value)
    cfg.attention, cfg.decode_kernel = attention, kernel
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    for block in model.blocks:
        if attention == "mla":
            block.attn.absorb = absorb
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cache_tensors(caches) -> list[torch.Tensor]:
    return [t for c in caches for t in ((c.kv,) if hasattr(c, "kv") else (c.k, c.v))]


def check_path(path: str, mode: str) -> dict:
    """The step (static cache, this path's kernel, mode) vs the eager model with the torch decode
    kernel and int positions, at B = 2, ctx = 1000: rel. error of the logits."""
    model = build_model(path)
    B, ctx = 2, 1000
    tokens = torch.randint(0, model.cfg.vocab_size, (B, ctx + 1), device="cuda")
    with torch.no_grad():
        kernel, model.cfg.decode_kernel = model.cfg.decode_kernel, "torch"
        ref_caches = model.new_cache(B, ctx + 1)
        model.hidden_states(tokens[:, :ctx], caches=ref_caches)
        ref = model.logits(model.hidden_states(tokens[:, ctx:], caches=ref_caches, start_pos=ctx)[:, -1])
        model.cfg.decode_kernel = kernel
        caches = model.new_cache(B, ctx + 1)
        model.hidden_states(tokens[:, :ctx], caches=caches)
        pos = torch.tensor(ctx, device="cuda")
        got = make_step(model, caches, tokens[:, ctx:].clone(), pos, mode)()
    err = rel_err(got, ref)
    return {"err_logits": err, "correct": err <= 2e-2}


def fits(path: str, model, batch: int, ctx: int, bytes_per_token: int) -> tuple[bool, float]:
    """Whether the cache (and the expanded path's per-layer K/V) fit in 85% of free memory."""
    need = model.cfg.n_layers * batch * ctx * bytes_per_token
    if path == "mla_expanded":
        c = model.cfg
        need += 3 * batch * ctx * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2
    free, _ = torch.cuda.mem_get_info()
    return need < 0.85 * free, need / 2**30


def bench_case(path: str, model, batch: int, ctx: int, modes: list[str]) -> dict:
    from triton.testing import do_bench

    bpt = model.kv_cache_bytes_per_token(torch.bfloat16)["per_layer"]
    row = {"bench": "decode.step", "case": path, "shape": {"B": batch, "ctx": ctx, "preset": "small", **MLA_DIMS},
           "cache_bytes_per_token_layer": bpt}
    ok, need_gib = fits(path, model, batch, ctx, bpt)
    if not ok:
        row["error"] = f"skipped: needs ~{need_gib:.1f} GiB"
        print(json.dumps(row), flush=True)
        return row
    caches = None
    try:
        with torch.no_grad():
            caches = model.new_cache(batch, ctx)
            for t in cache_tensors(caches):
                t.normal_(0, 1)
            for mode in modes:
                try:
                    token = torch.randint(0, model.cfg.vocab_size, (batch, 1), device="cuda")
                    run = make_step(model, caches, token, torch.tensor(ctx - 1, device="cuda"), mode)
                    run()
                    row["mode"] = mode
                    break
                except Exception as exc:  # noqa: BLE001 - fall back to the next mode
                    row[f"{mode}_error"] = error_text(exc)
            if "mode" not in row:
                raise RuntimeError(f"no step mode ran: {', '.join(modes)}")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            row["step_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20  # above weights + caches
            row["ms"] = do_bench(run, warmup=25, rep=200, return_mode="median")
        row["tokens_per_s"] = batch / row["ms"] * 1e3
        moved = weight_bytes(model) + model.cfg.n_layers * batch * ctx * bpt
        row["bytes_per_step"] = moved
        row["gbps"] = moved / row["ms"] / 1e6
    except Exception as exc:  # noqa: BLE001 - report and continue
        row["error"] = error_text(exc)
        traceback.print_exc()
    del caches
    free_memory()
    print(json.dumps(row), flush=True)
    return row


SWEEP = [  # (programs_per_sm, block_n, num_warps, num_stages); the first is the current default
    (2, None, 4, 2), (4, None, 4, 2), (8, None, 4, 2), (4, 64, 4, 3), (8, 64, 4, 3), (4, 128, 8, 3),
    (8, 128, 8, 3), (16, 64, 4, 3), (8, 32, 4, 4), (16, 32, 4, 4), (4, 64, 8, 4), (8, 128, 4, 3),
]


def kernel_sweep(batch: int = 64, ctx: int = 16384) -> list[dict]:
    """The Triton decode kernel alone on one layer's MLA absorbed shape (rows = heads, key =
    latent + rope, value = latent), for each launch configuration in SWEEP: ms and GB/s of the
    cache read, error vs the reference. Restores the default launch parameters afterwards."""
    from triton.testing import do_bench

    from moespeed.kernels import decode_attention as da

    cfg = build_model("mla_absorbed").cfg
    r, p, heads = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_heads
    k = torch.randn(batch, 1, ctx, r + p, device="cuda", dtype=torch.bfloat16)  # (B, 1, S, r + p)
    q = torch.randn(batch, 1, heads, r + p, device="cuda", dtype=torch.bfloat16)  # (B, 1, H, r + p)
    q_pos = torch.tensor([ctx - 1], device="cuda")
    scale = (r + p) ** -0.5
    ref = da.decode_attention_reference(q, k, None, q_pos, scale, v_dim=r)
    default = dict(da.LAUNCH)
    rows = []
    for pps, block_n, warps, stages in SWEEP:
        da.LAUNCH.update(programs_per_sm=pps, block_n=block_n, num_warps=warps, num_stages=stages)
        row = {"programs_per_sm": pps, "block_n": block_n, "num_warps": warps, "num_stages": stages}
        try:
            out = da._decode_triton(q, k, None, q_pos, None, None, scale, r)
            row["err"] = rel_err(out, ref)
            row["ms"] = do_bench(lambda: da._decode_triton(q, k, None, q_pos, None, None, scale, r),
                                 return_mode="median")
            row["gbps"] = k.numel() * k.element_size() / row["ms"] / 1e6
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
            row["error"] = error_text(exc)
        print(json.dumps({"kernel_sweep": row}), flush=True)
        rows.append(row)
    da.LAUNCH.update(default)
    return rows


def profile_step(path: str = "mla_absorbed", batch: int = 64, ctx: int = 16384) -> str:
    """GPU time per kernel of one eager decode step (torch.profiler), as a printable table."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(path)
    with torch.no_grad():
        caches = model.new_cache(batch, ctx)
        token = torch.randint(0, model.cfg.vocab_size, (batch, 1), device="cuda")
        step = make_step(model, caches, token, torch.tensor(ctx - 1, device="cuda"), "eager")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    del caches, model
    free_memory()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def copy_gbps() -> float:
    from triton.testing import do_bench

    src = torch.empty(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def print_table(rows: list[dict], extras: dict) -> None:
    head = f"{'path':>18} {'B':>4} {'ctx':>6} {'mode':>13} {'ms':>8} {'tok/s':>9} {'GB/s':>7} {'% copy':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    copy = extras.get("copy_gbps")
    for r in rows:
        s = r["shape"]
        if "error" in r:
            print(f"{r['case']:>18} {s['B']:>4} {s['ctx']:>6}  {r['error'][:80]}")
            continue
        pct = f"{100 * r['gbps'] / copy:6.0f}%" if copy else "-"
        print(f"{r['case']:>18} {s['B']:>4} {s['ctx']:>6} {r['mode']:>13} {r['ms']:8.3f} {r['tokens_per_s']:9.0f} "
              f"{r['gbps']:7.0f} {pct:>7}")
    for key, value in extras.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (BENCHMARKING.md format)")
    parser.add_argument("--quick", action="store_true", help="batch 64 x ctx 16K only")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated paths")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths")
    parser.add_argument("--modes", default="compile_graph,graph,eager", help="step modes to try, in order "
                        "(graph, compile_graph, compile, eager)")
    parser.add_argument("--kernel-sweep", action="store_true",
                        help="first time the decode kernel alone under several launch configurations")
    parser.add_argument("--profile", action="store_true",
                        help="first print a per-kernel GPU-time profile of the MLA absorbed step at B 64 x 16K")
    parser.add_argument("--kv-lora-rank", type=int, help="MLA latent rank r (preset: 128)")
    parser.add_argument("--qk-rope-head-dim", type=int, help="MLA shared rope key dims p (preset: 16)")
    args = parser.parse_args(argv)
    MLA_DIMS.update({k: v for k, v in (("kv_lora_rank", args.kv_lora_rank),
                                       ("qk_rope_head_dim", args.qk_rope_head_dim)) if v})
    if not torch.cuda.is_available():
        print("decode bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    batches, contexts = ([64], [16384]) if args.quick else (
        [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")])
    modes = args.modes.split(",")
    extras: dict = {}
    try:
        extras["copy_gbps"] = copy_gbps()
    except Exception as exc:  # noqa: BLE001 - optional
        extras["copy_error"] = error_text(exc)
    if args.profile:
        print(profile_step(), flush=True)
    if args.kernel_sweep:
        extras["kernel_sweep_B64_16K"] = kernel_sweep()
        free_memory()
    rows = []
    for path in args.paths.split(","):
        try:
            torch._dynamo.reset()
            check = check_path(path, modes[0])
            print(json.dumps({"check": path, **check}), flush=True)
        except Exception as exc:  # noqa: BLE001
            check = {"check_error": error_text(exc), "correct": False}
            traceback.print_exc()
        free_memory()
        model = build_model(path)
        extras[f"{PATHS[path][0]}_cache_bytes_per_token"] = model.kv_cache_bytes_per_token(torch.bfloat16)["total"]
        for batch in batches:
            for ctx in contexts:
                torch._dynamo.reset()
                row = bench_case(path, model, batch, ctx, modes)
                row.update(check)
                rows.append(row)
        del model
        free_memory()
    if "mla_cache_bytes_per_token" in extras and "mha_cache_bytes_per_token" in extras:
        extras["cache_ratio_mha_over_mla"] = extras["mha_cache_bytes_per_token"] / extras["mla_cache_bytes_per_token"]
    copy = extras.get("copy_gbps")
    for r in rows:
        if copy and "gbps" in r:
            r["fraction_of_copy"] = r["gbps"] / copy
            if (r["shape"]["B"], r["shape"]["ctx"]) == (64, 16384):
                extras[f"{r['case']}_B64_16K_fraction_of_copy"] = r["fraction_of_copy"]
    absorbed = {(r["shape"]["B"], r["shape"]["ctx"]): r for r in rows if r["case"] == "mla_absorbed" and "ms" in r}
    for r in rows:
        ref = absorbed.get((r["shape"]["B"], r["shape"]["ctx"]))
        if r["case"] != "mla_absorbed" and ref and "ms" in r:
            r["absorbed_speedup"] = r["ms"] / ref["ms"]  # > 1: the absorbed MLA step is faster
    if args.json:
        doc = {**environment(), "command": "python -m moespeed.bench.decode " + " ".join(sys.argv[1:]),
               "extras": extras, "results": rows}
        save_json(args.json, doc)
    print_table(rows, extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
