"""Full training-step benchmark of a preset: forward+backward, optimizer step, tokens/s, MFU, memory.

    python -m moespeed.bench.train_step --presets small,small-moe --optimizers adamw,muon --json out.json

Synthetic tokens (uniform over the vocabulary) with document ids of ~1K-token documents, the
preset's batch, sequence length, `train.grad_accum` (micro-batches per optimizer step), compile
setting and bf16 autocast. Each step is timed with CUDA
events in two parts, forward+backward and optimizer step (plus MoE bias updates); the table reports
medians over the timed steps and the optimizer's share of the step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch

from moespeed.bench.common import git_commit, save_json
from moespeed.config import build_config
from moespeed.model.moe import update_biases
from moespeed.model.transformer import Transformer
from moespeed.optim.build import build_optimizer
from moespeed.train.compiling import compile_for_training
from moespeed.train.metrics import flops_per_token, peak_flops


def synthetic_batch(batch: int, seq: int, vocab: int, device, mean_doc: int = 1024):
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    starts = torch.rand(batch, seq, device=device) < 1.0 / mean_doc
    doc_ids = torch.cumsum(starts.long(), dim=1)  # (B, T)
    return tokens[:, :-1], tokens[:, 1:], doc_ids


def bench(preset: str, optimizer: str, steps: int, warmup: int, overrides: list[tuple[str, str]]) -> dict:
    cfg = build_config(preset, None, [("train.optimizer", optimizer)] + overrides)
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    opt, _ = build_optimizer(model, cfg.train)
    run = compile_for_training(model, model, cfg.train.compile_scope) if cfg.train.compile else model
    B, T, micro = cfg.data.batch_size, cfg.data.seq_len, cfg.train.grad_accum
    fwd_bwd, opt_ms = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        batches = [synthetic_batch(B, T, cfg.data.vocab_size, device) for _ in range(micro)]
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        for tokens, targets, doc_ids in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = run(tokens, targets, doc_ids)
            (loss / micro).backward()
        e1.record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_biases([moe for _, moe in model.moe_layers()])
        e2.record()
        torch.cuda.synchronize()
        if step >= warmup:
            fwd_bwd.append(e0.elapsed_time(e1))
            opt_ms.append(e1.elapsed_time(e2))
    fb, om = statistics.median(fwd_bwd), statistics.median(opt_ms)
    tok_s = micro * B * T / ((fb + om) / 1e3)
    return {"bench": f"train_step.{preset}.{optimizer}",
            "shape": {"batch": B, "seq_len": T, "grad_accum": micro, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                      "compile": cfg.train.compile and cfg.train.compile_scope},
            "fwd_bwd_ms": fb, "optimizer_ms": om, "ours_ms": fb + om, "optimizer_share": om / (fb + om),
            "tokens_per_s": tok_s, "mfu": flops_per_token(model, T) * tok_s / peak_flops(device),
            "ours_peak_mib": torch.cuda.max_memory_allocated() / 2**20, "loss": float(loss),
            **_graph_counts(opt)}


def _graph_counts(opt) -> dict:
    """train.muon_cuda_graph: how often Muon's step was captured and replayed."""
    graph = getattr(opt.optimizers.get("muon"), "_graph", None)
    return {"muon_graph_captures": graph.captures, "muon_graph_replays": graph.replays} if graph else {}


def main(argv=None, prog: str = "python -m moespeed.bench.train_step") -> None:
    """The bench's command line; `prog` heads the command recorded in the JSON (a wrapper names itself)."""
    p = argparse.ArgumentParser(prog="python -m moespeed.bench.train_step", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="small,small-moe")
    p.add_argument("--optimizers", default="adamw,muon")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="config override, e.g. --set data.batch_size 16")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        for optimizer in args.optimizers.split(","):
            try:
                rows.append(bench(preset, optimizer, args.steps, args.warmup, [tuple(kv) for kv in args.set]))
            except Exception as e:  # one failing case must not hide the others
                rows.append({"bench": f"train_step.{preset}.{optimizer}", "notes": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA: every row failed)"
        save_json(args.json, {"device": device, "torch": torch.__version__, "commit": git_commit(short=True),
                              "date": datetime.date.today().isoformat(),
                              "command": f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv),
                              "results": rows})
    print(f"{'bench':34} {'fwd+bwd ms':>10} {'optim ms':>9} {'optim %':>8} {'tok/s':>10} {'MFU':>6} {'peak MiB':>9}")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"{r['bench']:34} {r['fwd_bwd_ms']:10.1f} {r['optimizer_ms']:9.2f} {100 * r['optimizer_share']:7.1f}% "
                  f"{r['tokens_per_s']:10,.0f} {r['mfu']:6.3f} {r['ours_peak_mib']:9.0f}")
        else:
            print(f"{r['bench']:34} FAILED {r['notes']}")


if __name__ == "__main__":
    main()
