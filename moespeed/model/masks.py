"""Attention masks: causal within documents and within a sliding window, plus ALiBi biases.

One rule decides whether query position q of sequence b sees key position kv:

    kv <= q   and   doc_ids[b, kv] == doc_ids[b, q]   and   q - kv < window      (no window: no limit)

It exists in four forms, all built from the same few tensors:
- `mask_mod`: the rule as FlexAttention's element-wise function (evaluated inside the kernel);
- `block_mask`: FlexAttention's block-sparse summary of the rule: which BLOCK x BLOCK tiles are empty
  (skipped), partial (mask_mod is evaluated) or full (no mask needed). It is computed from the first
  position and the doc-id range of every block, O(B * (T / BLOCK)^2) work and memory, so a 64K-token
  sequence never meets a T x T tensor (`create_block_mask` would evaluate mask_mod T x T times);
- `dense_mask`: the (B, 1, T, T) boolean tensor, for SDPA on short sequences and as the reference;
- `visible`: the (T, S) rule for new tokens attending to a KV cache (one document: generation).
The window is a 0-d tensor (not a Python int), so a growing window never recompiles anything.

ALiBi adds slope_h * (kv - q) to the scores of head h: `alibi_score_mod` for Flex, `alibi_bias`
for the dense and cached paths; slopes are the geometric sequence of the ALiBi paper.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128  # FlexAttention's default tile; kernels on Hopper use tiles that divide it


def mask_mod(doc_ids: Tensor | None, window: Tensor | None, seq_len: int, block_size: int = BLOCK_SIZE):
    """The element-wise rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx) -> bool, for a block mask
    of block_size tiles (kernels evaluate it on tiles that divide block_size)."""
    last = seq_len - 1
    # Only a length that is not a multiple of block_size has padded tail tiles, whose indices >= seq_len
    # must be clamped before indexing doc_ids. Aligned lengths skip the clamp: torch 2.11's CuTe
    # (flex_kernel = flash) code generator has no `minimum`.
    padded = seq_len % block_size != 0
    # The window as the first visible key of each query, (T,): `q - kv < window` <=> `kv > q - window`.
    # A per-position load, because torch 2.11's CuTe code generator cannot load a 0-d tensor.
    before_window = None if window is None else torch.arange(seq_len, device=window.device) - window  # (T,)

    def causal_doc_window(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        q_pos, kv_pos = (q_idx.clamp(max=last), kv_idx.clamp(max=last)) if padded else (q_idx, kv_idx)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_pos] == doc_ids[b, kv_pos])
        if before_window is not None:
            keep = keep & (kv_idx > before_window[q_pos])
        return keep

    return causal_doc_window


def block_mask(doc_ids: Tensor | None, window: Tensor | None, seq_len: int, device: torch.device,
               block_size: int = BLOCK_SIZE) -> BlockMask:
    """FlexAttention BlockMask of the rule for (B, T) doc_ids (None: one document; batch broadcast)."""
    n = -(-seq_len // block_size)  # blocks per side
    first = torch.arange(n, device=device) * block_size  # (n,) first position of each block
    q_first, kv_first = first[:, None], first[None, :]  # (n, 1), (1, n)
    span = block_size - 1  # last position of a block - its first position
    some = kv_first <= q_first  # (n, n): some key of the kv block precedes some query of the q block
    every = kv_first + span < q_first  # every key precedes every query
    if window is not None:
        some = some & (q_first - (kv_first + span) < window)  # the closest pair is inside the window
        every = every & (q_first + span - kv_first < window)  # the farthest pair is inside the window
    some, every = some[None], every[None]  # (1, n, n)
    if doc_ids is not None:
        lo, hi = _block_doc_ranges(doc_ids, n, block_size)  # (B, n) each
        some = some & (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # ranges overlap
        single = lo == hi  # (B, n): the block holds one document
        every = every & single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    if seq_len % block_size:  # tiles that hold padding are never "full": mask_mod bounds them
        inner = torch.arange(n, device=device) < n - 1
        every = every & inner[:, None] & inner[None, :]
    partial = some & ~every
    return BlockMask.from_kv_blocks(*_kv_blocks(partial), *_kv_blocks(every), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod(doc_ids, window, seq_len, block_size), seq_lengths=(seq_len, seq_len))


def _block_doc_ranges(doc_ids: Tensor, n_blocks: int, block_size: int) -> tuple[Tensor, Tensor]:
    """Smallest and largest doc id in each block, (B, n_blocks) each (the tail padded by its last id)."""
    B, T = doc_ids.shape
    pad = n_blocks * block_size - T
    if pad:
        doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(B, pad)], dim=1)
    blocks = doc_ids.view(B, n_blocks, block_size)  # (B, n, BLOCK)
    return blocks.amin(dim=-1), blocks.amax(dim=-1)


def _kv_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, n, n) bool tiles -> counts (B, 1, n) and kv block indices (B, 1, n, n), selected ones first."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def visible(q_pos: Tensor, kv_len: int, window: Tensor | None) -> Tensor:
    """(T, S) bool: query positions q_pos (T,) may see key positions 0..kv_len-1 (causal, windowed)."""
    kv_pos = torch.arange(kv_len, device=q_pos.device)
    keep = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        keep = keep & (q_pos[:, None] - kv_pos[None, :] < window)
    return keep


def dense_mask(doc_ids: Tensor | None, window: Tensor | None, seq_len: int, device: torch.device) -> Tensor:
    """(B, 1, T, T) bool mask of the rule ((1, 1, T, T) without doc_ids): O(T^2), short sequences only."""
    keep = visible(torch.arange(seq_len, device=device), seq_len, window)[None, None]  # (1, 1, T, T)
    if doc_ids is not None:
        keep = keep & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    return keep


def alibi_slopes(n_heads: int) -> Tensor:
    """(H,) fp32 ALiBi slopes: 2^(-8/n * i) for i = 1..n with n the largest power of two <= H, the
    remaining heads taking every other slope of the 2n sequence (Press et al., 2022)."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(base) + geometric(2 * base)[0::2][: n_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_score_mod(slopes: Tensor):
    """FlexAttention score_mod adding slope_h * (kv - q) (<= 0 on visible keys), in fp32."""
    slopes = slopes.float()  # a bf16 model casts its buffers

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


def alibi_bias(slopes: Tensor, q_pos: Tensor, kv_len: int) -> Tensor:
    """(H, T, S) fp32 ALiBi bias for query positions q_pos (T,) and key positions 0..kv_len-1."""
    kv_pos = torch.arange(kv_len, device=q_pos.device)
    distance = (kv_pos[None, :] - q_pos[:, None]).float()  # (T, S)
    return slopes[:, None, None].float() * distance[None]
