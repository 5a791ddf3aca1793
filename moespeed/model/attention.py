"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3) with a latent KV cache and absorbed decoding.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, n = qk_nope_head_dim,
p = qk_rope_head_dim, v = v_head_dim, r = kv_lora_rank.

    query:   x -> [wq_a -> RMSNorm -> wq_b | wq] -> (B, T, H, n + p)      (low-rank if q_lora_rank > 0)
    latent:  x -> wkv_a -> (B, T, r + p) = [c_kv | k_rope]; c_kv -> RMSNorm
    keys:    k_nope, v = wkv_b(c_kv) -> (B, T, H, n), (B, T, H, v);  k_rope: ONE (B, T, p) vector per
             token, shared by all heads (decoupled RoPE)
    scores:  (q_nope . k_nope + q_rope . k_rope) / sqrt(n + p)

Training and prefill use this expanded form through `scaled_dot_product_attention`.
The cache stores only c_kv (r) and k_rope (p) per token. Decoding absorbs wkv_b into the query and
output: with W_UK (H, n, r) and W_UV (H, v, r) the halves of wkv_b,
    q_nope . k_nope = q_nope . (W_UK c) = (W_UK_T q_nope) . c       -> scores against the latent
    out = W_UV (sum_s p_s c_s)                                      -> attend over the latent
so per-head keys and values are never expanded. QK-norm (optional) normalizes per-head queries and
the shared rope key; the nope keys are normalized through the latent's RMSNorm, which keeps the
absorption exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


class LatentKVCache:
    """Static, preallocated MLA cache for one layer: the normed KV latent and the roped shared key."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.latent = torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device)

    def write(self, start: int, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Store (B, T, r) latents and (B, T, p) rope keys at positions start..start+T-1."""
        end = start + latent.shape[1]
        self.latent[:, start:end] = latent
        self.rope_key[:, start:end] = rope_key

    def bytes_per_token(self) -> int:
        return (self.latent.shape[-1] * self.latent.element_size()
                + self.rope_key.shape[-1] * self.rope_key.element_size())


def causal_doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Dense (B, 1, T, T) boolean mask: causal and within the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]


class MLA(nn.Module):
    """Multi-head Latent Attention; see the module docstring for the math and shapes."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = 1.0 / math.sqrt(qk_dim)
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.d_model, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.d_model, bias=False)
        self.q_head_norm = nn.RMSNorm(qk_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_rope_norm = nn.RMSNorm(self.rope_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self._absorbed: tuple | None = None  # (key, W_UK_T, W_UV), refreshed when wkv_b changes

    # ------------------------------------------------------------------------------ projections
    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.wq_b(self.q_a_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)  # (B, T, H, n + p)
        if self.q_head_norm is not None:
            q = self.q_head_norm(q)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, T, r) normed latent and (B, T, p) roped shared key."""
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        if self.k_rope_norm is not None:
            k_rope = self.k_rope_norm(k_rope)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)[:, :, 0, :]  # (B, T, 1, p) -> (B, T, p)
        return latent, k_rope

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK_T (H, r, n) and W_UV (H, v, r), computed once and refreshed when wkv_b changes."""
        w = self.wkv_b.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._absorbed is None or self._absorbed[0] != key:
            w_heads = w.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk_t = w_heads[:, : self.nope_dim].transpose(1, 2).contiguous()  # (H, r, n)
            w_uv = w_heads[:, self.nope_dim:].contiguous()  # (H, v, r)
            self._absorbed = (key, w_uk_t, w_uv)
        return self._absorbed[1], self._absorbed[2]

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: torch.Tensor | None = None, cache: LatentKVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). cos/sin cover positions start_pos..start_pos+T-1."""
        q_nope, q_rope = self._query(x, cos, sin)
        latent, k_rope = self._latent(x, cos, sin)
        if cache is not None:
            cache.write(start_pos, latent, k_rope)
            if start_pos > 0:
                return self._absorbed_attention(q_nope, q_rope, cache, start_pos)
        return self._expanded_attention(q_nope, q_rope, latent, k_rope, doc_ids)

    def _expanded_attention(self, q_nope, q_rope, latent, k_rope, doc_ids):
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(latent).view(B, T, H, self.nope_dim + self.v_dim)  # (B, T, H, n + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, n + p)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, T, H, self.rope_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # (B, H, T, v)
        if doc_ids is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_doc_mask(doc_ids), scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.v_dim))  # (B, T, H * v) -> (B, T, D)

    def _absorbed_attention(self, q_nope, q_rope, cache: LatentKVCache, start_pos: int):
        B, T, H, _ = q_nope.shape
        S = start_pos + T
        w_uk_t, w_uv = self.absorbed_weights()
        latent, k_rope = cache.latent[:, :S], cache.rope_key[:, :S]  # (B, S, r), (B, S, p)
        q_latent = torch.einsum("bthn,hrn->bthr", q_nope, w_uk_t)  # (B, T, H, r)
        scores = (torch.einsum("bthr,bsr->bhts", q_latent, latent)
                  + torch.einsum("bthp,bsp->bhts", q_rope, k_rope)).float() * self.scale  # (B, H, T, S)
        query_pos = torch.arange(start_pos, S, device=scores.device)[:, None]
        visible = torch.arange(S, device=scores.device)[None, :] <= query_pos  # (T, S)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).type_as(latent)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latent)  # (B, T, H, r)
        out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv)  # (B, T, H, v)
        return self.wo(out.reshape(B, T, H * self.v_dim))
