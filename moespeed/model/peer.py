"""PEER: Parameter Efficient Expert Retrieval ("Mixture of A Million Experts", He 2024).

A PEER layer replaces a dense MLP with a pool of N tiny experts (a single hidden neuron each by
default). Per head, a token's query picks k experts by product-key retrieval, without scoring all N:

    q = norm(W_q x)                               # (B, T, heads, query_dim)
    q = [q1, q2]                                  # two sub-queries of query_dim / 2
    s1, i1 = topk(q1 . K1, k);  s2, i2 = topk(q2 . K2, k)     # K1, K2: sqrt(N) sub-keys each
    candidates: s1[a] + s2[b], expert i1[a] * sqrt(N) + i2[b]  # k * k of them
    scores, experts = topk(candidates, k);  g = softmax(scores)
    y = sum_heads sum_i g_i * act(down[e_i] . x) * up[e_i]

The top-k of s1[a] + s2[b] over all N pairs always lies among the k * k candidates, so this is
exact. Expert e with expert_hidden_size h > 1 owns h consecutive rows of the `down` and `up`
tables (row e * h + j is its neuron j); all h neurons share the expert's score, so the same
single-neuron kernel serves every h. The expert mix runs in `moespeed.kernels.peer_triton`
(fused Triton kernel on GPU, a gather + einsum reference on CPU). See docs/peer.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moespeed.errors import ConfigError
from moespeed.kernels.peer_triton import (
    ACTIVATIONS,
    peer_experts_reference,
    peer_experts_triton,
    triton_usable,
)
from moespeed.options import option

QUERY_NORMS = ("rmsnorm", "layernorm", "batchnorm")
KERNELS = ("auto", "triton", "reference")


@dataclass
class PEERConfig:
    """Config of a PEER layer; nested in the model config as `model.peer.<key>`."""

    num_experts: int = option(16384, "experts in the pool; must equal the product of product_key_dim")
    product_key_dim: list[int] = option([128, 128], "sub-keys per product-key dimension: [n, n] for n*n experts")
    num_experts_per_tok: int = option(16, "experts each head selects per token (also the per-dimension top-k)")
    num_heads: int = option(4, "retrieval heads; each has its own query and selects its own experts")
    expert_hidden_size: int = option(1, "hidden neurons per expert: 1 = single-neuron experts (paper)")
    query_dim: int = option(128, "query size per head, split into two sub-queries of query_dim/2")
    query_norm: str = option("rmsnorm", "norm on each head's query; batchnorm mixes tokens (not causal)",
                             choices=QUERY_NORMS)
    activation: str = option("relu2", "expert activation: relu2 = relu(x)^2, gelu", choices=ACTIVATIONS)
    shared_pool: bool = option(True, "heads share one expert pool and keys; False = a pool per head")
    kernel: str = option("auto", "expert mix: auto (triton on CUDA, else reference) | triton | reference",
                         choices=KERNELS)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key and how to fix it."""
        dims = list(self.product_key_dim)
        if len(dims) != 2:
            raise ConfigError(f"model.peer.product_key_dim = {dims}: must have exactly 2 entries [n, n] "
                              "(two sub-key sets; other arities are not supported)")
        if dims[0] != dims[1] or dims[0] < 1:
            raise ConfigError(f"model.peer.product_key_dim = {dims}: must be [n, n] with n >= 1 "
                              f"(both sub-key sets the same size), e.g. [{max(dims[0], 1)}, {max(dims[0], 1)}]")
        if self.num_experts != dims[0] * dims[1]:
            raise ConfigError(f"model.peer.num_experts = {self.num_experts}: must equal the product of "
                              f"model.peer.product_key_dim {dims} = {dims[0] * dims[1]}")
        if not 1 <= self.num_experts_per_tok <= dims[0]:
            raise ConfigError(f"model.peer.num_experts_per_tok = {self.num_experts_per_tok}: must be "
                              f"between 1 and the sub-key count {dims[0]} (model.peer.product_key_dim)")
        for key in ("num_heads", "expert_hidden_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.peer.{key} = {getattr(self, key)}: must be >= 1")
        if self.query_dim < 2 or self.query_dim % 2:
            raise ConfigError(f"model.peer.query_dim = {self.query_dim}: must be an even number >= 2 "
                              "(it is split into two sub-queries)")
        for key, allowed in (("query_norm", QUERY_NORMS), ("activation", ACTIVATIONS), ("kernel", KERNELS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.peer.{key} = {getattr(self, key)!r}: must be one of {', '.join(allowed)}")


def product_key_topk(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k experts by product keys, scoring 2 * n sub-keys and k * k candidates, never all n * n.

    q: (..., G, 2, dk) sub-queries, G = groups (heads); keys: (G or 1, 2, n, dk) sub-keys
    (one set shared by all groups when its first dim is 1).
    Returns scores (..., G, k) and expert ids (..., G, k) in [0, n * n), id = i1 * n + i2.
    """
    n = keys.shape[2]
    if keys.shape[0] == 1:
        sim = torch.einsum("...gcd,cnd->...gcn", q, keys[0])           # (..., G, 2, n)
    else:
        sim = torch.einsum("...gcd,gcnd->...gcn", q, keys)             # (..., G, 2, n)
    sub_scores, sub_ids = sim.topk(k, dim=-1)                          # (..., G, 2, k)
    cand = sub_scores[..., 0, :, None] + sub_scores[..., 1, None, :]   # (..., G, k, k)
    cand_ids = sub_ids[..., 0, :, None] * n + sub_ids[..., 1, None, :]  # (..., G, k, k)
    scores, pos = cand.flatten(-2).topk(k, dim=-1)                     # (..., G, k)
    ids = cand_ids.flatten(-2).gather(-1, pos)                         # (..., G, k)
    return scores, ids


class _QueryNorm(nn.Module):
    """Normalize each head's query: rmsnorm / layernorm over query_dim, or batchnorm per feature."""

    def __init__(self, kind: str, num_heads: int, query_dim: int):
        super().__init__()
        self.kind = kind
        if kind == "batchnorm":  # statistics over all tokens of the batch: see docs/peer.md
            self.norm = nn.BatchNorm1d(num_heads * query_dim)
        elif kind == "layernorm":
            self.norm = nn.LayerNorm(query_dim)
        else:
            self.norm = nn.RMSNorm(query_dim)

    def forward(self, q: Tensor) -> Tensor:
        B, T, H, dq = q.shape
        if self.kind == "batchnorm":
            return self.norm(q.reshape(B * T, H * dq)).view(B, T, H, dq)
        return self.norm(q)


class PEER(nn.Module):
    """PEER layer: x (B, T, D) -> y (B, T, D); drop-in for the MLP of a Transformer block.

    Parameters: `query` (D -> heads * query_dim), the query norm, `keys`
    (pools, 2, n, query_dim / 2), and the expert tables `down`, `up` (pools * N * h, D), where
    pools = 1 (shared_pool) or heads and h = expert_hidden_size. The tables are embedding-like
    (each step touches a few rows): optimize them like embeddings (AdamW, not Muon).
    """

    def __init__(self, d_model: int, cfg: PEERConfig, init_std: float = 0.02):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.d_model = d_model
        self.pools = 1 if cfg.shared_pool else cfg.num_heads
        n = cfg.product_key_dim[0]
        rows = self.pools * cfg.num_experts * cfg.expert_hidden_size
        self.query = nn.Linear(d_model, cfg.num_heads * cfg.query_dim, bias=False)
        self.query_norm = _QueryNorm(cfg.query_norm, cfg.num_heads, cfg.query_dim)
        self.keys = nn.Parameter(torch.empty(self.pools, 2, n, cfg.query_dim // 2))
        self.down = nn.Parameter(torch.empty(rows, d_model))
        self.up = nn.Parameter(torch.empty(rows, d_model))
        self.init_std = init_std
        for table in (self.down, self.up):
            table._muon_eligible = False  # embedding-like rows: AdamW without weight decay, never Muon
            table._no_weight_decay = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for the query projection, keys and both expert tables."""
        for p in (self.query.weight, self.keys, self.down, self.up):
            nn.init.normal_(p, std=self.init_std)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head expert choice: (weights (B, T, H, k) fp32 softmax, expert ids (B, T, H, k))."""
        B, T, _ = x.shape
        H, dq = self.cfg.num_heads, self.cfg.query_dim
        q = self.query(x).view(B, T, H, dq)                              # (B, T, H, dq)
        q = self.query_norm(q).view(B, T, H, 2, dq // 2)                 # (B, T, H, 2, dq/2)
        scores, ids = product_key_topk(q, self.keys.to(q.dtype), self.cfg.num_experts_per_tok)
        return scores.float().softmax(dim=-1), ids

    def table_rows(self, ids: Tensor) -> Tensor:
        """Expert ids (B, T, H, k) -> table rows (B, T, H, k * h) for the pool and hidden neurons."""
        h = self.cfg.expert_hidden_size
        if self.pools > 1:  # head j uses pool j: rows [j * N * h, (j + 1) * N * h)
            ids = ids + torch.arange(self.pools, device=ids.device).view(-1, 1) * self.cfg.num_experts
        rows = ids.unsqueeze(-1) * h + torch.arange(h, device=ids.device)  # (B, T, H, k, h)
        return rows.flatten(-2)                                          # (B, T, H, k * h)

    def use_triton(self, x: Tensor) -> bool:
        """Whether the fused kernel runs for this input (config `kernel` and the device)."""
        kernel = self.cfg.kernel
        if kernel == "reference":
            return False
        if kernel == "triton" and not triton_usable(x.device):
            raise ConfigError("model.peer.kernel = triton: needs triton and a CUDA device "
                              "(or TRITON_INTERPRET=1); use auto or reference")
        return triton_usable(x.device) and (kernel == "triton" or x.device.type == "cuda")

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        weights, ids = self.retrieve(x)                                  # (B, T, H, k) each
        rows = self.table_rows(ids).reshape(B * T, -1)                   # (B*T, P)
        hidden = self.cfg.expert_hidden_size
        w = weights.unsqueeze(-1).expand(*weights.shape, hidden).reshape(B * T, -1)  # (B*T, P)
        mix = peer_experts_triton if self.use_triton(x) else peer_experts_reference
        y = mix(x.reshape(B * T, D), rows, w, self.down, self.up, self.cfg.activation)
        return y.view(B, T, D)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={self.d_model}, experts={c.num_experts}x{self.pools} pool(s), heads={c.num_heads}, "
                f"k={c.num_experts_per_tok}, hidden={c.expert_hidden_size}, kernel={c.kernel}")


def peer_param_count(d_model: int, cfg: PEERConfig) -> dict[str, int]:
    """Parameter counts of a PEER layer: total and those touched per token (active)."""
    pools = 1 if cfg.shared_pool else cfg.num_heads
    n = cfg.product_key_dim[0]
    tables = 2 * pools * cfg.num_experts * cfg.expert_hidden_size * d_model
    retrieval = d_model * cfg.num_heads * cfg.query_dim + pools * 2 * n * (cfg.query_dim // 2)
    active = 2 * cfg.num_heads * cfg.num_experts_per_tok * cfg.expert_hidden_size * d_model
    return {"total": tables + retrieval, "tables": tables, "active_expert": active,
            "retrieval": retrieval}
