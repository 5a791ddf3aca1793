"""Training metrics: metrics.jsonl, TensorBoard events (when installed), FLOPs/MFU and the loss PNG.

FLOPs per trained token (forward + backward = 3x forward, a matmul of m*n*k costs 2*m*n*k):
    6 * N_matmul  +  3 * n_layers * n_heads * (qk_head_dim + v_head_dim) * T
where N_matmul counts the weights of every matmul a token goes through (all Linear layers, the output
head, the top-k active routed experts and PEER rows; not the embedding lookup) and the second term is causal attention (QK^T and PV over T/2 keys on average).
MFU = achieved FLOP/s / the GPU's datasheet dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).
`StepTimer` splits each logged interval's step time into the optimizer's part and the rest.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                   "B200": 2250e12}


def matmul_params(model: nn.Module) -> int:
    """Weights each token multiplies with: every Linear, the tied head, and only the *active* share
    of routed MoE experts (top-k of E) and PEER tables (heads * k rows of each table)."""
    from ..model.moe import MoE
    from ..model.peer import PEER

    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    for m in model.modules():
        if isinstance(m, MoE):
            experts = sum(w.numel() for w in (m.w1, m.w2, m.w3) if w is not None)
            n += experts * m.cfg.num_experts_per_tok // m.cfg.n_routed_experts
        elif isinstance(m, PEER):
            n += 2 * m.cfg.num_heads * m.cfg.num_experts_per_tok * m.cfg.expert_hidden_size * m.d_model
    cfg = model.cfg
    return n + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    cfg = model.cfg
    attention = 3 * cfg.n_layers * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * seq_len
    return 6 * matmul_params(model) + attention


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 FLOP/s of a CUDA device, or None when unknown / on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class StepTimer:
    """How long the train steps of a log interval take, and the optimizer's share of them.

    Call `start()` when a step begins, `optimizer()` just before `optimizer.step()` and `stop()` when the
    step ends (after zero_grad and the MoE bias update, as `moespeed.bench.train_step` counts it); `read()`
    at a log step. On CUDA the marks are events on the current stream, so nothing waits for the GPU:
    read them only after the host has synced with the interval's last step (the logged loss's `.item()`
    does). Elsewhere they are host clock readings (CPU ops run synchronously).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[tuple] = []  # (start, optimizer start, end) marks of the steps not yet read
        self._marks: list = []  # the current step's marks so far

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def start(self) -> None:
        self._marks = [self._mark()]

    def optimizer(self) -> None:
        self._marks.append(self._mark())

    def stop(self) -> None:
        self.steps.append((*self._marks, self._mark()))

    def read(self) -> dict:
        """{"step_ms", "optimizer_ms"}: means over the steps since the last read, and "optimizer_share"
        (their ratio); empty if no step finished since."""
        if not self.steps:
            return {}
        if self.cuda:
            self.steps[-1][-1].synchronize()  # at once after the logged loss's .item(); elapsed_time needs it
        step_ms = sum(self._ms(s, e) for s, _, e in self.steps) / len(self.steps)
        optimizer_ms = sum(self._ms(o, e) for _, o, e in self.steps) / len(self.steps)
        self.steps = []
        return {"step_ms": step_ms, "optimizer_ms": optimizer_ms, "optimizer_share": optimizer_ms / max(step_ms, 1e-9)}


class MetricsLogger:
    """Appends one JSON object per line to run_dir/metrics.jsonl, mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                pass

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines written after the checkpoint's step (they will be redone)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def moe_metrics(model: nn.Module) -> tuple[dict, list[list[float]]]:
    """Scalars for metrics.jsonl from every MoE layer (and reset its counts), plus the load matrix
    (layer x expert share of routed tokens) for the heatmap. Empty when the model has no MoE."""
    record, loads = {}, []
    for i, moe in model.moe_layers():
        stats = moe.load_stats(reset=True)
        for key in ("max_over_mean", "aux_loss", "aux_balance"):
            if key in stats:
                record[f"moe/{i}/{key}"] = stats[key]
        if "expert_share" in stats:
            loads.append(stats["expert_share"])
    if loads:
        record["moe_max_over_mean"] = max(max(l) * len(l) for l in loads)
    return record, loads


def plot_expert_load(run_dir: Path, loads: list[list[float]], step: int) -> Path | None:
    """expert_load.png: share of routed tokens per expert (columns) for every MoE layer (rows)."""
    if not loads:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.15 * len(loads[0])), 1.5 + 0.35 * len(loads)))
    image = ax.imshow([[v * len(row) for v in row] for row in loads], aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load / mean at step {step}")
    fig.colorbar(image, ax=ax)
    out = Path(run_dir) / "expert_load.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def plot_loss_curve(run_dir: Path) -> Path | None:
    """loss_curve.png: train and val loss against tokens seen."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
