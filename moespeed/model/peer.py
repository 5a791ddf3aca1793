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
single-neuron kernel serves every h. Retrieval and the expert mix run in
`moespeed.kernels.peer_triton` (fused Triton kernels on GPU, PyTorch references on CPU).

Expert-table gradients are either dense (R, D) tensors (`table_grad: dense`, any optimizer) or
deferred (`table_grad: deferred`): the backward keeps per-selection factors and
`PEERTableOptimizer` sums them per row and updates the selected rows in one fused pass, so no
gradient buffer of the tables' size ever exists. See docs/peer.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moespeed.errors import ConfigError
from moespeed.kernels.peer_triton import (
    ACTIVATIONS,
    TABLE_OPTIMIZERS,
    TableGradFactors,
    peer_experts_deferred_reference,
    peer_experts_reference,
    peer_experts_triton,
    peer_table_step,
    product_key_topk_reference,
    product_key_topk_triton,
    triton_usable,
)
from moespeed.options import option

QUERY_NORMS = ("rmsnorm", "layernorm", "batchnorm")
KERNELS = ("auto", "triton", "reference")
TABLE_GRADS = ("dense", "deferred")
MAX_PENDING_BACKWARDS = 64  # deferred factors of this many backwards without an optimizer step: an error


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
    kernel: str = option("auto", "retrieval + expert mix: auto (triton on CUDA, else reference) | triton | reference",
                         choices=KERNELS)
    table_grad: str = option("dense", "expert-table gradients: dense (R, D) grads for any optimizer | deferred "
                             "(per-selection factors applied by PEERTableOptimizer; no table-sized grads)",
                             choices=TABLE_GRADS)

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
        for key, allowed in (("query_norm", QUERY_NORMS), ("activation", ACTIVATIONS), ("kernel", KERNELS),
                             ("table_grad", TABLE_GRADS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.peer.{key} = {getattr(self, key)!r}: must be one of {', '.join(allowed)}")


product_key_topk = product_key_topk_reference  # the readable retrieval (scores in fp32)


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
    (each step touches a few rows): optimize them like embeddings (AdamW, not Muon), or, with
    table_grad = deferred, with `PEERTableOptimizer` (their `.grad` then stays None).
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
        # deferred table gradients: the factors, reachable from both tables for PEERTableOptimizer
        self.table_grad = TableGradFactors() if cfg.table_grad == "deferred" else None
        for role, table in (("down", self.down), ("up", self.up)):
            table._muon_eligible = False  # embedding-like rows: AdamW without weight decay, never Muon
            table._no_weight_decay = True
            if self.table_grad is not None:
                table._peer_table_grad = self.table_grad
                table._peer_table_role = role
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for the query projection, keys and both expert tables."""
        for p in (self.query.weight, self.keys, self.down, self.up):
            nn.init.normal_(p, std=self.init_std)

    def retrieve(self, x: Tensor, fused: bool = False) -> tuple[Tensor, Tensor]:
        """Per-head expert choice: (weights (B, T, H, k) fp32 softmax, expert ids (B, T, H, k)).

        fused: the Triton retrieval kernel, else the PyTorch reference (same result)."""
        B, T, _ = x.shape
        H, dq = self.cfg.num_heads, self.cfg.query_dim
        q = self.query(x).view(B, T, H, dq)                              # (B, T, H, dq)
        q = self.query_norm(q).view(B, T, H, 2, dq // 2)                 # (B, T, H, 2, dq/2)
        topk = product_key_topk_triton if fused else product_key_topk_reference
        scores, ids = topk(q, self.keys.to(q.dtype), self.cfg.num_experts_per_tok)
        return scores.softmax(dim=-1), ids                              # fp32 scores and weights

    def table_rows(self, ids: Tensor) -> Tensor:
        """Expert ids (B, T, H, k) -> table rows (B, T, H, k * h) for the pool and hidden neurons."""
        h = self.cfg.expert_hidden_size
        if self.pools > 1:  # head j uses pool j: rows [j * N * h, (j + 1) * N * h)
            ids = ids + torch.arange(self.pools, device=ids.device).view(-1, 1) * self.cfg.num_experts
        rows = ids.unsqueeze(-1) * h + torch.arange(h, device=ids.device)  # (B, T, H, k, h)
        return rows.flatten(-2)                                          # (B, T, H, k * h)

    def use_triton(self, x: Tensor) -> bool:
        """Whether the fused kernels run for this input (config `kernel` and the device)."""
        kernel = self.cfg.kernel
        if kernel == "reference":
            return False
        if kernel == "triton" and not triton_usable(x.device):
            raise ConfigError("model.peer.kernel = triton: needs triton and a CUDA device "
                              "(or TRITON_INTERPRET=1); use auto or reference")
        return triton_usable(x.device) and (kernel == "triton" or x.device.type == "cuda")

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        fused = self.use_triton(x)
        weights, ids = self.retrieve(x, fused)                           # (B, T, H, k) each
        rows = self.table_rows(ids).reshape(B * T, -1)                   # (B*T, P)
        hidden = self.cfg.expert_hidden_size
        w = weights.unsqueeze(-1).expand(*weights.shape, hidden).reshape(B * T, -1)  # (B*T, P)
        args = (x.reshape(B * T, D), rows, w, self.down, self.up, self.cfg.activation)
        if self.table_grad is None:
            y = (peer_experts_triton if fused else peer_experts_reference)(*args)
        else:
            if len(self.table_grad.parts) >= MAX_PENDING_BACKWARDS:
                raise RuntimeError(
                    f"model.peer.table_grad = deferred: {MAX_PENDING_BACKWARDS} backward passes were never "
                    "applied; step a moespeed.model.peer.PEERTableOptimizer over this layer's down/up "
                    "tables (or use model.peer.table_grad = dense)")
            y = (peer_experts_triton if fused else peer_experts_deferred_reference)(*args, self.table_grad)
        return y.view(B, T, D)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={self.d_model}, experts={c.num_experts}x{self.pools} pool(s), heads={c.num_heads}, "
                f"k={c.num_experts_per_tok}, hidden={c.expert_hidden_size}, kernel={c.kernel}, "
                f"table_grad={c.table_grad}")


class PEERTableOptimizer(torch.optim.Optimizer):
    """Row-wise optimizer of PEER expert tables with deferred gradients (table_grad = deferred).

    Give it both tables (`down` and `up`) of such layers. `step()` sums each selected row's
    gradient from the layer's `TableGradFactors` and updates that row, its fp32 moments and
    nothing else, in one fused pass (`peer_table_step`), then drops the factors:
    - algorithm "adamw": lazy AdamW (as torch.optim.SparseAdam, with decoupled weight decay):
      rows nobody selected keep their weights and moments; bias correction uses the step count.
    - algorithm "sgd": p -= lr * (g + decoupled weight decay).
    Gradient accumulation works (backwards add factors until the step). The tables' `.grad` stays
    None, so global gradient clipping does not see them, and there is no DDP all-reduce for them.
    Hyper-parameters may differ per table in lr and weight_decay only.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, algorithm: str = "adamw"):
        if algorithm not in TABLE_OPTIMIZERS:
            raise ValueError(f"algorithm = {algorithm!r}: must be one of {', '.join(TABLE_OPTIMIZERS)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      algorithm=algorithm))
        self._layers()  # validates the parameters

    def _layers(self) -> list[tuple[TableGradFactors, dict]]:
        """[(factors, {"down": (param, group), "up": (param, group)})] per PEER layer."""
        layers: dict[int, tuple[TableGradFactors, dict]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                factors = getattr(p, "_peer_table_grad", None)
                if factors is None:
                    raise ValueError("PEERTableOptimizer takes only the down/up tables of PEER layers "
                                     "with model.peer.table_grad = deferred")
                layers.setdefault(id(factors), (factors, {}))[1][p._peer_table_role] = (p, group)
        for _, tables in layers.values():
            if set(tables) != {"down", "up"}:
                raise ValueError("PEERTableOptimizer needs both the down and the up table of each PEER layer")
            (_, gd), (_, gu) = tables["down"], tables["up"]
            if any(gd[key] != gu[key] for key in ("betas", "eps", "algorithm")):
                raise ValueError("PEERTableOptimizer: a layer's down and up tables must share betas, eps "
                                 "and algorithm (lr and weight_decay may differ)")
        return list(layers.values())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for factors, tables in self._layers():
            if not factors.parts:
                continue
            (down, gd), (up, gu) = tables["down"], tables["up"]
            adam = gd["algorithm"] == "adamw"
            for p in (down, up):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if adam:
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
            sd, su = self.state[down], self.state[up]
            states = ({"exp_avg_down": sd["exp_avg"], "exp_avg_sq_down": sd["exp_avg_sq"],
                       "exp_avg_up": su["exp_avg"], "exp_avg_sq_up": su["exp_avg_sq"]} if adam else {})
            hp = {"algorithm": gd["algorithm"], "lr_down": gd["lr"], "lr_up": gu["lr"],
                  "wd_down": gd["weight_decay"], "wd_up": gu["weight_decay"], "beta1": gd["betas"][0],
                  "beta2": gd["betas"][1], "eps": gd["eps"], "step": sd["step"]}
            peer_table_step(factors, down, up, states, hp)
            factors.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop pending factors too (they are these tables' gradients)."""
        super().zero_grad(set_to_none=set_to_none)
        for factors, _ in self._layers():
            factors.clear()


def peer_param_count(d_model: int, cfg: PEERConfig) -> dict[str, int]:
    """Parameter counts of a PEER layer: total and those touched per token (active)."""
    pools = 1 if cfg.shared_pool else cfg.num_heads
    n = cfg.product_key_dim[0]
    tables = 2 * pools * cfg.num_experts * cfg.expert_hidden_size * d_model
    retrieval = d_model * cfg.num_heads * cfg.query_dim + pools * 2 * n * (cfg.query_dim // 2)
    active = 2 * cfg.num_heads * cfg.num_experts_per_tok * cfg.expert_hidden_size * d_model
    return {"total": tables + retrieval, "tables": tables, "active_expert": active,
            "retrieval": retrieval}
