"""Dense feed-forward blocks: ReLU² (default), GELU, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu2(x: torch.Tensor) -> torch.Tensor:
    """ReLU squared (Primer, So et al. 2021): relu(x)²."""
    return F.relu(x).square()


ACTIVATIONS = {"relu2": relu2, "gelu": F.gelu}


class MLP(nn.Module):
    """x -> down(act(up(x))); SwiGLU uses down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu2"):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.gate = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(ACTIVATIONS[self.activation](self.up(x)))
