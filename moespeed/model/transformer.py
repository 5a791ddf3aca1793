"""The moespeed Transformer: token embedding -> pre-RMSNorm blocks of MLA + MLP -> RMSNorm -> head.

Init (documented, GPT-2 style): every Linear and the embedding ~ N(0, init_std); the two residual
output projections of each block (attention `wo`, MLP `down`) ~ N(0, init_std / sqrt(2 * n_layers))
so the residual stream's variance does not grow with depth; RMSNorm weights start at 1.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ..kernels.linear_ce import linear_cross_entropy
from .attention import MLA, LatentKVCache
from .mlp import MLP
from .moe import MoE
from .peer import PEER
from .rope import rope_tables


def build_ffn(cfg, kind: str) -> nn.Module:
    """The FFN of one block: the dense MLP, a DeepSeekMoE layer or a PEER layer."""
    if kind == "peer":
        return PEER(cfg.d_model, cfg.peer, cfg.init_std)
    if kind == "moe":
        return MoE(cfg.d_model, cfg.moe, cfg.init_std)
    return MLP(cfg.d_model, cfg.d_ff, cfg.mlp_activation)


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)); returns the new x and the FFN's auxiliary loss."""

    def __init__(self, cfg, ffn_kind: str = "dense"):
        super().__init__()
        self.ffn_kind = ffn_kind
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = MLA(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = build_ffn(cfg, ffn_kind)

    def forward(self, x, cos, sin, doc_ids=None, cache=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache, start_pos)
        out = self.mlp(self.mlp_norm(x))
        y, aux = out if isinstance(out, tuple) else (out, None)  # MoE returns (y, aux_loss)
        return x + y, aux


class Transformer(nn.Module):
    """Decoder-only language model; `forward` returns the loss, logits, or both."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (> 0) before building a Transformer")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.ffn_kinds())
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("attn.wo", "mlp.down"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:  # sparse FFNs own their init
            if block.ffn_kind != "dense":
                block.mlp.reset_parameters()

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE module) of every MoE block."""
        return [(i, b.mlp) for i, b in enumerate(self.blocks) if b.ffn_kind == "moe"]

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, D) output projection (the embedding when tied)."""
        return self.embed.weight if self.head is None else self.head.weight

    def hidden_states(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      caches: list[LatentKVCache] | None = None, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, D)."""
        return self._hidden_and_aux(tokens, doc_ids, caches, start_pos)[0]

    def _hidden_and_aux(self, tokens, doc_ids=None, caches=None, start_pos=0):
        """(hidden states (B, T, D), summed auxiliary loss of the sparse FFNs or None)."""
        T = tokens.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.embed(tokens)
        aux_total = None
        for i, block in enumerate(self.blocks):
            x, aux = block(x, cos, sin, doc_ids, caches[i] if caches is not None else None, start_pos)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(x), aux_total

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, return_logits: bool = False,
                ignore_index: int = -100):
        """tokens (B, T) [, targets (B, T), doc_ids (B, T)].

        With targets: the mean cross-entropy (chunked: full logits never exist) plus the sparse FFNs'
        auxiliary losses, or (loss, logits) when return_logits. Without targets: logits (B, T, V).
        """
        h, aux = self._hidden_and_aux(tokens, doc_ids)
        if targets is None:
            return self.logits(h)
        B, T, D = h.shape
        loss = linear_cross_entropy(h.reshape(B * T, D), self.head_weight, targets.reshape(B * T),
                                    ignore_index=ignore_index, backend=self.cfg.loss_backend)
        if aux is not None:
            loss = loss + aux
        return (loss, self.logits(h)) if return_logits else loss

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.head_weight.t()).float()

    # ----------------------------------------------------------------------------- generation
    def new_cache(self, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> list[LatentKVCache]:
        """One preallocated latent cache per layer, for up to max_len positions."""
        max_len = max_len or self.cfg.max_seq_len
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        return [LatentKVCache(batch, max_len, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim, dtype, device)
                for _ in self.blocks]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """Cache bytes per token: MLA's latent + rope key, and the MHA-equivalent (full K and V)."""
        c, size = self.cfg, torch.tensor([], dtype=dtype).element_size()
        per_layer = (c.kv_lora_rank + c.qk_rope_head_dim) * size
        mha_per_layer = c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * size
        return {"per_layer": per_layer, "total": per_layer * c.n_layers,
                "mha_per_layer": mha_per_layer, "mha_total": mha_per_layer * c.n_layers}

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield (B,) sampled tokens one step at a time, continuing prompts tokens (B, T0)."""
        from ..generate import sample_next

        B, T0 = tokens.shape
        n_new = min(max_new_tokens, self.cfg.max_seq_len - T0 + 1)  # the last token is never fed back
        caches = self.new_cache(B, max(T0, T0 + n_new - 1))
        h = self.hidden_states(tokens, caches=caches, start_pos=0)
        for i in range(n_new):
            next_token = sample_next(self.logits(h[:, -1]), temperature, top_k, top_p, generator)  # (B,)
            yield next_token
            if i + 1 < n_new:
                h = self.hidden_states(next_token[:, None], caches=caches, start_pos=T0 + i)


def mla_param_count(cfg) -> int:
    """Parameters of one MLA layer from its config (the formula the tests check)."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank > 0:
        q = cfg.d_model * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * qk
    else:
        q = cfg.d_model * cfg.n_heads * qk
    kv = (cfg.d_model * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    out = cfg.n_heads * cfg.v_head_dim * cfg.d_model
    qk_norm = qk + cfg.qk_rope_head_dim if cfg.qk_norm else 0
    return q + kv + out + qk_norm
