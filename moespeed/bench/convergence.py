"""Muon vs AdamW convergence on the embedded corpus: same model, same tokens, a small lr sweep each.

    python -m moespeed.bench.convergence --preset small --steps 600 --out-dir runs/convergence

Trains the preset once per (optimizer, lr), evaluates every `--eval-every` steps, writes
`convergence.png` (val loss vs step, best lr of each optimizer bold) and `convergence.json`, and
reports how many steps the best AdamW run needs to reach the best Muon run's final val loss.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moespeed.config import build_config
from moespeed.train.metrics import read_metrics
from moespeed.train.trainer import Trainer


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step (linearly interpolated) at which the curve's val loss is <= target."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m moespeed.bench.convergence", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--adamw-lrs", default="1e-3,3e-3")
    p.add_argument("--muon-lrs", default="3e-3,1e-2")
    p.add_argument("--out-dir", default="runs/convergence")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    curves: dict[str, dict[float, list]] = {"adamw": {}, "muon": {}}
    for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        for lr in [float(x) for x in lrs.split(",") if x.strip()]:  # "" skips this optimizer
            run_dir = out / f"{optimizer}-lr{lr:g}"
            overrides = [("train.optimizer", optimizer), ("train.lr", lr), ("train.steps", args.steps),
                         ("train.eval_every", args.eval_every), ("train.ckpt_every", args.steps),
                         ("train.run_dir", str(run_dir)), ("train.keep_last", 1)] + [tuple(kv) for kv in args.set]
            Trainer(build_config(args.preset, None, overrides)).fit()
            curves[optimizer][lr] = val_curve(run_dir)
    curves = {opt: c for opt, c in curves.items() if c}
    if not curves:
        raise SystemExit("convergence: --adamw-lrs and --muon-lrs are both empty: give at least one lr")
    best = {opt: min(c, key=lambda lr: c[lr][-1][1]) for opt, c in curves.items()}
    adamw_steps = muon_steps = None
    if len(curves) == 2:  # both optimizers ran: how many steps each needs to reach the other's final loss
        adamw_steps = steps_to_reach(curves["adamw"][best["adamw"]], curves["muon"][best["muon"]][-1][1])
        muon_steps = steps_to_reach(curves["muon"][best["muon"]], curves["adamw"][best["adamw"]][-1][1])
    summary = {"preset": args.preset, "steps": args.steps, "best_lr": best,
               "final_val_loss": {o: curves[o][best[o]][-1][1] for o in curves},
               "adamw_steps_to_muon_final": adamw_steps,  # None: AdamW never got there within --steps
               "muon_steps_to_adamw_final": muon_steps,
               "steps_ratio_adamw_over_muon": (adamw_steps / args.steps) if adamw_steps
               else (args.steps / muon_steps if muon_steps else None),
               "curves": {o: {f"{lr:g}": c for lr, c in cs.items()} for o, cs in curves.items()}}
    (out / "convergence.json").write_text(json.dumps(summary, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        for lr, curve in curves.get(opt, {}).items():
            ax.plot(*zip(*curve), color=color, lw=2.5 if lr == best[opt] else 0.8,
                    alpha=1 if lr == best[opt] else 0.5, label=f"{opt} lr={lr:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{args.preset}: Muon vs AdamW, same tokens")
    ax.set_ylim(top=min(8, max(l for c in curves.values() for cv in c.values() for _, l in cv[1:])))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}))


if __name__ == "__main__":
    main()
