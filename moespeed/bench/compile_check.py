"""Does torch.compile train the same model as eager? Per-parameter gradient agreement of a preset.

    python -m moespeed.bench.compile_check --preset small-moe [--set model.n_layers 2] [--batch 8]

Builds the preset's model twice from one seed, one eager and one compiled as the trainer compiles it
(`train.compile_scope`: each block, or with `--set train.compile_scope model` the whole model), runs one
forward+backward on the same random tokens with ~1K-token documents (so FlexAttention block masks
are in play on CUDA), and compares every parameter's gradient: relative error |g_c - g_e| / |g_e|.
Prints the worst parameters and the median; exits 1 when the median exceeds --tolerance.

Why: a compiled model once got the right loss with wrong attention gradients (torch 2.11, H100; off
by 10^2 to 10^8, see BENCHMARKS.md, Correction). Run this after upgrading torch. Under bf16 autocast
(CUDA) the two runs differ by rounding and by top-k routing flips: a healthy small-moe gives a median
of about 0.02 (2 layers) to 0.1 (12 layers); the defect gave 15 to 1000. On CPU it runs in fp32.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from moespeed.bench.train_step import synthetic_batch
from moespeed.config import build_config
from moespeed.model.transformer import Transformer
from moespeed.train.compiling import compile_for_training


def gradient_errors(model: torch.nn.Module, batch: tuple, autocast: bool, scope: str = "model") -> dict[str, float]:
    """{parameter name: relative error of its compiled-model gradient vs the eager model's}; scope as
    `train.compile_scope`."""
    twin = copy.deepcopy(model)
    compiled = compile_for_training(twin, twin, scope)
    device_type = batch[0].device.type
    for module in (model, compiled):
        with torch.autocast(device_type, torch.bfloat16, enabled=autocast):
            module(*batch).backward()
    errors = {}
    for (name, eager), (_, other) in zip(model.named_parameters(), twin.named_parameters()):
        if eager.grad is None or other.grad is None:
            errors[name] = 0.0 if eager.grad is None and other.grad is None else float("inf")
            continue
        reference = eager.grad.float()
        errors[name] = ((other.grad.float() - reference).norm() / reference.norm().clamp(min=1e-30)).item()
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-moe")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="config override, e.g. --set model.n_layers 2")
    p.add_argument("--batch", type=int, default=8, help="sequences (of the preset's length)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest median relative error that passes (default 0.3 with bf16 on CUDA, 1e-3 in fp32)")
    p.add_argument("--show", type=int, default=8, help="worst parameters to print")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    cfg = build_config(args.preset, None, [tuple(kv) for kv in args.set])
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    autocast = device.type == "cuda"
    tolerance = args.tolerance if args.tolerance is not None else (0.3 if autocast else 1e-3)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    batch = synthetic_batch(args.batch, cfg.data.seq_len, cfg.model.vocab_size, device)
    errors = gradient_errors(model, batch, autocast, cfg.train.compile_scope)
    worst = sorted(errors.items(), key=lambda item: -item[1])
    for name, err in worst[: args.show]:
        print(f"{err:10.3e}  {name}")
    median = statistics.median(errors.values())
    verdict = "ok" if median <= tolerance else "FAILED"
    print(f"{args.preset} on {device.type}, compile_scope {cfg.train.compile_scope}: median gradient error {median:.3e} over {len(errors)} parameters "
          f"(tolerance {tolerance:g}): {verdict}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
