"""The moespeed Transformer: token embedding -> pre-RMSNorm blocks of attention + FFN -> RMSNorm -> head.

Attention is MLA or an MHA/GQA/MQA baseline (`model.attention`), each layer with its own sliding
window (`model.window_pattern`). Every forward builds one `AttentionContext` (positions, RoPE angles,
masks built once per distinct window and shared by the layers that have it).

Init (documented, GPT-2 style): every Linear and the embedding ~ N(0, init_std); the two residual
output projections of each block (attention `wo`, MLP `down`) ~ N(0, init_std / sqrt(2 * n_layers))
so the residual stream's variance does not grow with depth; RMSNorm weights start at 1.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.linear_ce import linear_cross_entropy, memory_settings
from .attention import AttentionContext, KVCache, LatentKVCache, build_attention, gqa_param_count
from .masks import alibi_slopes
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
    """x + attn(norm(x)), then + ffn(norm(x)); returns the new x and the FFN's auxiliary loss.

    With recompute=True (activation checkpointing) the attention sublayer, and a dense FFN, are
    recomputed in backward; sparse FFNs are not (their forward counts expert loads).
    """

    def __init__(self, cfg, ffn_kind: str = "dense", window_slot: int | None = None):
        super().__init__()
        self.ffn_kind = ffn_kind
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = build_attention(cfg, window_slot)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = build_ffn(cfg, ffn_kind)

    def _attention(self, x, ctx, cache=None):
        return self.attn(self.attn_norm(x), ctx, cache)

    def _ffn(self, x):
        return self.mlp(self.mlp_norm(x))

    def forward(self, x, ctx: AttentionContext, cache=None, recompute: bool = False):
        if recompute:
            x = x + checkpoint(self._attention, x, ctx, use_reentrant=False)
        else:
            x = x + self._attention(x, ctx, cache)
        out = checkpoint(self._ffn, x, use_reentrant=False) if recompute and self.ffn_kind == "dense" else self._ffn(x)
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
        self.windows = sorted({w for w in cfg.layer_windows() if w > 0})  # distinct sliding windows
        slots = [self.windows.index(w) if w > 0 else None for w in cfg.layer_windows()]
        self.blocks = nn.ModuleList(Block(cfg, kind, slot) for kind, slot in zip(cfg.ffn_kinds(), slots))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.rope_dim(), cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # current size of each distinct window (a tensor: growing it never recompiles); see set_train_step
        self.register_buffer("window_sizes", torch.tensor(self.windows, dtype=torch.long), persistent=False)
        slopes = alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.reset_parameters()

    def set_train_step(self, step: int) -> None:
        """Window warmup (model.window_warmup_steps > 0): each sliding window grows linearly from
        window_warmup_start to its configured size over the first window_warmup_steps steps.

        The trainer calls this before every step (and after resuming); a freshly built model uses the
        full windows. Full-causal layers (window 0) are not affected.
        """
        c = self.cfg
        frac = 1.0 if c.window_warmup_steps == 0 else min(1.0, max(0, step) / c.window_warmup_steps)
        sizes = [min(w, round(c.window_warmup_start + (w - c.window_warmup_start) * frac)) for w in self.windows]
        self.window_sizes.copy_(torch.tensor(sizes, dtype=torch.long))

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
                      caches: list | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, D).

        With caches: the tokens sit at positions start_pos.. and attend to what the caches hold. An int
        start_pos reads the cache up to the last new token; a 0-d long tensor reads the whole cache
        under a position mask (fixed shapes: a decode step that CUDA graphs can capture).
        """
        return self._hidden_and_aux(tokens, doc_ids, caches, start_pos)[0]

    def attention_context(self, T: int, device: torch.device, doc_ids: torch.Tensor | None = None,
                          start_pos: int | torch.Tensor = 0) -> AttentionContext:
        """Positions, RoPE angles and mask settings shared by all layers in one forward."""
        if isinstance(start_pos, int):
            if start_pos + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start_pos + T} tokens exceeds model.max_seq_len = {self.cfg.max_seq_len}")
            positions = torch.arange(start_pos, start_pos + T, device=device)
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        else:
            positions = start_pos + torch.arange(T, device=device)  # (T,)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        return AttentionContext(positions, cos, sin, start_pos=start_pos, doc_ids=doc_ids,
                                windows=self.window_sizes if self.windows else None,
                                alibi_slopes=self.alibi_slopes, backend=self.cfg.attn_backend,
                                decode_kernel=self.cfg.decode_kernel, flex_kernel=self.cfg.flex_kernel)

    def _hidden_and_aux(self, tokens, doc_ids=None, caches=None, start_pos=0):
        """(hidden states (B, T, D), summed auxiliary loss of the sparse FFNs or None)."""
        ctx = self.attention_context(tokens.shape[1], tokens.device, doc_ids, start_pos)
        if caches is None:
            ctx.prebuild_block_masks({block.attn.window_slot for block in self.blocks}, tokens.shape[1], tokens.device)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled() and caches is None
        x = self.embed(tokens)
        aux_total = None
        for i, block in enumerate(self.blocks):
            x, aux = block(x, ctx, caches[i] if caches is not None else None, recompute)
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
        chunk_size, accum_dtype = memory_settings(self.cfg.loss_memory, B * T, D, self.head_weight.shape[0],
                                                  h.element_size())
        loss = linear_cross_entropy(h.reshape(B * T, D), self.head_weight, targets.reshape(B * T),
                                    ignore_index=ignore_index, backend=self.cfg.loss_backend,
                                    chunk_size=chunk_size, accum_dtype=accum_dtype, overlap=self.cfg.loss_overlap)
        if aux is not None:
            loss = loss + aux
        return (loss, self.logits(h)) if return_logits else loss

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.head_weight.t()).float()

    # ----------------------------------------------------------------------------- generation
    def new_cache(self, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> list[LatentKVCache] | list[KVCache]:
        """One preallocated cache per layer (MLA: latent + rope key; baselines: K and V), max_len positions."""
        c = self.cfg
        max_len = max_len or c.max_seq_len
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        if c.attention == "mla":
            return [LatentKVCache(batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, dtype, device)
                    for _ in self.blocks]
        return [KVCache(batch, max_len, c.kv_heads(), c.attn_head_dim(), dtype, device) for _ in self.blocks]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """Cache bytes per token: this model's, and the MHA-equivalent (full K and V of every head)."""
        c, size = self.cfg, torch.tensor([], dtype=dtype).element_size()
        if c.attention == "mla":
            per_layer = (c.kv_lora_rank + c.qk_rope_head_dim) * size
            mha_per_layer = c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * size
        else:
            per_layer = 2 * c.kv_heads() * c.attn_head_dim() * size
            mha_per_layer = 2 * c.n_heads * c.attn_head_dim() * size
        return {"per_layer": per_layer, "total": per_layer * c.n_layers,
                "mha_per_layer": mha_per_layer, "mha_total": mha_per_layer * c.n_layers}

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
        """Yield (B,) sampled tokens one step at a time, continuing prompts tokens (B, T0).

        compile: decode with one static step (`moespeed.generate.make_step`): compiled, and on CUDA
        captured in a CUDA graph; the prompt is still read by the eager prefill. Same tokens."""
        from ..generate import make_step, sample_next

        B, T0 = tokens.shape
        n_new = min(max_new_tokens, self.cfg.max_seq_len - T0 + 1)  # the last token is never fed back
        caches = self.new_cache(B, max(T0, T0 + n_new - 1))
        logits = self.logits(self.hidden_states(tokens, caches=caches, start_pos=0)[:, -1])  # (B, V)
        step = token_buf = pos_buf = None
        for i in range(n_new):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield next_token
            if i + 1 == n_new:
                break
            if not compile:
                logits = self.logits(self.hidden_states(next_token[:, None], caches=caches, start_pos=T0 + i)[:, -1])
                continue
            if step is None:  # static buffers: the step reads them by address
                token_buf = next_token[:, None].clone()  # (B, 1)
                pos_buf = torch.tensor(T0 + i, device=tokens.device)
                step = make_step(self, caches, token_buf, pos_buf, "compile_graph" if tokens.is_cuda else "compile")
            token_buf.copy_(next_token[:, None])
            pos_buf.fill_(T0 + i)
            logits = step()


def attention_param_count(cfg) -> int:
    """Parameters of one attention layer of any `model.attention` type."""
    return mla_param_count(cfg) if cfg.attention == "mla" else gqa_param_count(cfg)


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
