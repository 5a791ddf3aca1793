"""Parameter grouping and the optimizer: one place decides which parameter gets what.

AdamW with decoupled weight decay on hidden matrices only: norms, biases, embeddings, the head and
scalars get weight_decay = 0 (decaying them hurts and buys nothing). The grouping is printed at
start-up so it can be checked.
"""
from __future__ import annotations

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """True for parameters that must not be weight-decayed."""
    return param.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".bias") or name.startswith("head.")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in keep], "names": [n for n, _ in keep], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for a model and a one-paragraph summary of the grouping."""
    groups = param_groups(model, train_cfg.weight_decay)
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                            lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), fused=fused or None)
    summary = "\n".join(
        f"  AdamW wd={g['weight_decay']}: {len(g['params'])} tensors, "
        f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M params"
        for g in groups)
    return opt, "optimizer groups:\n" + summary
