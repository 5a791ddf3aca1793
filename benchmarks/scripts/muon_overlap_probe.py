"""Probe: how much of the Muon step can hide behind the next step's forward (one GPU).

    python benchmarks/scripts/muon_overlap_probe.py --presets small,small-moe --phases 1,4,12

Modes, each timed as the median interval between the starts of consecutive steps (CUDA events):
  none        forward+backward only, no optimizer step (the floor)
  sequential  optimizer.step() as the trainer runs it
  free        the whole optimizer step on a side stream that nobody waits for (wrong semantics:
              the next forward reads half-updated weights; only an upper bound of what can hide)
  phased-P    Muon split into P optimizers by layer group, stepped in forward order on a side
              stream; block i of the next forward waits for its group's event (exact semantics)
Prints, per mode, the step time and the optimizer's added time over `none`.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn

from moespeed.bench.train_step import synthetic_batch
from moespeed.config import build_config
from moespeed.model.moe import update_biases
from moespeed.model.transformer import Transformer
from moespeed.optim.build import build_optimizer
from moespeed.optim.muon import Muon
from moespeed.train.compiling import compile_for_training


class WaitBefore(nn.Module):
    """Eager wrapper: the current stream waits for `events[index]` (if set) before the block runs."""

    def __init__(self, block, events, index):
        super().__init__()
        self.block, self.events, self.index = block, events, index

    def forward(self, *args, **kwargs):
        event = self.events.get(self.index)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        return self.block(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def run(preset: str, modes: list[str], steps: int, warmup: int) -> list[dict]:
    cfg = build_config(preset, None, [("train.optimizer", "muon")])
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    opt, _ = build_optimizer(model, cfg.train)
    run_model = compile_for_training(model, model, cfg.train.compile_scope)
    muon: Muon = opt.optimizers["muon"]
    muon_params = muon.param_groups[0]["params"]
    owner = {}  # param -> block index
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            owner[p] = i
    events: dict[int, torch.cuda.Event] = {}
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        model.blocks[i] = WaitBefore(block, events, i)
    side = torch.cuda.Stream()
    B, T = cfg.data.batch_size, cfg.data.seq_len
    out = []
    for mode in modes:
        phased = None
        if mode.startswith("phased-"):
            n_phases = int(mode.split("-")[1])
            n_blocks = len(blocks)
            groups: list[list] = [[] for _ in range(n_phases)]
            for p in muon_params:
                groups[owner[p] * n_phases // n_blocks].append(p)
            g0 = muon.param_groups[0]
            phased = []
            for k, ps in enumerate(groups):
                if not ps:
                    continue
                m = Muon([{"params": ps}], lr=g0["lr"], weight_decay=g0["weight_decay"], momentum=g0["momentum"],
                         ns_steps=g0["ns_steps"], adjust_lr_fn=g0["adjust_lr_fn"], ns_gemm=muon.ns_gemm,
                         streams=muon.streams, ns_method=muon.ns_method)
                first_block = min(owner[p] for p in ps)
                last_block = max(owner[p] for p in ps)
                phased.append((m, first_block, last_block))
        starts, keep = [], []
        for step in range(warmup + steps + 1):
            tokens, targets, doc_ids = synthetic_batch(B, T, cfg.data.vocab_size, device)
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record()
            starts.append(e0)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = run_model(tokens, targets, doc_ids)
            loss.backward()
            events.clear()
            if mode == "sequential":
                opt.step()
            elif mode == "free":
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    opt.step()
            elif phased is not None:
                opt.optimizers["adamw"].step()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for m, first, last in phased:
                        m.step()
                        ev = torch.cuda.Event()
                        ev.record(side)
                        for i in range(first, last + 1):
                            events[i] = ev
            keep = [p.grad for p in model.parameters()]  # alive until the side stream is done with them
            opt.zero_grad(set_to_none=True)
            for m, *_ in phased or []:
                m.zero_grad(set_to_none=True)
            update_biases([moe for _, moe in model.moe_layers()])
        torch.cuda.synchronize()
        del keep
        intervals = [a.elapsed_time(b) for a, b in zip(starts[warmup:-1], starts[warmup + 1:])]
        row = {"preset": preset, "mode": mode, "step_ms": statistics.median(intervals),
               "min_ms": min(intervals), "max_ms": max(intervals), "loss": float(loss),
               "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        print(json.dumps(row), flush=True)
        out.append(row)
        events.clear()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="small,small-moe")
    p.add_argument("--modes", default="none,sequential,free,phased-1,phased-4,phased-12,sequential,none")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for preset in a.presets.split(","):
        rows += run(preset, a.modes.split(","), a.steps, a.warmup)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, f, indent=1)
    base = {}
    for r in rows:
        if r["mode"] == "none":
            base.setdefault(r["preset"], r["step_ms"])
    print(f"{'preset':10} {'mode':12} {'step ms':>8} {'added ms':>9} {'share':>6}")
    for r in rows:
        added = r["step_ms"] - base[r["preset"]]
        print(f"{r['preset']:10} {r['mode']:12} {r['step_ms']:8.2f} {added:9.2f} {100 * added / r['step_ms']:5.1f}%")


if __name__ == "__main__":
    main()
