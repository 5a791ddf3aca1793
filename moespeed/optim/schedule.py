"""Learning-rate schedules: linear warmup, then cosine or warmup-stable-decay (WSD)."""
from __future__ import annotations

import math


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based) of a TrainConfig."""
    return cfg.lr * lr_factor(step, cfg)


def lr_factor(step: int, cfg) -> float:
    """The schedule's multiplier in [min_lr_ratio, 1] of every group's peak lr at step `step`."""
    peak, floor = 1.0, cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))  # wsd
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / decay_steps)
    return peak + (floor - peak) * progress
