"""Benchmark of training attention: FlexAttention with document masks and sliding windows vs SDPA (CUDA).

    python -m moespeed.bench.attention --json benchmarks/results/attention.json [--quick] [--no-train]

Part 1, the attention op alone (MLA head dims of the `small` preset: 12 heads, qk 48 + 16, v 64, bf16),
at T = 8K, 32K, 64K with B = 64K / T sequences (64K tokens per step), forward+backward:
  sdpa_causal        F.scaled_dot_product_attention(is_causal=True) (v 64 != qk 96: no flash kernel)
  sdpa_causal_padv   the same with v zero-padded to 96 (lets SDPA pick flash; the pad costs FLOPs)
  flex_causal        FlexAttention, causal block mask
  flex_doc           documents of random lengths (exponential, mean 2K tokens)
  flex_doc_win1k/4k  documents + a 1K / 4K sliding window
  flex_win4k         a 4K sliding window, no documents
TFLOP/s count only visible (q, k) pairs, FA2 convention (backward recomputes S):
2 * pairs * H * (4 * d_qk + 3 * d_v). `vs_sdpa` = sdpa_causal ms / case ms (same T, same run).
Correctness: every case is first compared, at T = 2048, with fp32 SDPA under the equivalent dense
mask (output and q/k/v gradients; NaN fails). `mask_ms` is the block-mask build time.
Goals: flex_causal >= 70% of sdpa_causal's TFLOP/s; at 64K, flex_doc_win4k >= 3x faster than causal.

Part 2, a full training step (forward, backward, AdamW) of the `small` preset at 64K tokens per
sequence (batch 1, bf16 autocast, torch.compile unless --no-compile): tokens/s and peak memory above
the model and optimizer state, for causal, documents, documents + windows "4096,4096,4096,0" and
"1024,1024,1024,0", and the latter with activation checkpointing.
A failing case (OOM, compile error, ...) is reported and the others go on. A table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from moespeed.bench.common import free_memory, git_commit, package_version, rel_err, save_json
from moespeed.config import FLEX_KERNELS
from moespeed.model import masks
from moespeed.model.attention import AttentionContext


def _small_dims() -> tuple[int, int, int]:
    from moespeed.config import preset_config

    m = preset_config("small").model
    return m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim


H, D_QK, D_V = _small_dims()  # MLA heads and dims of the `small` preset (12, 64, 64)
FLEX_KERNEL = "triton"  # `model.flex_kernel` of the Flex cases and the training step (--flex-kernel)


def set_dims(heads: int, d_qk: int, d_v: int) -> None:
    """Benchmark the op at other head dims (`--dims`); the training-step part always uses the preset."""
    global H, D_QK, D_V
    H, D_QK, D_V = heads, d_qk, d_v


FLEX_SWEEP = [  # kernel options for --flex-sweep (FlexKernelOptions); {} = torch's defaults
    {}, {"ROWS_GUARANTEED_SAFE": True}, {"USE_TMA": True},
    {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
     "bwd_num_warps": 8, "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
     "bwd_num_warps": 4, "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
     "bwd_num_warps": 4, "bwd_num_stages": 4},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
     "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
     "bwd_num_warps": 4, "bwd_num_stages": 3, "ROWS_GUARANTEED_SAFE": True},
    {"BACKEND": "FLASH"},  # FlashAttention (CuTe DSL) kernels, where flash-attn's cute package is installed
    {"__compile_mode": "max-autotune-no-cudagraphs"},  # Inductor autotunes the Triton kernel's configs
]
TOKENS = 65536
SEQ_LENS = [8192, 32768, 65536]
MEAN_DOC = 2048
CHECK_T = 2048
MIB = 2**20
CASES = {  # name: (documents, window)
    "sdpa_causal": (False, 0), "sdpa_causal_padv": (False, 0), "flex_causal": (False, 0),
    "flex_doc": (True, 0), "flex_doc_win1k": (True, 1024), "flex_doc_win4k": (True, 4096),
    "flex_win4k": (False, 4096),
}


# ------------------------------------------------------------------------------------ helpers
def environment() -> dict:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": package_version("triton"),
            "commit": git_commit(), "date": datetime.date.today().isoformat()}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def random_doc_ids(B: int, T: int, mean: int, seed: int, device) -> torch.Tensor:
    """(B, T) non-decreasing doc ids, document lengths ~ exponential with the given mean (>= 1)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < T:
            lengths.append(max(1, int(torch.empty(1).exponential_(1.0 / mean, generator=gen).item())))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T]
        rows.append(ids)
    return torch.stack(rows).to(device)


