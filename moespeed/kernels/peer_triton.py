"""Fused PEER expert kernels (Triton) and the plain-PyTorch reference they must match.

The expert part of a PEER layer, after retrieval, for T tokens that each selected P single-neuron
experts (P = heads * experts_per_head * expert_hidden_size, one "pair" per selected neuron):

    h[t, p] = down[rows[t, p]] . x[t]                       # (T, P)
    y[t]    = sum_p w[t, p] * act(h[t, p]) * up[rows[t, p]]  # (T, D)

`down` and `up` are (R, D) tables (R up to millions of rows); `w` holds the softmax retrieval
weights. The reference gathers the selected rows into (T, P, D) tensors (2 GiB each at 8192
tokens x 128 pairs x 1024 bf16); the kernels never do:

- forward, one program per token: stream its P rows of `down` and `up` tile by tile, keep `y[t]` in
  registers, save `h` (T, P) in fp32 for the backward.
- backward, two kernels, no atomics:
  1. one program per table row r (all R of them): walk the pairs that selected row r (pairs sorted
     by row with a stable sort, so sums are deterministic), compute for each pair
     g = dy[t] . up[r], grad_w = g * act(h), grad_h = g * w * act'(h), and accumulate in fp32
     registers grad_down[r] = sum grad_h * x[t] and grad_up[r] = sum w * act(h) * dy[t]. Each row of
     the dense gradients is written exactly once (zeros for rows nobody selected), so there is no
     separate memset and no fp32 (R, D) scratch buffer. x and dy are small (T, D) and stay in L2.
  2. one program per token: grad_x[t] = sum_p grad_h[t, p] * down[rows[t, p]].

DRAM traffic per step (s = bytes per table element, pairs = T * P):
forward 2 * pairs * D * s (down and up rows); backward pairs * D * s (down rows for grad_x)
+ touched_rows * D * s (up rows in kernel 1) + 2 * R * D * s (the dense gradients, written once).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # triton is optional: the reference is the CPU path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

HAS_TRITON = triton is not None
ACTIVATIONS = ("relu2", "gelu")


def activation_fn(name: str, h: torch.Tensor) -> torch.Tensor:
    """The expert activation by name: relu2 = relu(h)^2, gelu = exact (erf) GELU."""
    if name == "relu2":
        return F.relu(h).square()
    if name == "gelu":
        return F.gelu(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def peer_experts_reference(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                           down: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Readable PyTorch expert mix: x (T, D), rows (T, P) int, w (T, P) -> y (T, D).

    Gathers the selected rows of `down` and `up` (two (T, P, D) tensors) and mixes them with einsum.
    Computes in x.dtype; autograd gives the (dense) gradients of x, w, down and up.
    """
    u = down[rows]                                      # (T, P, D)
    v = up[rows]                                        # (T, P, D)
    h = torch.einsum("td,tpd->tp", x, u)                # (T, P)
    a = w.to(h.dtype) * activation_fn(activation, h)    # (T, P)
    return torch.einsum("tp,tpd->td", a, v)             # (T, D)


