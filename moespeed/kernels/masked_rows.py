"""Row gather and un-permute-sum that skip "dead" rows: the allgather EP dispatcher's copies of other
ranks' experts (moespeed.model.moe_ep).

After the allgather dispatcher sorts the P*S*k token copies by local expert, the first `n_live` rows
(a count on the device: no host sync) belong to this rank's experts and the rest to other ranks'.

    xs = masked_gather(x, idx, n_live)              xs[r] = x[idx[r]] for r < n_live      (M, D)
    y  = masked_unpermute_sum(o, inv_perm, k, n_live)
                                                    y[t] = sum_j o[inv_perm[t*k + j]], counting
                                                    only the copies with inv_perm < n_live (T, D)

They are each other's adjoint. `masked_dispatch` and `masked_combine` are the autograd functions.
Dead rows of xs are zero with `zero_dead` (needed when the expert FFN reads every row, padded_bmm),
else left as they were allocated (grouped_mm never reads them); dead rows of o are never read. So
the Triton kernels move only the live rows' bytes. The unmasked path gathers and zeroes all P*S*k
rows: at EP = 2 those kernels took 2x their one-GPU time (profile_s6_kernels_*.txt).

`*_reference` are the plain PyTorch definitions and the CPU path; the Triton kernels run on CUDA
(and on CPU under TRITON_INTERPRET=1, for tests). Both are wrapped as custom ops, opaque to
torch.compile.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # CUDA; on CPU only under TRITON_INTERPRET=1
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def masked_gather_reference(x: Tensor, idx: Tensor, n_live: Tensor, zero_dead: bool) -> Tensor:
    """x (N, D), idx (M,) int64, n_live () int64 -> (M, D): x[idx[r]] for r < n_live, else 0."""
    live = torch.arange(idx.numel(), device=idx.device) < n_live  # (M,)
    return torch.where(live.unsqueeze(-1), x.index_select(0, idx), 0)


def masked_unpermute_sum_reference(o: Tensor, inv_perm: Tensor, k: int, n_live: Tensor) -> Tensor:
    """o (M, D), inv_perm (T*k,) int64 -> (T, D): each token's k copies summed, dead copies skipped."""
    rows = torch.where((inv_perm < n_live).unsqueeze(-1), o.index_select(0, inv_perm), 0)  # (T*k, D)
    return rows.view(-1, k, o.shape[-1]).sum(1)


if triton is not None:
    @triton.jit
    def _masked_gather_kernel(x_ptr, idx_ptr, n_live_ptr, out_ptr, M, D, ZERO_DEAD: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [pid0 * BLOCK_R, +BLOCK_R) x columns [pid1 * BLOCK_D, +BLOCK_D) of out."""
        n_live = tl.load(n_live_ptr)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        live = rows < tl.minimum(n_live, M)
        src = tl.load(idx_ptr + rows, mask=live, other=0).to(tl.int64)
        mask = live[:, None] & (cols[None, :] < D)
        vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0)
        store = ((rows < M)[:, None] & (cols[None, :] < D)) if ZERO_DEAD else mask
        tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], vals, mask=store)

    @triton.jit
    def _masked_sum_kernel(o_ptr, inv_ptr, n_live_ptr, out_ptr, T, D, K: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tokens [pid0 * BLOCK_T, +BLOCK_T) x columns [pid1 * BLOCK_D, +BLOCK_D) of out; fp32 sum."""
        n_live = tl.load(n_live_ptr)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        in_range = tokens < T
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + tokens.to(tl.int64) * K + j, mask=in_range, other=0)
            live = in_range & (row < n_live)
            mask = live[:, None] & (cols[None, :] < D)
            acc += tl.load(o_ptr + row[:, None].to(tl.int64) * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tokens[:, None].to(tl.int64) * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=in_range[:, None] & (cols[None, :] < D))

_BLOCK_ROWS, _BLOCK_COLS = 16, 128  # a program: 16 rows x 128 columns (4 KiB of bf16)


def _use_triton(t: Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRET)


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return (triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(cols, _BLOCK_COLS))


