"""Attention: Multi-head Latent Attention (MLA) and the MHA/GQA/MQA baselines behind one interface.

Every attention module is called as `attn(x, ctx, cache=None)` with x (B, T, D), where `ctx` is the
`AttentionContext` the Transformer builds once per forward (positions, RoPE angles, masks), and
returns (B, T, D). Training and prefill go through `ctx.attend` (FlexAttention or SDPA); decoding
with a cache goes through `ctx.attend_cached`, where the query heads that share one key/value head
are folded into the query rows (B, Hkv, T*G, d), computed by `kernels.decode_attention`: a fused
Triton flash-decoding kernel on CUDA (`model.decode_kernel`), batched matmuls otherwise.

MLA (DeepSeek-V2/V3). Shapes: H heads, n = qk_nope_head_dim, p = qk_rope_head_dim, v = v_head_dim,
r = kv_lora_rank.
    query:   x -> [wq_a -> RMSNorm -> wq_b | wq] -> (B, T, H, n + p)      (low-rank if q_lora_rank > 0)
    latent:  x -> wkv_a -> (B, T, r + p) = [c_kv | k_rope]; c_kv -> RMSNorm
    keys:    k_nope, v = wkv_b(c_kv) -> (B, T, H, n), (B, T, H, v);  k_rope: ONE (B, T, p) vector per
             token, shared by all heads (decoupled RoPE)
    scores:  (q_nope . k_nope + q_rope . k_rope) / sqrt(n + p)
Training and prefill use this expanded form. The cache stores only c_kv (r) and k_rope (p) per token.
Decoding absorbs wkv_b into the query and output: with W_UK (H, n, r) and W_UV (H, v, r) its halves,
    q_nope . k_nope = q_nope . (W_UK c) = (W_UK^T q_nope) . c       -> scores against the latent
    out = W_UV (sum_s p_s c_s)                                      -> attend over the latent
so decoding is multi-query attention in latent space: all H heads share the one cached (r + p)
"key" [c | k_rope] and (r) "value" c. QK-norm (optional) normalizes per-head queries and the shared
rope key; the nope keys are normalized through the latent's RMSNorm, which keeps the absorption exact.
With position = alibi or nope, MLA keeps its p shared-key dims but does not rotate them (a shared,
position-free key channel); the cache and parameter count are unchanged.

Baselines (`GQA`): wq, wk, wv, wo with n_heads query heads and n_kv_heads key/value heads of
head_dim (MHA: n_kv_heads = n_heads; MQA: 1); RoPE rotates the whole head. Their cache (`KVCache`)
holds K and V, (B, n_kv_heads, max_len, head_dim) each.

Caches are static and preallocated; writes go to absolute positions (index_put_). With a tensor
start position the attention reads the whole cache under a position mask, so a decode step has fixed
shapes and can be captured in a CUDA graph (`torch.compile(mode="reduce-overhead")`).
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from ..errors import ConfigError
from ..kernels.decode_attention import decode_attention
from . import masks
from .rope import apply_rope


# ------------------------------------------------------------------------------------------ caches
class LatentKVCache:
    """Static, preallocated MLA cache for one layer: the normed KV latent and the roped shared key.

    One buffer `kv` (B, max_len, r + p) = [latent | rope_key], so the absorbed decode reads each
    cached token's r + p values with one matmul; `latent` and `rope_key` are views of it.
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.kv = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.latent = self.kv[..., :kv_lora_rank]  # (B, L, r)
        self.rope_key = self.kv[..., kv_lora_rank:]  # (B, L, p)
        self.max_len = max_len

    def write(self, positions: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Store (B, T, r) latents and (B, T, p) rope keys at positions (T,)."""
        self.kv[:, positions] = torch.cat([latent, rope_key], dim=-1).to(self.kv.dtype)

    def bytes_per_token(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()


class KVCache:
    """Static, preallocated K and V cache of one MHA/GQA/MQA layer: (B, Hkv, max_len, head_dim) each."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, Hkv, T, head_dim) at positions (T,)."""
        self.k[:, :, positions] = k.to(self.k.dtype)
        self.v[:, :, positions] = v.to(self.v.dtype)

    def bytes_per_token(self) -> int:
        return 2 * self.k.shape[1] * self.k.shape[-1] * self.k.element_size()


# ------------------------------------------------------------------------------------ the context
# Triton kernel options of FlexAttention on CUDA (torch's FlexKernelOptions: block sizes, warps,
# stages, USE_TMA, ...). Empty: torch's defaults. `python -m moespeed.bench.attention --flex-sweep`
# measures alternatives. Every mask built here keeps the diagonal, so no query row is fully masked
# and ROWS_GUARANTEED_SAFE always holds.
FLEX_KERNEL_OPTIONS: dict = {}
FLEX_COMPILE_MODE: str | None = None  # torch.compile mode of flex_attention, e.g. "max-autotune-no-cudagraphs"
FLEX_MIN_HEAD_DIM = 16  # torch's GPU FlexAttention kernel refuses smaller qk or v head dims


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (uncompiled, it materializes the scores)."""
    return torch.compile(flex_attention, mode=FLEX_COMPILE_MODE)


def flex_kernel_options(kernel: str, cuda: bool) -> dict | None:
    """Flex's kernel_options for `model.flex_kernel` (plus FLEX_KERNEL_OPTIONS); None off CUDA."""
    if not cuda:
        return None
    options = dict(FLEX_KERNEL_OPTIONS)
    if kernel == "flash":
        options["BACKEND"] = "FLASH"
    return options or None


def flash_kernels_available() -> bool:
    """Whether FlashAttention-4's CuTe kernels (Flex's BACKEND=FLASH) can be imported here."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # no flash_attn package at all
        return False


def run_flex(q, k, v, block_mask, score_mod=None, scale=None, kernel: str = "triton"):
    """FlexAttention: compiled on CUDA; eager on CPU (forward only: torch has no CPU flex backward).
    kernel: `model.flex_kernel` (triton, or flash = FlashAttention-4's CuTe kernels)."""
    gqa = q.shape[1] != k.shape[1]
    eager = q.device.type == "cpu" or torch.compiler.is_compiling()  # inside torch.compile: traced
    fn = flex_attention if eager else _compiled_flex()
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
              kernel_options=flex_kernel_options(kernel, q.is_cuda))


class AttentionContext:
    """What every layer shares in one forward: positions, RoPE angles, the backend and its masks.

    `start_pos` is an int (prefill at 0, or incremental decoding), or a 0-d long tensor for static
    decoding over the whole cache. Masks are built lazily, once per window slot, and shared by all
    layers of that slot; `windows` (n_slots,) holds each slot's current window size.
    """

    def __init__(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 start_pos: int | torch.Tensor = 0, doc_ids: torch.Tensor | None = None,
                 windows: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                 backend: str = "auto", decode_kernel: str = "auto", flex_kernel: str = "triton"):
        self.positions = positions  # (T,) absolute positions of the new tokens
        self.cos, self.sin = cos, sin  # (T, rope_dim / 2)
        self.start_pos, self.doc_ids, self.windows = start_pos, doc_ids, windows
        self.alibi_slopes, self.backend, self.decode_kernel = alibi_slopes, backend, decode_kernel
        self.flex_kernel = flex_kernel
        self._built: dict = {}

    @property
    def decoding(self) -> bool:
        """True when the new tokens attend to a cache (not a fresh sequence)."""
        return not isinstance(self.start_pos, int) or self.start_pos > 0

    def kv_len(self, cache_len: int) -> int:
        """Cached positions the new tokens read: up to the last new token, or all with a tensor start."""
        return self.start_pos + len(self.positions) if isinstance(self.start_pos, int) else cache_len

    def window(self, slot: int | None) -> torch.Tensor | None:
        return None if slot is None else self.windows[slot]

    def _once(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def plain_causal(self, slot: int | None) -> bool:
        """True when a layer of this slot needs no mask beyond causal (no documents, window, ALiBi)."""
        return self.doc_ids is None and slot is None and self.alibi_slopes is None

    def kernel(self, slot: int | None, device: torch.device) -> str:
        """flex or sdpa for `attend` in a layer of this window slot (auto: flex on CUDA where a mask is needed)."""
        if self.backend == "flex" or (self.backend == "auto" and device.type == "cuda" and not self.plain_causal(slot)):
            return "flex"
        return "sdpa"

    def _block_mask(self, slot: int | None, T: int, device: torch.device):
        """The slot's Flex block mask, built on first use; on CUDA outside torch.compile (`_eager_block_mask`)."""
        build = _eager_block_mask if device.type == "cuda" else masks.block_mask  # CPU: traced, fullgraph
        return self._once(("block", slot), lambda: build(self.doc_ids, self.window(slot), T, device))

    def prebuild_block_masks(self, slots, T: int, device: torch.device) -> None:
        """Build the Flex block masks of these window slots now. Called first thing in a forward, so that
        in a compiled model the graph break of `_eager_block_mask` falls before all the model's work."""
        for slot in slots:
            if self.kernel(slot, device) == "flex":
                self._block_mask(slot, T, device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: int | None,
               scale: float) -> torch.Tensor:
        """Causal attention within documents and the slot's window over one fresh sequence.

        q (B, Hq, T, dk), k (B, Hkv, T, dk), v (B, Hkv, T, dv) -> (B, Hq, T, dv); Hkv divides Hq.
        """
        T = q.shape[2]
        if self.kernel(slot, q.device) == "flex":
            _check_flex_dims(q, v)
            block = self._block_mask(slot, T, q.device)
            score_mod = (self._once("alibi", lambda: masks.alibi_score_mod(self.alibi_slopes))
                         if self.alibi_slopes is not None else None)
            return run_flex(q, k, v, block, score_mod, scale, self.flex_kernel)
        gqa = q.shape[1] != k.shape[1]
        if self.plain_causal(slot):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        mask = self._once(("dense", slot, q.dtype), lambda: self._dense_mask(slot, T, q.device, q.dtype))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    def _dense_mask(self, slot, T, device, dtype) -> torch.Tensor:
        """(B|1, 1|H, T, T): bool, or the ALiBi bias (in q's dtype) with -inf where masked."""
        keep = masks.dense_mask(self.doc_ids, self.window(slot), T, device)  # (B|1, 1, T, T)
        if self.alibi_slopes is None:
            return keep
        bias = masks.alibi_bias(self.alibi_slopes, self.positions, T)[None]  # (1, H, T, T)
        return bias.masked_fill(~keep, float("-inf")).to(dtype)

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, slot: int | None,
                      scale: float, v_dim: int = 0) -> torch.Tensor:
        """New queries against cached keys/values (positions 0..S-1; one document).

        q (B, Hkv, T*G, dk): the G query heads of each key/value head folded into the rows, ordered
        (token, head); k (B, Hkv, S, dk), v (B, Hkv, S, dv) or None: the values are k[..., :v_dim].
        Returns (B, Hkv, T*G, dv).
        """
        return decode_attention(q, k, v, self.positions, scale, self.window(slot), self.alibi_slopes,
                                v_dim, self.decode_kernel)


@torch.compiler.disable
def _eager_block_mask(doc_ids, window, seq_len: int, device: torch.device):
    """masks.block_mask built outside torch.compile (a graph break in a compiled model); used on CUDA.

    Traced into the graph of a whole compiled model together with the Flex call, a document mask
    gave the right loss but wrong gradients (torch 2.11, H100: off by 10^2 to 10^8 in the lower
    layers); built eagerly, the gradients equal the eager model's. tests/test_model.py checks this on GPUs.
    """
    return masks.block_mask(doc_ids, window, seq_len, device)


def _check_flex_dims(q: torch.Tensor, v: torch.Tensor) -> None:
    """One clear line instead of Inductor's lowering error for head dims the GPU Flex kernel refuses."""
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < FLEX_MIN_HEAD_DIM:
        raise ConfigError(
            f"attention head dims qk {q.shape[-1]} / v {v.shape[-1]} are below {FLEX_MIN_HEAD_DIM}, the least "
            "FlexAttention's GPU kernel takes (it runs document masks and windows): raise model.qk_nope_head_dim, "
            "model.qk_rope_head_dim and model.v_head_dim (MLA) or model.head_dim, or set model.attn_backend = sdpa "
            "(dense masks, short sequences only)")


# ---------------------------------------------------------------------------------------- modules
class MLA(nn.Module):
    """Multi-head Latent Attention; see the module docstring for the math and shapes."""

    def __init__(self, cfg, window_slot: int | None = None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.window_slot = window_slot
        self.rotate = cfg.position == "rope"
        self.absorb = True  # decode with absorbed weights; False = expand the cached latent (naive, benchmarks)
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
    def _rope(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return apply_rope(x, ctx.cos, ctx.sin) if self.rotate else x

    def _query(self, x: torch.Tensor, ctx: AttentionContext):
        B, T, _ = x.shape
        q = self.wq_b(self.q_a_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)  # (B, T, H, n + p)
        if self.q_head_norm is not None:
            q = self.q_head_norm(q)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self._rope(q_rope, ctx)

    def _latent(self, x: torch.Tensor, ctx: AttentionContext):
        """(B, T, r) normed latent and (B, T, p) roped shared key."""
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        if self.k_rope_norm is not None:
            k_rope = self.k_rope_norm(k_rope)
        k_rope = self._rope(k_rope[:, :, None, :], ctx)[:, :, 0, :]  # (B, T, 1, p) -> (B, T, p)
        return latent, k_rope

    def _absorbed_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, n, r) and W_UV (H, v, r) as views of wkv_b's weight (no copy, always current)."""
        w_heads = self.wkv_b.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w_heads[:, : self.nope_dim], w_heads[:, self.nope_dim:]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK_T (H, r, n) and W_UV (H, v, r) as contiguous copies, refreshed when wkv_b changes."""
        w = self.wkv_b.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._absorbed is None or self._absorbed[0] != key:
            w_uk, w_uv = self._absorbed_views()
            self._absorbed = (key, w_uk.transpose(1, 2).contiguous(), w_uv.contiguous())
        return self._absorbed[1], self._absorbed[2]

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LatentKVCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        q_nope, q_rope = self._query(x, ctx)
        latent, k_rope = self._latent(x, ctx)
        if cache is not None:
            cache.write(ctx.positions, latent, k_rope)
            if ctx.decoding:
                decode = self._absorbed_attention if self.absorb else self._expanded_decode
                return decode(q_nope, q_rope, cache, ctx)
        return self._expanded_attention(q_nope, q_rope, latent, k_rope, ctx)

    def _expand(self, latent: torch.Tensor, k_rope: torch.Tensor):
        """Per-head keys (B, H, S, n + p) and values (B, H, S, v) from latents (B, S, r), rope keys (B, S, p)."""
        B, S, _ = latent.shape
        kv = self.wkv_b(latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim)  # (B, S, H, n + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope[:, :, None, :].expand(B, S, self.n_heads, self.rope_dim)  # (B, S, H, p)
        return torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2), v.transpose(1, 2)

    def _expanded_attention(self, q_nope, q_rope, latent, k_rope, ctx: AttentionContext):
        B, T, H, _ = q_nope.shape
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, n + p)
        k, v = self._expand(latent, k_rope)
        out = ctx.attend(q, k, v, self.window_slot, self.scale)  # (B, H, T, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.v_dim))  # (B, T, H * v) -> (B, T, D)

    def _expanded_decode(self, q_nope, q_rope, cache: LatentKVCache, ctx: AttentionContext):
        """The naive cached path: re-expand every cached latent to per-head keys and values."""
        B, T, H, _ = q_nope.shape
        S = ctx.kv_len(cache.max_len)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, n + p): G = 1
        k, v = self._expand(cache.latent[:, :S], cache.rope_key[:, :S])
        out = ctx.attend_cached(q, k, v, self.window_slot, self.scale)  # (B, H, T, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _absorbed_attention(self, q_nope, q_rope, cache: LatentKVCache, ctx: AttentionContext):
        B, T, H, _ = q_nope.shape
        S = ctx.kv_len(cache.max_len)
        w_uk, w_uv = self._absorbed_views()  # (H, n, r), (H, v, r)
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)  # (B, T, H, r)
        q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)  # (B, T, H, r + p)
        q = q.reshape(B, 1, T * H, self.kv_lora_rank + self.rope_dim)  # all heads share one latent "kv head"
        kv = cache.kv[:, None, :S]  # (B, 1, S, r + p)
        out_latent = ctx.attend_cached(q, kv, None, self.window_slot, self.scale, v_dim=self.kv_lora_rank)
        out_latent = out_latent.view(B, T, H, self.kv_lora_rank)  # (B, 1, T*H, r) -> (B, T, H, r)
        out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv.to(out_latent.dtype))  # (B, T, H, v)
        return self.wo(out.reshape(B, T, H * self.v_dim))


class GQA(nn.Module):
    """Baseline attention with n_kv_heads key/value heads: MHA (n_kv_heads = n_heads), GQA, MQA (1)."""

    def __init__(self, cfg, window_slot: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads(), cfg.attn_head_dim()
        self.window_slot = window_slot
        self.rotate = cfg.position == "rope"
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        B, T, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, d)  # (B, T, H, d)
        k = self.wk(x).view(B, T, Hkv, d)  # (B, T, Hkv, d)
        v = self.wv(x).view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotate:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        k = k.transpose(1, 2)  # (B, Hkv, T, d)
        if cache is not None:
            cache.write(ctx.positions, k, v)
            if ctx.decoding:
                S = ctx.kv_len(cache.max_len)
                rows = q.view(B, T, Hkv, H // Hkv, d).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * H // Hkv, d)
                out = ctx.attend_cached(rows, cache.k[:, :, :S], cache.v[:, :, :S], self.window_slot, self.scale)
                out = out.view(B, Hkv, T, H // Hkv, d).permute(0, 2, 1, 3, 4)  # (B, T, Hkv, G, d)
                return self.wo(out.reshape(B, T, H * d))
        out = ctx.attend(q.transpose(1, 2), k, v, self.window_slot, self.scale)  # (B, H, T, d)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * d))


def build_attention(cfg, window_slot: int | None = None) -> nn.Module:
    """The attention module of one block for `model.attention`."""
    return MLA(cfg, window_slot) if cfg.attention == "mla" else GQA(cfg, window_slot)


def gqa_param_count(cfg) -> int:
    """Parameters of one MHA/GQA/MQA layer from its config."""
    d, hkv = cfg.attn_head_dim(), cfg.kv_heads()
    norms = 2 * d if cfg.qk_norm else 0
    return 2 * cfg.d_model * cfg.n_heads * d + 2 * cfg.d_model * hkv * d + norms