def visible_pairs(doc_ids: torch.Tensor | None, window: int, B: int, T: int) -> int:
    """Number of (query, key) pairs the mask lets through, summed over the batch."""
    pos = torch.arange(T, device=doc_ids.device if doc_ids is not None else "cpu")
    if doc_ids is None:
        start = torch.zeros(B, T, dtype=torch.long, device=pos.device)
    else:
        is_start = torch.ones_like(doc_ids, dtype=torch.bool)
        is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start = torch.where(is_start, pos, 0).cummax(dim=1).values  # first position of each token's doc
    count = pos - start + 1
    if window:
        count = count.clamp(max=window)
    return int(count.sum())


def attention_flops(pairs: int) -> float:
    return 2.0 * pairs * H * (4 * D_QK + 3 * D_V)


# ------------------------------------------------------------------------------ part 1: the op
def make_inputs(B, T, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, H, T, D_QK), (B, H, T, D_QK), (B, H, T, D_V)]
    return [torch.randn(s, device="cuda", generator=gen).to(dtype).requires_grad_() for s in shapes]


def case_fn(name: str, doc_ids, window: int, T: int):
    """(attention(q, k, v) -> out, mask build ms) for one case; masks built once, outside the timing."""
    scale = D_QK ** -0.5
    if name == "sdpa_causal":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)), None
    if name == "sdpa_causal_padv":
        def padded(q, k, v):
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, D_QK - D_V)), is_causal=True, scale=scale)
            return out[..., :D_V]
        return padded, None
    windows = torch.tensor([window], device="cuda") if window else None
    build = lambda: masks.block_mask(doc_ids, windows[0] if window else None, T, torch.device("cuda"))  # noqa: E731
    block = build()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        build()
    torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - t0) / 5 * 1e3
    ctx = AttentionContext(torch.arange(T, device="cuda"), None, None, doc_ids=doc_ids, windows=windows,
                           backend="flex", flex_kernel=FLEX_KERNEL)  # builds its block mask on the first call and keeps it
    del block
    return (lambda q, k, v: ctx.attend(q, k, v, 0 if window else None, scale)), mask_ms


def fwd_bwd(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def check_case(name: str, documents: bool, window: int) -> dict:
    """Case at T = CHECK_T in bf16 vs fp32 SDPA with the dense mask: rel. errors of out, dq, dk, dv."""
    B, T = 2, CHECK_T
    doc_ids = random_doc_ids(B, T, MEAN_DOC // 4, seed=1, device="cuda") if documents else None
    fn, _ = case_fn(name, doc_ids, window, T)
    inputs = make_inputs(B, T, torch.bfloat16, seed=1)
    dout = torch.randn(B, H, T, D_V, device="cuda").to(torch.bfloat16)
    got = fwd_bwd(fn, *inputs, dout)
    mask = masks.dense_mask(doc_ids, torch.tensor(window, device="cuda") if window else None, T, torch.device("cuda"))
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ref = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D_QK ** -0.5),
                  *ref_in, dout.float())
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    return {"err_out": errs[0], "err_dq": errs[1], "err_dk": errs[2], "err_dv": errs[3],
            "correct": all(e <= 2e-2 for e in errs)}  # NaN compares False