@torch.library.custom_op("moespeed::masked_gather", mutates_args=())
def _masked_gather(x: Tensor, idx: Tensor, n_live: Tensor, zero_dead: bool) -> Tensor:
    """Custom op: `masked_gather_reference` semantics; Triton on CUDA (dead rows written only with zero_dead)."""
    if not _use_triton(x):
        return masked_gather_reference(x, idx, n_live, zero_dead)
    x, idx = x.contiguous(), idx.contiguous()
    M, D = idx.numel(), x.shape[-1]
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M and D:
        _masked_gather_kernel[_grid(M, D)](x, idx, n_live, out, M, D, ZERO_DEAD=zero_dead,
                                           BLOCK_R=_BLOCK_ROWS, BLOCK_D=_BLOCK_COLS)
    return out


@_masked_gather.register_fake
def _(x, idx, n_live, zero_dead):
    return x.new_empty(idx.numel(), x.shape[-1])


@torch.library.custom_op("moespeed::masked_unpermute_sum", mutates_args=())
def _masked_unpermute_sum(o: Tensor, inv_perm: Tensor, k: int, n_live: Tensor) -> Tensor:
    """Custom op: `masked_unpermute_sum_reference` semantics; Triton on CUDA (dead rows never read)."""
    if not _use_triton(o):
        return masked_unpermute_sum_reference(o, inv_perm, k, n_live)
    o, inv_perm = o.contiguous(), inv_perm.contiguous()
    T, D = inv_perm.numel() // k, o.shape[-1]
    out = torch.empty(T, D, dtype=o.dtype, device=o.device)
    if T and D:
        _masked_sum_kernel[_grid(T, D)](o, inv_perm, n_live, out, T, D, K=k,
                                        BLOCK_T=_BLOCK_ROWS, BLOCK_D=_BLOCK_COLS)
    return out


@_masked_unpermute_sum.register_fake
def _(o, inv_perm, k, n_live):
    return o.new_empty(inv_perm.numel() // k, o.shape[-1])


class _MaskedDispatch(torch.autograd.Function):
    """xs = masked_gather(x, idx); the backward sums each token's live copies."""

    @staticmethod
    def forward(ctx, x, idx, inv_perm, k, n_live, zero_dead):
        ctx.k = k
        ctx.save_for_backward(inv_perm, n_live)
        return torch.ops.moespeed.masked_gather(x, idx, n_live, zero_dead)

    @staticmethod
    def backward(ctx, grad):
        inv_perm, n_live = ctx.saved_tensors
        return torch.ops.moespeed.masked_unpermute_sum(grad, inv_perm, ctx.k, n_live), None, None, None, None, None


class _MaskedCombine(torch.autograd.Function):
    """y = masked_unpermute_sum(o); the backward gathers the incoming gradient to the live rows."""

    @staticmethod
    def forward(ctx, o, inv_perm, idx, k, n_live, zero_dead):
        ctx.zero_dead = zero_dead
        ctx.save_for_backward(idx, n_live)
        return torch.ops.moespeed.masked_unpermute_sum(o, inv_perm, k, n_live)

    @staticmethod
    def backward(ctx, grad):
        idx, n_live = ctx.saved_tensors
        return torch.ops.moespeed.masked_gather(grad, idx, n_live, ctx.zero_dead), None, None, None, None, None


def masked_dispatch(x: Tensor, idx: Tensor, inv_perm: Tensor, k: int, n_live: Tensor, zero_dead: bool) -> Tensor:
    """x (T, D) -> (M, D) rows x[idx[r]] for the first n_live rows (autograd: sums live copies back)."""
    return _MaskedDispatch.apply(x, idx, inv_perm, k, n_live, zero_dead)


def masked_combine(o: Tensor, inv_perm: Tensor, idx: Tensor, k: int, n_live: Tensor, zero_dead: bool) -> Tensor:
    """o (M, D) -> (T, D): each token's live copies summed (autograd: gathers to the live rows)."""
    return _MaskedCombine.apply(o, inv_perm, idx, k, n_live, zero_dead)
