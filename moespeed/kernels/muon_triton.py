"""Muon's Triton kernels and their PyTorch references (moespeed.optim.muon uses them).

- `_momentum_fused` / `_momentum_reference`: Nesterov momentum into the buffers, and the bf16 NS
  input of each param written straight into its slot of the optimizer's stack.
- `_update_fused` / `_update_reference`: decoupled weight decay and the orthogonalized update.
- `_addmm_triton`: NS's "alpha L @ R + beta D" batched GEMM that reads D in its epilogue (baddbmm
  first copies D into its output).
- `_addmm_triton`'s optional per-matrix `scale` and `_normalize_gram_triton` (A / trace(A), 1 / sqrt(
  trace(A)) for A = X X^T): the Triton NS normalizes through its first Gram matrix, not by a pass over X.
- `_normalize_triton`: each matrix of an NS batch divided by its Frobenius norm (the broadcast
  `X.div_(norms)` runs a slow non-vectorized kernel: 0.94 ms of a small-moe Muon step on an H100,
  this pass 0.37 ms; s7_muon_kernel_profile*.txt); "poly" still uses it.
- `_fused_works`: the one-time check, per device, that the fused kernels agree with the references.
One launch covers a run of tensors whose addresses sit at multiples of 16 elements from the first
(`_launch_runs`), so a whole shape class is one kernel. On CPU the kernels run only under
TRITON_INTERPRET=1 (tests); the references are the CPU path.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import Tensor

try:  # CUDA; on CPU only under TRITON_INTERPRET=1
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_BLOCK = 1024  # elements per Triton program

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on CPU (tests)

if triton is not None:
    @triton.jit
    def _lerp(start, end, weight, SMALL: tl.constexpr):
        """torch.lerp (aten Lerp.h): the branch for |weight| < 0.5 or not, as fused multiply-adds."""
        if SMALL:
            return tl.fma(weight, end - start, start)  # start + weight * (end - start)
        return tl.fma(start - end, 1.0 - weight, end)  # end - (end - start) * (1 - weight)

    @triton.jit
    def _to_bf16(x, INTERPRET: tl.constexpr):
        """fp32 -> bf16, rounded to nearest even (the GPU does it; the interpreter would truncate)."""
        if INTERPRET:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(tl.bfloat16)

    @triton.jit
    def _momentum_kernel(grad_ptr, buf_ptr, u_ptr, g_offs_ptr, b_offs_ptr, n, w_buf, w_u, SMALL_BUF: tl.constexpr,
                         SMALL_U: tl.constexpr, NESTEROV: tl.constexpr, BUF_BF16: tl.constexpr,
                         BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        """Tensor j = program_id(1) of a run: buf.lerp_(g, w_buf); u = g.lerp(buf, w_u) if NESTEROV
        else buf, stored as bf16. g and buf start 16 * g_offs[j] and 16 * b_offs[j] elements after
        grad_ptr and buf_ptr (g_offs may be negative: grad_ptr can be any tensor's address), u at j * n
        after u_ptr; every tensor has n elements. The lerps run in fp32; a bf16 buf (BUF_BF16) is
        stored rounded and u reads the rounded value."""
        j = tl.program_id(1)
        g_off = tl.load(g_offs_ptr + j) * 16  # a known multiple of 16: vector loads
        b_off = tl.load(b_offs_ptr + j) * 16
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + g_off + offs, mask=mask).to(tl.float32)
        buf = tl.load(buf_ptr + b_off + offs, mask=mask).to(tl.float32)
        buf = _lerp(buf, g, w_buf, SMALL_BUF)
        if BUF_BF16:
            buf = _to_bf16(buf, INTERPRET)
        else:
            buf = buf.to(buf_ptr.dtype.element_ty)
        tl.store(buf_ptr + b_off + offs, buf, mask=mask)
        u = buf.to(tl.float32)
        if NESTEROV:
            u = _lerp(g, u, w_u, SMALL_U)
        tl.store(u_ptr + j.to(tl.int64) * n + offs, _to_bf16(u, INTERPRET), mask=mask)

    @triton.jit
    def _update_kernel(p_ptr, o_ptr, offs_ptr, n, decay, alpha, coef_ptr, BLOCK: tl.constexpr, COEF: tl.constexpr):
        """Tensor j = program_id(1) of a run: p.mul_(decay); p.add_(o, alpha=alpha) in one pass;
        p starts 16 * offs[j] elements after p_ptr, o (bf16) at j * n after o_ptr. COEF: decay and
        alpha are read from coef_ptr[0], coef_ptr[1] (fp32, on the GPU: a CUDA graph replays the
        kernel with each step's learning rate)."""
        if COEF:
            decay = tl.load(coef_ptr)
            alpha = tl.load(coef_ptr + 1)
        j = tl.program_id(1)
        p_off = tl.load(offs_ptr + j) * 16
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + p_off + offs, mask=mask).to(tl.float32)
        p = (p * decay).to(p_ptr.dtype.element_ty).to(tl.float32)  # rounded like p.mul_
        o = tl.load(o_ptr + j.to(tl.int64) * n + offs, mask=mask).to(tl.float32)
        tl.store(p_ptr + p_off + offs, tl.fma(alpha, o, p).to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(x_ptr, norm_ptr, numel, eps, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        """Matrix z = program_id(1) of a contiguous batch: x /= max(norm[z], eps), in place."""
        z = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        norm = tl.maximum(tl.load(norm_ptr + z).to(tl.float32), eps)
        x = tl.load(x_ptr + z * numel + offs, mask=mask).to(tl.float32)
        tl.store(x_ptr + z * numel + offs, _to_bf16(x / norm, INTERPRET), mask=mask)

    @triton.jit
    def _gram_scale_kernel(a_ptr, out_ptr, inv_ptr, m, numel, eps, BLOCK: tl.constexpr, M_POW2: tl.constexpr,
                           INTERPRET: tl.constexpr):
        """Matrix z = program_id(1) of a contiguous batch of (m, m) Gram matrices: inv = 1 / max(sqrt(
        trace), eps) (each program sums the diagonal itself); out = a * inv^2 for this program's
        elements; program 0 stores inv[z]."""
        z = tl.program_id(1).to(tl.int64)
        diag = tl.arange(0, M_POW2)
        trace = tl.sum(tl.load(a_ptr + z * numel + diag * (m + 1), mask=diag < m, other=0.0).to(tl.float32))
        inv = 1.0 / tl.maximum(tl.sqrt(trace), eps)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        a = tl.load(a_ptr + z * numel + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + z * numel + offs, _to_bf16(a * (inv * inv), INTERPRET), mask=mask)
        if tl.program_id(0) == 0:
            tl.store(inv_ptr + z, inv)


if triton is not None:
    _GEMM_CONFIGS = [  # Hopper-friendly tiles (the last two won NS shapes of `small` in s7_ns_gemm_sweep.json);
        # one small tile for the interpreter
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 128, 4, 3)]
    ] if not _INTERPRET else [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]

    @triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _addmm_kernel(l_ptr, r_ptr, d_ptr, c_ptr, scale_ptr, M, N, K, s_lb, s_lm, s_lk, s_rb, s_rk, s_rn,
                      s_db, s_dm, s_dn, s_cb, s_cm, s_cn, alpha, beta, SCALED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, NO_D: tl.constexpr):
        """C[z] = alpha * L[z] @ R[z] + beta * D[z], times scale[z] (fp32) if SCALED: L and R bf16 or
        fp8 e4m3 (both the same), C and D bf16, fp32 accumulation; one program per (z, output tile),
        D read in the epilogue (no copy of D into C first), not at all if NO_D. INTERPRET: fp32
        operands (exact products too; the interpreter's bf16 dot is wrong)."""
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles = tl.cdiv(M, BLOCK_M) * tiles_n
        pid = tl.program_id(0)
        z = (pid // tiles).to(tl.int64)
        tile = pid % tiles
        rm = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        l_ptrs = l_ptr + z * s_lb + rm[:, None] * s_lm + rk[None, :] * s_lk  # (BLOCK_M, BLOCK_K)
        r_ptrs = r_ptr + z * s_rb + rk[:, None] * s_rk + rn[None, :] * s_rn  # (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                lhs = tl.load(l_ptrs, mask=rm[:, None] < M, other=0.0)
                rhs = tl.load(r_ptrs, mask=rn[None, :] < N, other=0.0)
            else:
                k_left = K - k * BLOCK_K
                lhs = tl.load(l_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
                rhs = tl.load(r_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            if INTERPRET:
                lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
            acc = tl.dot(lhs, rhs, acc)
            l_ptrs += BLOCK_K * s_lk
            r_ptrs += BLOCK_K * s_rk
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        out = alpha * acc  # (BLOCK_M, BLOCK_N)
        if not NO_D:
            d = tl.load(d_ptr + z * s_db + rm[:, None] * s_dm + rn[None, :] * s_dn, mask=mask, other=0.0)
            out += beta * d.to(tl.float32)
        if SCALED:
            out = out * tl.load(scale_ptr + z)
        tl.store(c_ptr + z * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, _to_bf16(out, INTERPRET),
                 mask=mask)


if triton is not None:
    def _tma_blocks(nargs: dict) -> None:
        """Autotune pre-hook: give the host-side descriptors the tile shapes of the config being run."""
        block_m, block_n, block_k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["l_desc"].block_shape = [block_m, block_k]
        nargs["r_desc"].block_shape = [block_k, block_n]
        nargs["d_desc"].block_shape = [block_m, block_n]
        nargs["c_desc"].block_shape = [block_m, block_n]

    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM, D loaded before the k loop); every BLOCK_M
    # divides TMA_M and every BLOCK_K TMA_K (so a batch that passes `tma_fits` tiles exactly). On an H200 (s18_ns_tma_probe*.json) 128 x 128
    # tiles won every NS shape; 64-row and 64-wide tiles, 128 x 256 and 256 x 128 tiles (one per expert
    # block's 256 rows, as cuBLAS's fastest kernel there) were slower or out of shared memory.
    _TMA_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PER_SM": per_sm, "D_FIRST": d_first},
                      num_warps=w, num_stages=st, pre_hook=_tma_blocks)
        for bm, bn, bk, w, st, per_sm, d_first in [
            (128, 128, 64, 8, 4, 1, False), (128, 128, 64, 4, 4, 1, False), (128, 128, 64, 8, 4, 1, True),
            (128, 128, 64, 4, 3, 2, False)]
    ] if not _INTERPRET else [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "PER_SM": 1,
                                             "D_FIRST": False}, num_warps=4, num_stages=2, pre_hook=_tma_blocks)]
    TMA_M, TMA_K = (128, 64) if not _INTERPRET else (32, 32)  # what M and K must be multiples of

    @triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _addmm_tma_kernel(l_desc, r_desc, d_desc, c_desc, scale_ptr, count, M, N, K, alpha, beta,
                          SCALED: tl.constexpr, NO_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PER_SM: tl.constexpr, D_FIRST: tl.constexpr,
                          INTERPRET: tl.constexpr):
        """`_addmm_kernel`'s C[z] = (alpha L[z] @ R[z] + beta D[z]) * scale[z], persistent and through TMA
        descriptors: the grid's programs (PER_SM per SM) walk the count * tiles output tiles, and the
        software pipeline runs over the flattened (tile, k) loop, so the next tile's loads overlap this
        tile's epilogue (NS's GEMMs have only K / BLOCK_K = 4 k-steps per tile: a one-tile-per-program
        kernel spends much of its time filling its pipeline). The batch is seen as 2-D: L (count * M,
        K), R (count * K, N), D and C (count * M, N); M and K are multiples of BLOCK_M and BLOCK_K, so
        no tile crosses into the next matrix (N is clipped by the descriptors). D_FIRST: D's tile is
        loaded before the k loop (in flight during the products) instead of in the epilogue."""
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles = (M // BLOCK_M) * tiles_n  # per matrix
        k_steps = K // BLOCK_K
        for tile in tl.range(tl.program_id(0), count * tiles, tl.num_programs(0), flatten=True):
            z = tile // tiles
            row = z * M + ((tile % tiles) // tiles_n) * BLOCK_M  # in the (count * M, .) view
            col = (tile % tiles_n) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if D_FIRST and not NO_D:
                d = d_desc.load([row, col])  # (BLOCK_M, BLOCK_N)
            for k in range(k_steps):
                lhs = l_desc.load([row, k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
                rhs = r_desc.load([z * K + k * BLOCK_K, col])  # (BLOCK_K, BLOCK_N)
                if INTERPRET:
                    lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
                acc = tl.dot(lhs, rhs, acc)
            out = alpha * acc  # (BLOCK_M, BLOCK_N)
            if not NO_D:
                if not D_FIRST:
                    d = d_desc.load([row, col])
                out += beta * d.to(tl.float32)
            if SCALED:
                out = out * tl.load(scale_ptr + z)
            c_desc.store([row, col], _to_bf16(out, INTERPRET))


_SM_COUNT: dict[int, int] = {}


def tma_supported(device: torch.device) -> bool:
    """Does this CUDA device have TMA (Hopper, compute capability 9, or newer)?"""
    return torch.cuda.get_device_capability(device)[0] >= 9


def tma_fits(L: Tensor, R: Tensor, D: Tensor | None, out: Tensor) -> bool:
    """Can `_addmm_tma` take this batch: bf16, contiguous, 16-byte aligned, M and K multiples of every
    config's tile (TMA_M, TMA_K: no tile crosses matrices), N a multiple of 8 (16-byte rows)?"""
    _, M, K = L.shape
    tensors = [L, R, out] + ([] if D is None else [D])
    return (triton is not None and M % TMA_M == 0 and K % TMA_K == 0 and R.shape[-1] % 8 == 0
            and all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors))


def _addmm_tma(L: Tensor, R: Tensor, D: Tensor | None, alpha: float, beta: float, out: Tensor,
               scale: Tensor | None = None) -> Tensor:
    """`_addmm_triton` on the persistent TMA kernel (Hopper and later; the interpreter on CPU); the
    batch must pass `tma_fits`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    count, M, K = L.shape
    N = R.shape[-1]

    def desc(t: Tensor, rows: int, cols: int):  # (count, rows, cols) as (count * rows, cols); tiles set per config
        return TensorDescriptor.from_tensor(t.view(count * rows, cols), [TMA_M, TMA_K])

    sms = 4
    if L.device.type == "cuda":
        index = L.device.index if L.device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]

    def grid(meta):
        return (min(sms * meta["PER_SM"], count * (M // meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    c_desc = desc(out, M, N)
    _addmm_tma_kernel[grid](desc(L, M, K), desc(R, K, N), c_desc if D is None else desc(D, M, N), c_desc,
                            out if scale is None else scale, count, M, N, K, float(alpha), float(beta),
                            SCALED=scale is not None, NO_D=D is None, INTERPRET=_INTERPRET)
    return out


def _addmm_triton(L: Tensor, R: Tensor, D: Tensor | None, alpha: float, beta: float, out: Tensor,
                  scale: Tensor | None = None) -> Tensor:
    """Triton: out = alpha * L @ R + beta * D (D None: alpha * L @ R), each matrix z times scale[z] if
    given (n,) fp32; L and R bf16 or both fp8 e4m3; out (n, M, N) must not overlap L, R or D."""
    n, M, K = L.shape
    N = R.shape[-1]

    def grid(meta):
        return (n * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _addmm_kernel[grid](*_addmm_args(L, R, out if D is None else D, alpha, beta, out, scale),
                        SCALED=scale is not None, INTERPRET=_INTERPRET, NO_D=D is None)
    return out


def _addmm_args(L: Tensor, R: Tensor, D: Tensor, alpha: float, beta: float, out: Tensor,
                scale: Tensor | None = None) -> tuple:
    """`_addmm_kernel`'s positional arguments (a placeholder for an absent scale)."""
    _, M, K = L.shape
    return (L, R, D, out, out if scale is None else scale, M, R.shape[-1], K, *L.stride(), *R.stride(),
            *D.stride(), *out.stride(), float(alpha), float(beta))


def _normalize_gram_triton(A: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Triton: for Gram matrices A = X X^T (n, m, m), contiguous bf16, of unnormalized X: (A / s^2,
    1 / s) per matrix, s = max(||X||_F, eps) = max(sqrt(trace A), eps). Newton–Schulz's first step
    uses them instead of a normalization pass over X (which reads X twice and writes it once).
    Range: ||X||_F^2 must fit in fp32, as for the reference's norm. Both agree for any ||X||_F up to
    ~2e18 (below eps both divide by eps); above, the reference returns zeros and this path zeros or
    NaN (benchmarks/results/s11_ns_gram_normalize_cpu.txt)."""
    n, m = A.shape[0], A.shape[-1]
    out = torch.empty_like(A)  # (n, m, m); not in place: other programs still read A's diagonal
    inv = torch.empty(n, dtype=torch.float32, device=A.device)  # (n,)
    _gram_scale_kernel[(triton.cdiv(m * m, _BLOCK), n)](A, out, inv, m, m * m, float(eps), BLOCK=_BLOCK,
                                                        M_POW2=triton.next_power_of_2(m), INTERPRET=_INTERPRET)
    return out, inv


def _normalize_triton(X: Tensor, eps: float, times: float = 1.0) -> Tensor:
    """Triton: X (n, rows, cols), contiguous bf16, in place: each matrix / max(its Frobenius norm, eps),
    as `X.div_(X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))` computes it (the norm by torch,
    rounded to bf16; the division in fp32, rounded), in one vectorized pass instead of a broadcast;
    times `times` (a power of two: exact) in the same pass."""
    n, numel = X.shape[0], X[0].numel()
    norms = X.view(n, -1).norm(dim=1) / times  # (n,), bf16
    _scale_kernel[(triton.cdiv(numel, _BLOCK), n)](X, norms, numel, float(eps) / times, BLOCK=_BLOCK,
                                                   INTERPRET=_INTERPRET)
    return X


def _momentum_fused(grads: list[Tensor], bufs: list[Tensor], out: Tensor, momentum: float,
                    nesterov: bool, grad_table: tuple[Tensor, Tensor] | None = None) -> None:
    """Triton: update the bufs (like the grads, all of one size) and write the bf16 NS inputs one
    after another into out (contiguous), one launch per run of well-placed tensors.

    grad_table = (anchor, offsets): the kernels find grad i at anchor + 16 * offsets[i] elements
    (offsets: int64 on the device, written before the launch) instead of at grads[i], which then only
    give the dtype. A CUDA graph replays such a launch on whatever addresses the table holds."""
    n = grads[0].numel()
    if grad_table is None:  # (first, last, grads' base, their offsets, the bufs' offsets) per run
        runs = [(first, last, grads[first], offsets, offsets[last - first:])
                for first, last, offsets in _launch_runs(grads, bufs)]
    else:
        anchor, table = grad_table
        runs = [(first, last, anchor, table[first:last], offsets) for first, last, offsets in _launch_runs(bufs)]
    for first, last, g_base, g_offsets, b_offsets in runs:
        _momentum_kernel[(triton.cdiv(n, _BLOCK), last - first)](
            g_base, bufs[first], out.view(-1)[first * n:], g_offsets, b_offsets, n, 1 - momentum, momentum,
            SMALL_BUF=abs(1 - momentum) < 0.5, SMALL_U=abs(momentum) < 0.5, NESTEROV=bool(nesterov),
            BUF_BF16=bufs[first].dtype == torch.bfloat16, BLOCK=_BLOCK, INTERPRET=_INTERPRET)


def _update_fused(params: list[Tensor], updates: Tensor, decay: float, alpha: float,
                  coef: Tensor | None = None) -> None:
    """Triton: p = p * decay + alpha * update for params of one size whose bf16 updates lie one
    after another in `updates` (contiguous), one launch per run of well-placed tensors. `coef`
    (2,) fp32 on the params' device: (decay, alpha) read there instead (for CUDA graphs)."""
    n = params[0].numel()
    for first, last, offsets in _launch_runs(params):
        _update_kernel[(triton.cdiv(n, _BLOCK), last - first)](
            params[first], updates.view(-1)[first * n:], offsets, n, decay, alpha,
            offsets if coef is None else coef, BLOCK=_BLOCK, COEF=coef is not None)


_RUNS_CACHE: dict[tuple, list[tuple[int, int, Tensor]]] = {}  # tensor addresses -> their runs
_RUNS_CACHE_SIZE = 256


def _launch_runs(*lists: list[Tensor]) -> list[tuple[int, int, Tensor]]:
    """(first, last, offsets) per run: tensors [first, last) of every list share one kernel launch.

    offsets (int64, on the tensors' device) holds, list after list, each tensor's distance from the
    run's first tensor of its list, in units of 16 elements (so the kernels' loads stay vectorized);
    a tensor at another distance, or with another dtype, starts a new run. Cached by the number of
    lists and the tensors' addresses and dtypes (one list of 2n tensors is not two lists of n):
    params, buffers and DDP's gradient views keep theirs from step to step, so the tables are built
    and copied to the device once.
    """
    key = (len(lists), *((t.data_ptr(), t.dtype, t.device) for ts in lists for t in ts))
    runs = _RUNS_CACHE.get(key)
    if runs is None:
        if len(_RUNS_CACHE) >= _RUNS_CACHE_SIZE:
            _RUNS_CACHE.clear()
        runs = _RUNS_CACHE[key] = list(_find_runs(*lists))
    for held in _HOLDERS:
        held.extend(table for _, _, table in runs)
    return runs


_HOLDERS: list[list[Tensor]] = []  # open `holding_tables` lists


@contextlib.contextmanager
def holding_tables():
    """A list of every launch table used inside the block: the device tables and, for those built
    inside it, their pinned host sources. A CUDA graph captured in the block reads them at every
    replay (a host-to-device copy captured on a cache miss re-reads its source), so the graph's
    owner keeps the list: the cache may drop its tables when it is full."""
    held: list[Tensor] = []
    _HOLDERS.append(held)
    try:
        yield held
    finally:
        _HOLDERS[:] = [h for h in _HOLDERS if h is not held]


def _find_runs(*lists: list[Tensor]):
    """`_launch_runs` without the cache."""
    first, count, device = 0, len(lists[0]), lists[0][0].device
    while first < count:
        last, offsets = first + 1, [[0] for _ in lists]
        while last < count and last - first < 65535:  # the grid's second axis
            gaps = [ts[last].data_ptr() - ts[first].data_ptr() for ts in lists]  # bytes
            if any(ts[last].dtype != ts[first].dtype or gap % (16 * ts[first].element_size())
                   for ts, gap in zip(lists, gaps)):
                break
            for acc, ts, gap in zip(offsets, lists, gaps):
                acc.append(gap // (16 * ts[first].element_size()))
            last += 1
        table = torch.tensor([g for acc in offsets for g in acc], dtype=torch.int64,
                             pin_memory=device.type == "cuda")
        for held in _HOLDERS:
            held.append(table)  # the source of a copy that a CUDA graph may have captured
        yield first, last, table.to(device, non_blocking=True)
        first = last


def _momentum_reference(grads: list[Tensor], bufs: list[Tensor], slots: list[Tensor], momentum: float,
                        nesterov: bool) -> None:
    """torch.optim.Muon's momentum ops with foreach: update bufs, write the NS inputs into slots
    (each of its tensor's numel, maybe another shape, e.g. (blocks, rows, cols) of a 2-D param).
    Buffers of another dtype than the grads (bf16 momentum) take the same ops in fp32, stored rounded."""
    if bufs and bufs[0].dtype != grads[0].dtype:
        grads = [g.float() for g in grads]
        torch._foreach_copy_(bufs, torch._foreach_lerp([b.float() for b in bufs], grads, 1 - momentum))
        rounded = [b.float() for b in bufs]
        us = torch._foreach_lerp(grads, rounded, momentum) if nesterov else rounded
    else:
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        us = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    torch._foreach_copy_(slots, [u.reshape(s.shape) for u, s in zip(us, slots)])  # casts to bf16


def _update_reference(params: list[Tensor], updates: list[Tensor], decay: float, alpha: float) -> None:
    """torch.optim.Muon's update ops with foreach: p.mul_(decay); p.add_(update, alpha=alpha)."""
    torch._foreach_mul_(params, decay)
    torch._foreach_add_(params, updates, alpha=alpha)


_FUSED_WORKS: dict[torch.device, bool] = {}


def _fused_works(device: torch.device) -> bool:
    """Once per device: do the Triton kernels run and agree with the foreach path? Warns if not."""
    if device not in _FUSED_WORKS:
        _FUSED_WORKS[device] = triton is not None and _check_fused(device)
    return _FUSED_WORKS[device]


def _check_fused(device: torch.device) -> bool:
    """Run both kernels on random data; compare with the reference (fp32 / bf16 rounding allowed)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        grads, bufs, ps = ([torch.randn(4099, device=device, generator=g) for _ in range(3)] for _ in range(3))
        ref_bufs, ref_ps = [b.clone() for b in bufs], [p.clone() for p in ps]
        out, ref_out = (torch.empty(3, 4099, dtype=torch.bfloat16, device=device) for _ in range(2))
        _momentum_fused(grads, bufs, out, 0.95, True)
        _momentum_reference(grads, ref_bufs, list(ref_out), 0.95, True)
        _update_fused(ps, out, 0.998, -0.01)
        _update_reference(ref_ps, list(ref_out), 0.998, -0.01)
        ref = torch.stack(ref_bufs)  # an fp32 ulp of the operands: torch's lerp may or may not fuse its multiply-add
        torch.testing.assert_close(torch.stack(bufs), ref, rtol=1e-6, atol=2**-22 * ref.abs().max().item())
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=2**-7, atol=0)
        torch.testing.assert_close(torch.stack(ps), torch.stack(ref_ps), rtol=1e-5, atol=1e-7)
        low, ref_low = ([b.bfloat16() for b in ref_bufs] for _ in range(2))  # bf16 momentum buffers
        _momentum_fused(grads, low, out, 0.95, True)
        _momentum_reference(grads, ref_low, list(ref_out), 0.95, True)
        torch.testing.assert_close(torch.stack(low).float(), torch.stack(ref_low).float(), rtol=2**-7, atol=0)
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=2**-7, atol=0)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: use the foreach path
        warnings.warn(f"Muon: fused Triton kernels disabled on {device} ({exc!r}); using foreach ops")
        return False