def bench_op(name: str, T: int) -> dict:
    from triton.testing import do_bench

    documents, window = CASES[name]
    B = max(1, TOKENS // T)
    row = {"bench": "attention.fwd_bwd", "case": name, "shape": {"B": B, "T": T, "H": H, "d_qk": D_QK, "d_v": D_V,
                                                                 "mean_doc": MEAN_DOC if documents else None,
                                                                 "window": window or None,
                                                                 "flex_kernel": FLEX_KERNEL if name.startswith("flex") else None}}
    try:
        torch._dynamo.reset()  # fresh static-shape kernels per case (and no recompile limit)
        row.update(check_case(name, documents, window))
        doc_ids = random_doc_ids(B, T, MEAN_DOC, seed=0, device="cuda") if documents else None
        fn, row["mask_ms"] = case_fn(name, doc_ids, window, T)
        q, k, v = make_inputs(B, T, torch.bfloat16)
        dout = torch.randn(B, H, T, D_V, device="cuda").to(torch.bfloat16)
        fwd_bwd(fn, q, k, v, dout)  # compile / warm up
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs = fwd_bwd(fn, q, k, v, dout)
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
        del outs
        row["ms"] = do_bench(lambda: fwd_bwd(fn, q, k, v, dout), warmup=50, rep=300, return_mode="median")
        pairs = visible_pairs(doc_ids, window, B, T)
        row["visible_fraction"] = pairs / (B * T * (T + 1) / 2)
        row["tflops"] = attention_flops(pairs) / row["ms"] / 1e9
    except Exception as exc:  # noqa: BLE001 - report and continue
        row["error"] = error_text(exc)
        traceback.print_exc()
    free_memory()
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------- part 2: training step
TRAIN_CASES = {  # name: (documents, window_pattern, activation_checkpointing)
    "causal": (False, "0", False),
    "doc": (True, "0", False),
    "doc_win4k": (True, "4096,4096,4096,0", False),
    "doc_win1k": (True, "1024,1024,1024,0", False),
    "doc_win1k_ckpt": (True, "1024,1024,1024,0", True),
}


def bench_train(name: str, T: int, compile_model: bool, steps: int = 5) -> dict:
    from moespeed.config import preset_config
    from moespeed.model.transformer import Transformer

    documents, pattern, ckpt = TRAIN_CASES[name]
    row = {"bench": "attention.train_step", "case": name,
           "shape": {"preset": "small", "B": 1, "T": T, "window_pattern": pattern, "documents": documents,
                     "activation_checkpointing": ckpt, "compile": compile_model, "flex_kernel": FLEX_KERNEL}}
    model = optimizer = None
    try:
        torch._dynamo.reset()
        cfg = preset_config("small").model
        cfg.vocab_size, cfg.max_seq_len, cfg.window_pattern, cfg.activation_checkpointing = 32768, T, pattern, ckpt
        cfg.flex_kernel = FLEX_KERNEL
        cfg.validate()
        torch.manual_seed(0)
        model = Transformer(cfg).cuda().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step_model = torch.compile(model) if compile_model else model
        tokens = torch.randint(0, cfg.vocab_size, (1, T + 1), device="cuda")
        doc_ids = random_doc_ids(1, T, MEAN_DOC, seed=0, device="cuda") if documents else None

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(tokens[:, :-1], tokens[:, 1:], doc_ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        t0 = time.perf_counter()
        step()  # compile + optimizer state
        torch.cuda.synchronize()
        row["first_step_s"] = time.perf_counter() - t0
        step()
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
        row["state_mib"] = base / MIB
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        row["ms"] = start.elapsed_time(end) / steps
        row["tokens_per_s"] = T / row["ms"] * 1e3
        row["loss"] = float(loss)
        row["correct"] = math.isfinite(row["loss"])
    except Exception as exc:  # noqa: BLE001 - report and continue
        row["error"] = error_text(exc)
        traceback.print_exc()
    model = optimizer = step_model = None  # free before the next case
    free_memory()
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------ summary
def summarize(rows: list[dict]) -> dict:
    """Per T: vs_sdpa ratios on the rows, and the two goals."""
    goals = {}
    by_t: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["bench"] == "attention.fwd_bwd" and "ms" in r:
            by_t.setdefault(r["shape"]["T"], {})[r["case"]] = r
    for T, cases in by_t.items():
        sdpa = cases.get("sdpa_causal")
        causal_ms = min((cases[c]["ms"] for c in ("sdpa_causal", "sdpa_causal_padv", "flex_causal") if c in cases),
                        default=None)
        for r in cases.values():
            r["vs_sdpa"] = sdpa["ms"] / r["ms"] if sdpa else None
            r["vs_best_causal"] = causal_ms / r["ms"] if causal_ms else None
        if sdpa and "flex_causal" in cases:
            goals[f"T{T}_flex_causal_tflops_vs_sdpa"] = cases["flex_causal"]["tflops"] / sdpa["tflops"]
        if causal_ms and "flex_doc_win4k" in cases:
            goals[f"T{T}_doc_win4k_speedup_vs_best_causal"] = causal_ms / cases["flex_doc_win4k"]["ms"]
    return goals


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], extras: dict) -> None:
    head = (f"{'case':>18} {'B x T':>10} {'ms':>9} {'TFLOP/s':>8} {'x sdpa':>7} {'peak MiB':>9} {'mask ms':>8} "
            f"{'err':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r["bench"] != "attention.fwd_bwd":
            continue
        shape = f"{r['shape']['B']}x{r['shape']['T'] // 1024}K"
        if "error" in r:
            print(f"{r['case']:>18} {shape:>10}  ERROR {r['error'][:80]}")
            continue
        err = max(r["err_out"], r["err_dq"], r["err_dk"], r["err_dv"])
        print(f"{r['case']:>18} {shape:>10} {r['ms']:9.2f} {r['tflops']:8.1f} {fmt(r.get('vs_sdpa'), '7.2f')} "
              f"{r['peak_mib']:9.0f} {fmt(r.get('mask_ms'), '8.2f')} {err:8.1e}{'' if r['correct'] else ' WRONG'}")
    train = [r for r in rows if r["bench"] == "attention.train_step"]
    if train:
        head = f"{'train step (small)':>18} {'T':>10} {'ms':>9} {'tok/s':>9} {'peak MiB':>9} {'state MiB':>9}"
        print("\n" + head + "\n" + "-" * len(head))
        for r in train:
            if "error" in r:
                print(f"{r['case']:>18} {r['shape']['T']:>10}  ERROR {r['error'][:80]}")
                continue
            print(f"{r['case']:>18} {r['shape']['T']:>10} {r['ms']:9.1f} {r['tokens_per_s']:9.0f} "
                  f"{r['peak_mib']:9.0f} {r['state_mib']:9.0f}")
    for key, value in extras.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")


def flex_sweep(T: int, cases: list[str], selected: list[dict] | None = None) -> list[dict]:
    """bench_op for each kernel-option set in FLEX_SWEEP (or `selected`) plus sdpa_causal once."""
    from moespeed.model import attention

    default, default_mode = dict(attention.FLEX_KERNEL_OPTIONS), attention.FLEX_COMPILE_MODE
    rows = [bench_op("sdpa_causal", T)]
    for entry in selected or FLEX_SWEEP:
        options = {k: v for k, v in entry.items() if k != "__compile_mode"}
        attention.FLEX_KERNEL_OPTIONS.clear()
        attention.FLEX_KERNEL_OPTIONS.update(options)
        attention.FLEX_COMPILE_MODE = entry.get("__compile_mode")
        attention._compiled_flex.cache_clear()
        for name in cases:
            row = bench_op(name, T)
            row["case"] = f"{name} {json.dumps(entry)}"
            rows.append(row)
    attention.FLEX_KERNEL_OPTIONS.clear()
    attention.FLEX_KERNEL_OPTIONS.update(default)
    attention.FLEX_COMPILE_MODE = default_mode
    attention._compiled_flex.cache_clear()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (BENCHMARKING.md format)")
    parser.add_argument("--quick", action="store_true", help="T = 8K only, no training step")
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="comma-separated T")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated op cases ('' = none)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step part")
    parser.add_argument("--train-cases", default=",".join(TRAIN_CASES), help="comma-separated train cases")
    parser.add_argument("--no-compile", action="store_true", help="training step without torch.compile")
    parser.add_argument("--flex-sweep", type=int, metavar="T",
                        help="only: flex_causal at this T under each FLEX_SWEEP option set")
    parser.add_argument("--flex-entries", help="with --flex-sweep: comma-separated indices into FLEX_SWEEP")
    parser.add_argument("--flex-cases", default="flex_causal",
                        help="with --flex-sweep: comma-separated Flex op cases to time per entry (default flex_causal)")
    parser.add_argument("--flex-kernel", choices=FLEX_KERNELS, default="triton",
                        help="model.flex_kernel of the Flex cases and the training step (flash: FlashAttention-4)")
    parser.add_argument("--dims", metavar="H,QK,V",
                        help=f"op part: heads, qk and v head dims (default the small preset's {H},{D_QK},{D_V})")
    args = parser.parse_args(argv)
    if args.dims:
        set_dims(*(int(x) for x in args.dims.split(",")))
    global FLEX_KERNEL
    FLEX_KERNEL = args.flex_kernel
    flex_cases = args.flex_cases.split(",")
    if any(name not in CASES for name in flex_cases):
        parser.error(f"--flex-cases {args.flex_cases}: choose from {', '.join(CASES)}")
    if not torch.cuda.is_available():
        print("attention bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.flex_sweep:
        picked = [FLEX_SWEEP[int(i)] for i in args.flex_entries.split(",")] if args.flex_entries else None
        rows = flex_sweep(args.flex_sweep, flex_cases, picked)
        if args.json:
            doc = {**environment(), "command": "python -m moespeed.bench.attention " + " ".join(sys.argv[1:]),
                   "results": rows}
            save_json(args.json, doc)
        for r in rows:
            print(f"{r['case']:>100} {r.get('ms', float('nan')):9.2f} {r.get('tflops', float('nan')):7.1f}"
                  f" {r.get('error', '')}")
        return 0
    seq_lens = [8192] if args.quick else [int(t) for t in args.seq_lens.split(",")]
    rows = [bench_op(name, T) for T in seq_lens for name in args.cases.split(",") if name]  # "": training only
    if not (args.quick or args.no_train):
        rows += [bench_train(name, TOKENS, not args.no_compile) for name in args.train_cases.split(",")]
    extras = summarize(rows)
    if args.json:
        doc = {**environment(), "command": "python -m moespeed.bench.attention " + " ".join(sys.argv[1:]),
               "goals": extras, "results": rows}
        save_json(args.json, doc)
    print_table(rows, extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