def triton_usable(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA tensors, or any tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.disable  # a clean graph break under torch.compile: the kernels launch eagerly
def peer_experts_triton(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                        down: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Fused expert mix, same contract as `peer_experts_reference` (gradients for x, w, down, up)."""
    if not HAS_TRITON:
        raise RuntimeError("peer_experts_triton needs triton; use peer_experts_reference")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return _PEERExperts.apply(x, rows, w, down, up, activation)


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:

    @triton.jit
    def _act_and_grad(h, ACT: tl.constexpr):
        """(act(h), act'(h)) in fp32; ACT 0 = relu2, 1 = gelu (erf)."""
        if ACT == 0:
            r = tl.maximum(h, 0.0)
            return r * r, 2.0 * r
        else:
            cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
            pdf = 0.3989422804014327 * tl.exp(-0.5 * h * h)
            return h * cdf, cdf + h * pdf

    @triton.jit
    def _peer_fwd_kernel(x_ptr, rows_ptr, w_ptr, down_ptr, up_ptr, y_ptr, h_ptr,
                         P, D, stride_x, stride_y, stride_tab,
                         ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per token: y[t] = sum_p w * act(down[row] . x[t]) * up[row]; saves h."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_ptr + t * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            row = tl.load(rows_ptr + t * P + offs_p, mask=mask_p, other=0).to(tl.int64)
            w = tl.load(w_ptr + t * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            tile = row[:, None] * stride_tab + offs_d[None, :]          # (BLOCK_P, BLOCK_D)
            mask = mask_p[:, None] & mask_d[None, :]
            u = tl.load(down_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(up_ptr + tile, mask=mask, other=0.0).to(tl.float32)  # issued early
            h = tl.sum(u * x[None, :], axis=1)                           # (BLOCK_P,)
            tl.store(h_ptr + t * P + offs_p, h, mask=mask_p)
            f, _ = _act_and_grad(h, ACT)
            acc += tl.sum((w * f)[:, None] * v, axis=0)
        tl.store(y_ptr + t * stride_y + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _peer_bwd_rows_kernel(x_ptr, dy_ptr, w_ptr, h_ptr, up_ptr, order_ptr, offsets_ptr,
                              gw_ptr, gh_ptr, gdown_ptr, gup_ptr,
                              P, D, stride_x, stride_dy, stride_tab,
                              ACT: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per table row r: pair grads (grad_w, grad_h) and rows r of grad_down/grad_up."""
        r = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        start = tl.load(offsets_ptr + r)
        end = tl.load(offsets_ptr + r + 1)
        # an unselected row loads nothing (all masked) and writes zeros
        width = tl.where(end > start, D, 0)
        v = tl.load(up_ptr + r * stride_tab + offs_d, mask=offs_d < width, other=0.0).to(tl.float32)
        g_down = tl.zeros([BLOCK_D], dtype=tl.float32)
        g_up = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(start, end):
            pair = tl.load(order_ptr + j).to(tl.int64)      # flat index t * P + p
            t = pair // P
            dy = tl.load(dy_ptr + t * stride_dy + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + t * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + pair)
            w = tl.load(w_ptr + pair).to(tl.float32)
            f, df = _act_and_grad(h, ACT)
            g = tl.sum(dy * v, axis=0)                      # d loss / d (w * act(h))
            gh = g * w * df
            tl.store(gw_ptr + pair, g * f)
            tl.store(gh_ptr + pair, gh)
            g_down += gh * x
            g_up += (w * f) * dy
        tl.store(gdown_ptr + r * stride_tab + offs_d, g_down.to(gdown_ptr.dtype.element_ty),
                 mask=mask_d)
        tl.store(gup_ptr + r * stride_tab + offs_d, g_up.to(gup_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _peer_bwd_x_kernel(gh_ptr, rows_ptr, down_ptr, gx_ptr, P, D, stride_gx, stride_tab,
                           BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per token: grad_x[t] = sum_p grad_h[t, p] * down[rows[t, p]]."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            row = tl.load(rows_ptr + t * P + offs_p, mask=mask_p, other=0).to(tl.int64)
            gh = tl.load(gh_ptr + t * P + offs_p, mask=mask_p, other=0.0)
            mask = mask_p[:, None] & mask_d[None, :]
            u = tl.load(down_ptr + row[:, None] * stride_tab + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            acc += tl.sum(gh[:, None] * u, axis=0)
        tl.store(gx_ptr + t * stride_gx + offs_d, acc.to(gx_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------- launch configs
_MAX_TILE = 16384  # elements of one (BLOCK_P, BLOCK_D) tile held in registers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _token_configs(block_d: int) -> list:
    """Autotune candidates for the per-token kernels: pairs per tile x warps, tile <= _MAX_TILE."""
    configs = [triton.Config({"BLOCK_P": bp}, num_warps=nw)
               for bp in (2, 4, 8, 16, 32) for nw in (4, 8)
               if bp * block_d <= _MAX_TILE and bp * block_d >= 32 * nw]
    return configs or [triton.Config({"BLOCK_P": 1}, num_warps=4)]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, block_d: int):
    """An autotuned launcher for one kernel and row width (GPU only; keyed on P and D)."""
    kernel = globals()[kernel_name]
    if kernel_name == "_peer_bwd_rows_kernel":
        configs = [triton.Config({}, num_warps=nw) for nw in (1, 2, 4, 8) if 32 * nw <= block_d]
        configs = configs or [triton.Config({}, num_warps=1)]
    else:
        configs = _token_configs(block_d)
    return triton.autotune(configs=configs, key=["P", "D"])(kernel)


def _launch(kernel_name: str, grid: tuple, *args, block_d: int, token_kernel: bool, **meta):
    """Launch with autotuning on GPU; with a small fixed config under the interpreter."""
    if _interpreting():
        if token_kernel:
            meta["BLOCK_P"] = max(1, min(8, _MAX_TILE // block_d))
        globals()[kernel_name][grid](*args, BLOCK_D=block_d, **meta)
    else:
        _tuned(kernel_name, block_d)[grid](*args, BLOCK_D=block_d, **meta)


_ACT_CODE = {"relu2": 0, "gelu": 1}


class _PEERExperts(torch.autograd.Function):
    """Autograd wrapper of the fused kernels: inputs x (T, D), rows (T, P), w (T, P), down/up (R, D)."""

    @staticmethod
    def forward(ctx, x, rows, w, down, up, activation):
        x, w = x.contiguous(), w.contiguous()
        rows = rows.to(torch.int32).contiguous()
        down, up = down.contiguous(), up.contiguous()
        (T, D), P = x.shape, rows.shape[1]
        y = torch.empty_like(x)
        h = torch.empty(T, P, device=x.device, dtype=torch.float32)
        block_d = triton.next_power_of_2(D)
        _launch("_peer_fwd_kernel", (T,), x, rows, w, down, up, y, h,
                P, D, x.stride(0), y.stride(0), down.stride(0),
                block_d=block_d, token_kernel=True, ACT=_ACT_CODE[activation])
        ctx.save_for_backward(x, rows, w, down, up, h)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rows, w, down, up, h = ctx.saved_tensors
        dy = dy.contiguous()
        (T, D), P, R = x.shape, rows.shape[1], down.shape[0]
        block_d = triton.next_power_of_2(D)
        # pairs sorted by table row; offsets[r]:offsets[r+1] are the pairs that selected row r
        sorted_rows, order = torch.sort(rows.reshape(-1), stable=True)      # (T * P,)
        bounds = torch.arange(R + 1, device=x.device, dtype=torch.int32)
        offsets = torch.searchsorted(sorted_rows, bounds, out_int32=True)  # (R + 1,)
        grad_w = torch.empty(T, P, device=x.device, dtype=torch.float32)
        grad_h = torch.empty(T, P, device=x.device, dtype=torch.float32)
        grad_down = torch.empty_like(down)
        grad_up = torch.empty_like(up)
        _launch("_peer_bwd_rows_kernel", (R,), x, dy, w, h, up, order, offsets,
                grad_w, grad_h, grad_down, grad_up, P, D, x.stride(0), dy.stride(0), up.stride(0),
                block_d=block_d, token_kernel=False, ACT=_ACT_CODE[ctx.activation])
        grad_x = torch.empty_like(x)
        _launch("_peer_bwd_x_kernel", (T,), grad_h, rows, down, grad_x, P, D,
                grad_x.stride(0), down.stride(0), block_d=block_d, token_kernel=True)
        return grad_x, None, grad_w.to(w.dtype), grad_down, grad_up, None
