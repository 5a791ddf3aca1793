"""Cross-entropy from hidden states and the head weight, without the full [N, V] logits.

Placeholder of the fused-loss issue: `chunked` recomputes each chunk's logits in backward
(activation checkpointing), so only one [chunk, V] block exists at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden, weight, targets, ignore_index, z_loss, softcap):
    logits = (hidden @ weight.t()).float()  # (chunk, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if z_loss:
        valid = targets != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, dim=-1).square() * valid).sum()
    return loss


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean",
                         z_loss=0.0, softcap=None, backend="auto", chunk_size=None):
    """Loss of hidden (N, D) @ weight (V, D)^T against targets (N,); mean over non-ignored tokens."""
    if backend == "reference":
        total = _chunk_loss(hidden, weight, targets, ignore_index, z_loss, softcap)
    else:
        chunk = chunk_size or max(1, min(hidden.shape[0], 2**28 // (4 * weight.shape[0])))
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            total = total + checkpoint(_chunk_loss, hidden[sl], weight, targets[sl], ignore_index,
                                       z_loss, softcap, use_reentrant=False)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
