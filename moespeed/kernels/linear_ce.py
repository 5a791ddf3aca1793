"""Fused linear + cross-entropy: the LM-head loss without a [tokens, vocab] logits tensor.

    loss = linear_cross_entropy(hidden, weight, targets)   # hidden (N, D), weight (V, D), targets (N,)

is `F.cross_entropy(hidden @ weight.T, targets)` (plus optional z-loss and logit soft-capping), but
the (N, V) logits never exist at once: at N=16384, V=131072 they would take 4 GiB in bf16 and 8 GiB
in fp32, more than the rest of a small model's activations.

Definition (what every backend computes; `reference_linear_cross_entropy` is it, literally):
    z = hidden @ weight.T                       logits, fp32 accumulation
    s = softcap * tanh(z / softcap)             only when softcap is given
    lse = logsumexp(s, -1)
    per-token loss = lse - s[target] + z_loss * lse**2
    loss = sum over non-ignored tokens / n_non_ignored   (reduction "mean"; "sum" skips the division)
The z-loss term (PaLM) keeps the softmax normalizer near 1 and is reduced exactly like the CE term.
Tokens whose target equals `ignore_index` contribute nothing; a batch with no non-ignored token gives
loss 0 and zero gradients (not NaN): "mean" divides by max(n_non_ignored, 1).

Backends
- "reference": materializes the fp32 logits; plain autograd. Tests and small shapes only.
- "chunked": pure PyTorch. Tokens are processed in chunks of `chunk_size` rows. For each chunk,
  logits = h_c @ W.T (one cuBLAS/CPU GEMM in the compute dtype), then the loss and dloss/dlogits are
  computed with torch ops and written back into the logits buffer, then
  grad_h[c] = G @ W and grad_W += G.T @ h_c. So the gradients are computed in the forward pass
  (no recomputation: 3 GEMMs in all, the minimum) and backward only scales them by the incoming
  gradient. Extra memory: the chunk's logits in the compute dtype plus two fp32 copies of them
  (softmax work), the gradients themselves, and the fp32 weight-gradient accumulator (below).
- "triton": the same loop, with the softmax/loss/gradient step done by one Triton kernel that
  reads each logits row twice (online max/sum, then gradient) and writes the gradient in place in
  the compute dtype: no fp32 copy of the chunk; 2 reads + 1 write of it, the second read mostly
  from L2 (about one row in flight per SM).
- "liger": LigerFusedLinearCrossEntropyLoss (liger-kernel), for comparison.
- "auto": "triton" for CUDA tensors when Triton compiles and runs here, else "chunked".

Weight gradient accumulation (`accum_dtype`, default fp32). grad_W is a sum over chunks. In fp32
it is exact up to one final rounding to the weight dtype; accumulating in bf16 (`accum_dtype=None`,
what Liger does by default) rounds once per chunk. An fp32 accumulator costs 4*V*D bytes; for bf16
weights we avoid also holding a separate bf16 result: the first half of the vocabulary accumulates
in fp32 *inside the bytes of the bf16 output tensor*, the second half in a separate fp32 buffer,
and the final cast runs front to back so that it only overwrites fp32 values already cast (see
`_WeightGradAccumulator`). Peak = 4*V*D bytes instead of 6*V*D.

Honest design/performance note. The three GEMMs (2*N*D*V FLOPs each) are the whole cost at LM
shapes; the softmax step is memory-bound and small. What chunking trades:
- Per chunk of n rows, grad_W += G.T @ h_c is a GEMM with K = n that reads and writes all of grad_W.
  With n = 512 (Liger's choice at V/D = 32) that read-modify-write (2 GiB per chunk for a bf16
  V=131072, D=4096 head) makes the GEMM memory-bound and grad_h = G @ W has too few output tiles.
  Larger chunks (default ~4096 rows, logits capped at `_MAX_CHUNK_BYTES`) keep all three GEMMs
  compute-bound, at the cost of a larger logits buffer.
- fp32 accumulation needs 4*V*D bytes. At V=131072, D=4096 that is 2 GiB, more than Liger's whole
  bf16-accumulating peak (~1.25 GiB). With `accum_dtype=None` and `chunk_size` ~= N*D/V (Liger's)
  this module uses Liger's memory but then also runs at roughly Liger's speed. So: fp32 accuracy,
  Liger's memory, and a large speedup cannot all be had at once with 3 GEMMs; the default picks
  accuracy and speed, and the benchmark reports both settings.
- Extra memory of the default (triton, bf16, fp32 accumulation): 4*V*D (grad_W accumulator, which
  becomes the output) + chunk*V*2 (logits) + N*D*2 (grad_hidden) bytes: ~2.6 GiB at
  (N, D, V) = (16384, 4096, 131072) and ~290 MiB at (16384, 1024, 32768), against Liger's ~1.25 GiB
  and ~130 MiB. The gradients are made in the forward pass and live until backward.
- Time: 3 GEMMs at cuBLAS speed plus ~3 passes over the logits (~4 GiB of traffic at the large
  shape). Beating Liger by 15% there needs the GEMMs at >~ 85% of the measured bf16 peak; the
  benchmark reports TFLOP/s so this can be checked.
- No host sync: the number of non-ignored tokens stays on the device (Liger calls .item()).
- Backward multiplies the saved gradients by the incoming scalar in place, so calling backward twice
  through the same graph (retain_graph=True) is not supported.
- torch.compile: the chunk loop runs inside the custom op `moespeed::linear_ce_fwd`, opaque to
  Dynamo and Inductor, so compiled code calls exactly the eager kernels.
"""
import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "reference", "chunked", "triton", "liger")
REDUCTIONS = ("mean", "sum")

# Default chunk: enough rows for compute-bound GEMMs, at most this many bytes of logits per chunk.
_TARGET_CHUNK_ROWS = 4096
_MIN_CHUNK_ROWS = 128
_MAX_CHUNK_BYTES = 2**30


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   z_loss: float = 0.0, softcap: Optional[float] = None) -> Tensor:
    """The definition: materializes fp32 logits (N, V) and lets autograd differentiate it."""
    logits = hidden.float() @ weight.float().t()  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (N,)
    per_token = torch.where(valid, lse - target_logit + z_loss * lse * lse, 0.0)
    loss = per_token.sum()
    if reduction == "mean":
        loss = loss / valid.sum().clamp(min=1)
    return loss


# --------------------------------------------------------------------------------------------
# Per-chunk softmax step: per-token loss, and dloss/dlogits written over the logits
# --------------------------------------------------------------------------------------------
def _ce_chunk_torch(logits: Tensor, targets: Tensor, row_loss: Tensor, scale: Tensor,
                    ignore_index: int, z_loss: float, softcap: float, compute_grad: bool) -> None:
    """PyTorch version of the softmax step (reference for the Triton kernel).

    logits: (n, V) chunk of logits, overwritten with dloss/dlogits if `compute_grad`.
    row_loss: (n,) fp32 output, the unreduced per-token loss (0 for ignored tokens).
    scale: 0-d fp32 tensor, the loss weight of one token (1/n_valid for "mean", 1 for "sum").
    softcap: 0.0 means no soft-capping.
    """
    valid = targets != ignore_index  # (n,)
    safe_targets = torch.where(valid, targets, 0)[:, None]  # (n, 1)
    x = logits.to(torch.float32, copy=True)  # (n, V) fp32 work copy
    t = None
    if softcap:
        t = x.div_(softcap).tanh_()  # tanh(z / c), kept for the derivative
        x = t * softcap  # (n, V) capped logits
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    target_logit = x.gather(1, safe_targets).squeeze(1)  # (n,)
    row_loss.copy_(torch.where(valid, lse - target_logit + z_loss * lse * lse, 0.0))
    if not compute_grad:
        return
    weight = torch.where(valid, scale, 0.0)  # (n,) per-token loss weight
    grad = x.sub_(lse[:, None]).exp_()  # softmax, in place
    grad.mul_((weight * (1.0 + 2.0 * z_loss * lse))[:, None])
    grad.scatter_add_(1, safe_targets, -weight[:, None])
    if t is not None:
        grad.mul_(t.mul_(t).neg_().add_(1.0))  # d(c*tanh(z/c))/dz = 1 - tanh^2
    logits.copy_(grad)


if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # 1 - 2 / (exp(2x) + 1): no libdevice needed, saturates to +-1 for large |x|.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, targets_ptr, row_loss_ptr, scale_ptr,
                        n_cols, ignore_index, z_loss, softcap,
                        HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                        BLOCK_V: tl.constexpr):
        """One program per row: online logsumexp, per-token loss, gradient over the logits."""
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        in_range = valid & (target >= 0) & (target < n_cols)

        # Pass 1: running max m and running sum s of exp(x - m).
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < n_cols
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(mask, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)

        x_t = tl.load(row_ptr + tl.where(in_range, target, 0), mask=in_range, other=0.0)
        x_t = x_t.to(tl.float32)
        if HAS_SOFTCAP:
            x_t = softcap * _tanh(x_t / softcap)
        loss = tl.where(valid, lse - x_t + z_loss * lse * lse, 0.0)
        tl.store(row_loss_ptr + row, loss)

        # Pass 2: dloss/dx = w * (softmax * (1 + 2 z lse) - onehot), times dcap/dz, in place.
        if COMPUTE_GRAD:
            w = tl.where(valid, tl.load(scale_ptr), 0.0)
            a = w * (1.0 + 2.0 * z_loss * lse)
            for start in range(0, n_cols, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < n_cols
                x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    x = softcap * t
                g = tl.exp(x - lse) * a - tl.where(offs == target, w, 0.0)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_unless_one_kernel(x_ptr, g_ptr, numel, BLOCK: tl.constexpr):
        """x *= g in place, reading nothing when g == 1 (the usual incoming loss gradient)."""
        g = tl.load(g_ptr).to(tl.float32)
        if g != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


def _ce_chunk_triton(logits: Tensor, targets: Tensor, row_loss: Tensor, scale: Tensor,
                     ignore_index: int, z_loss: float, softcap: float, compute_grad: bool,
                     block: Optional[int] = None, num_warps: Optional[int] = None) -> None:
    """Triton version of `_ce_chunk_torch` (same arguments and effects).

    Default launch: blocks of up to 16384 columns and 32 warps, i.e. about one row in flight per
    SM, so that a row read by pass 1 (<= 256 KiB) is still in L2 when pass 2 reads it again.
    `block` / `num_warps` override it (the benchmark sweeps them).
    """
    n_rows, n_cols = logits.shape
    block = block or min(16384, triton.next_power_of_2(n_cols))
    num_warps = num_warps or max(1, min(32, block // 512))
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), targets, row_loss, scale,
        n_cols, ignore_index, float(z_loss), float(softcap) if softcap else 1.0,
        HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=compute_grad, BLOCK_V=block,
        num_warps=num_warps,
    )


def _scale_(x: Tensor, g: Tensor) -> Tensor:
    """x *= g in place (g a 0-d tensor), skipping the memory pass when g == 1 on CUDA."""
    if (x.is_cuda and HAS_TRITON and x.is_contiguous() and x.numel() > 0
            and not torch.compiler.is_compiling()):
        block = 4096
        _scale_unless_one_kernel[(triton.cdiv(x.numel(), block),)](x, g, x.numel(), BLOCK=block)
        return x
    return x.mul_(g)


# --------------------------------------------------------------------------------------------
# Weight-gradient accumulation
# --------------------------------------------------------------------------------------------
_MIXED_ADDMM = {"ok": True}  # set to False if this torch rejects addmm(fp32 C, bf16 A, bf16 B)


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc = a @ b (first) or acc += a @ b, accumulating in acc's dtype (fp32 possibly from bf16)."""
    beta = 0.0 if first else 1.0  # beta=0 ignores acc's (uninitialized) contents
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif acc.is_cuda and _MIXED_ADDMM["ok"]:
        try:  # cuBLAS with 16-bit A, B and fp32 C (torch >= 2.10 accepts an fp32 `self`)
            torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, TypeError) as exc:
            warnings.warn(f"linear_cross_entropy: mixed-dtype addmm unavailable ({exc}); "
                          "falling back to a 16-bit product added into the fp32 accumulator")
            _MIXED_ADDMM["ok"] = False
            _addmm_into(acc, a, b, first)
    elif acc.is_cuda:  # older torch: the chunk's product is rounded once before the fp32 sum
        product = a @ b  # (rows, D) 16-bit temporary
        if first:
            acc.copy_(product)
        else:
            acc.add_(product)
    else:  # CPU has no mixed-dtype addmm: upcast the operands
        torch.addmm(acc, a.to(acc.dtype), b.to(acc.dtype), beta=beta, out=acc)


class _WeightGradAccumulator:
    """Sums grad_W = sum_c G_c.T @ h_c over chunks; `finish()` returns it in the weight dtype.

    Accumulation is in fp32 (`fp32=True`) or in the output dtype. For an fp32 sum with a 16-bit
    output, the output tensor's own bytes (2*V*D) hold the fp32 sums of rows [0, V//2) ("lo"),
    a separate fp32 buffer holds rows [V//2, V) ("hi"), so no separate fp32 copy of grad_W lives
    next to the result.
    """

    def __init__(self, vocab: int, dim: int, out_dtype: torch.dtype, device, fp32: bool):
        self.first = True
        self.out = torch.empty(vocab, dim, dtype=out_dtype, device=device)  # (V, D)
        self.split = vocab  # rows [0, split) accumulate in `lo`, the rest in `hi`
        self.lo, self.hi = self.out, None
        if fp32 and out_dtype != torch.float32:
            if out_dtype.itemsize == 2 and (vocab * dim) % 2 == 0:
                self.split = vocab // 2
                lo_fp32 = self.out.view(-1).view(torch.float32)  # (V*D/2,) aliases out's bytes
                self.lo = lo_fp32[: self.split * dim].view(self.split, dim)  # (V//2, D)
                self.hi = torch.empty(vocab - self.split, dim, dtype=torch.float32, device=device)
            else:  # other dtypes: a plain fp32 buffer, cast at the end
                self.split = 0
                self.lo = self.out[:0]
                self.hi = torch.empty(vocab, dim, dtype=torch.float32, device=device)

    def add(self, grad_logits: Tensor, h: Tensor) -> None:
        """grad_W += grad_logits.T @ h, with grad_logits (n, V) and h (n, D)."""
        if self.split > 0:
            _addmm_into(self.lo, grad_logits[:, : self.split].t(), h, self.first)
        if self.hi is not None:
            _addmm_into(self.hi, grad_logits[:, self.split:].t(), h, self.first)
        self.first = False

    def finish(self) -> Tensor:
        """The summed gradient, (V, D) in the output dtype."""
        if self.first:  # no chunk at all (N == 0)
            return self.out.zero_()
        if self.hi is None:
            return self.out
        if self.split > 0:
            self._cast_lo_in_place()
        self.out[self.split:].copy_(self.hi)  # these bytes held lo rows that are already cast
        self.hi = None
        return self.out

    def _cast_lo_in_place(self) -> None:
        # fp32 row r sits at byte 4*r*D, its bf16 result goes to byte 2*r*D. Casting rows [a, b)
        # with b <= 2a writes bytes [2aD, 2bD), which hold fp32 rows [a/2, b/2), all < a and so
        # already cast, and never the rows [a, b) being read. Rows [0, a0) go through a copy.
        a = min(self.split, 64)
        self.out[:a].copy_(self.lo[:a].clone())
        while a < self.split:
            b = min(2 * a, self.split)
            self.out[a:b].copy_(self.lo[a:b])
            a = b


class _WeightGradStream:
    """Runs each chunk's grad_W product on a side CUDA stream, overlapped with its grad_h product.

    Both products only read the chunk's gradient buffer; the next chunk's logits GEMM overwrites
    it, so the current stream waits for the side stream's previous product first
    (`before_overwrite`). With a bf16 accumulator and small chunks the grad_W product is bound by
    the read-modify-write of grad_W (4*V*D bytes per chunk) while grad_h = G @ W has few output
    tiles, so running them side by side could fill the GPU better. Measured on an H100 it gains
    nothing (94.5 vs 95.4 ms at N=16384, D=4096, V=131072, 512-row chunks: each cuBLAS kernel takes
    every SM), so `overlap` is off by default. A no-op on CPU.
    """

    _streams: dict = {}

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"
        self.done = None  # event: the side stream's last product has finished
        if self.enabled:
            self.main = torch.cuda.current_stream(device)
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            self.side = self._streams[device]

    def before_overwrite(self) -> None:
        if self.done is not None:
            self.main.wait_event(self.done)

    @contextlib.contextmanager
    def run(self):
        """Context: the work inside runs on the side stream after all queued main-stream work."""
        if not self.enabled:
            yield
            return
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            yield
            self.done = torch.cuda.Event()
            self.done.record(self.side)

    def join(self) -> None:
        """The current stream waits for everything queued on the side stream."""
        if self.enabled:
            self.main.wait_stream(self.side)


# --------------------------------------------------------------------------------------------
# The chunked forward (computes the loss and both gradients)
# --------------------------------------------------------------------------------------------
def lean_chunk_size(n_tokens: int, dim: int, vocab: int) -> int:
    """Liger's chunk: the next power of two of N / ceil(V / D) rows, so that a chunk's logits take
    about as many bytes as the hidden states."""
    rows = -(-n_tokens // -(-vocab // dim))  # ceil(N / ceil(V / D))
    return max(1, min(n_tokens, 1 << max(0, (rows - 1).bit_length())))


MEMORY_MODES = ("fast", "lean")


def memory_settings(memory: str, n_tokens: int, dim: int, vocab: int, itemsize: int):
    """(chunk_size, accum_dtype) of a memory mode.

    fast: ~4096-row chunks and an fp32 weight-gradient accumulator (exact sum, more memory).
    lean: Liger's chunk size and accumulation in the weight dtype (Liger's memory, its speed).
    """
    if memory == "fast":
        return default_chunk_size(n_tokens, vocab, itemsize), torch.float32
    if memory == "lean":
        return lean_chunk_size(n_tokens, dim, vocab), None
    raise ValueError(f"linear_cross_entropy: memory={memory!r}; choose one of {', '.join(MEMORY_MODES)}")


def default_chunk_size(n_tokens: int, vocab: int, itemsize: int) -> int:
    """~4096 rows, fewer when a chunk's logits would pass `_MAX_CHUNK_BYTES` (>= 128 rows)."""
    rows = min(_TARGET_CHUNK_ROWS, _MAX_CHUNK_BYTES // max(1, vocab * itemsize))
    return max(1, min(n_tokens, max(_MIN_CHUNK_ROWS, rows)))


def _chunked_forward(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                     mean: bool, z_loss: float, softcap: float, chunk_size: int, backend: str,
                     fp32_accum: bool, overlap: bool, need_grad_h: bool, need_grad_w: bool):
    """Loss and (unscaled) gradients of hidden and weight, one chunk of tokens at a time.

    backend: "triton", "chunked", or "auto" (decided here, at run time, outside torch.compile).
    """
    hidden, targets = hidden.contiguous(), targets.contiguous()
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # GEMM operand (V, D)
    use_triton = backend == "triton" or (backend == "auto" and triton_works(hidden.device.type))
    ce_chunk = _ce_chunk_triton if use_triton else _ce_chunk_torch
    valid = targets != ignore_index
    if mean:
        scale = 1.0 / valid.sum().clamp(min=1).to(torch.float32)  # 0-d, stays on device
    else:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    row_loss = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_grad_h else hidden.new_empty(0)
    acc = (_WeightGradAccumulator(vocab, dim, weight.dtype, hidden.device, fp32_accum)
           if need_grad_w else None)
    compute_grad = need_grad_h or need_grad_w
    chunk_size = max(1, min(chunk_size, n_tokens))
    logits_buf = hidden.new_empty(chunk_size, vocab)  # (chunk, V), reused by every chunk
    side = _WeightGradStream(hidden.device, enabled=overlap and need_grad_w and need_grad_h)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h = hidden[start:end]  # (n, D)
        logits = logits_buf[: end - start]  # (n, V)
        side.before_overwrite()  # the previous chunk's grad_W product has read the buffer
        torch.mm(h, w.t(), out=logits)
        ce_chunk(logits, targets[start:end], row_loss[start:end], scale,
                 ignore_index, z_loss, softcap, compute_grad)  # logits now hold dloss/dlogits
        if need_grad_w:
            with side.run():  # on a side stream when overlapping, concurrent with grad_h below
                acc.add(logits, h)
        if need_grad_h:
            torch.mm(logits, w, out=grad_h[start:end])
    side.join()
    del logits_buf
    loss = row_loss.sum() * scale
    grad_w = acc.finish() if need_grad_w else weight.new_empty(0)
    return loss, grad_h, grad_w


@torch.library.custom_op("moespeed::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                   mean: bool, z_loss: float, softcap: float, chunk_size: int, backend: str,
                   fp32_accum: bool, overlap: bool, need_grad_h: bool, need_grad_w: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Custom op around `_chunked_forward`: opaque to torch.compile, so compile runs it as is."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked_forward(hidden, weight, targets, ignore_index, mean, z_loss, softcap,
                                chunk_size, backend, fp32_accum, overlap, need_grad_h, need_grad_w)


@_linear_ce_fwd.register_fake
def _(hidden, weight, targets, ignore_index, mean, z_loss, softcap, chunk_size, backend,
      fp32_accum, overlap, need_grad_h, need_grad_w):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if need_grad_h else hidden.new_empty(0)
    grad_w = torch.empty_like(weight) if need_grad_w else weight.new_empty(0)
    return loss, grad_h, grad_w


class _FusedLinearCE(torch.autograd.Function):
    """Gradients come from the forward; backward scales them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, mean, z_loss, softcap, chunk_size,
                backend, fp32_accum, overlap, need_grad_h, need_grad_w):
        loss, grad_h, grad_w = torch.ops.moespeed.linear_ce_fwd(
            hidden, weight, targets, ignore_index, mean, z_loss, softcap, chunk_size,
            backend, fp32_accum, overlap, need_grad_h, need_grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.need = (need_grad_h, need_grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = _scale_(grad_h, grad_loss) if ctx.need[0] else None
        grad_w = _scale_(grad_w, grad_loss) if ctx.need[1] else None
        return (grad_h, grad_w) + (None,) * 11


# --------------------------------------------------------------------------------------------
# Backend selection and the public function
# --------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_works(device_type: str) -> bool:
    """True if the Triton softmax kernel compiles and matches PyTorch on a tiny input here."""
    if not HAS_TRITON or not (device_type == "cuda" or _interpreting()):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        logits = torch.randn(3, 37, generator=gen).to(device_type)
        targets = torch.tensor([1, -100, 36], device=device_type)
        scale = torch.tensor(0.5, device=device_type)
        out = [torch.empty(3, device=device_type) for _ in range(2)]
        grads = [logits.clone(), logits.clone()]
        _ce_chunk_triton(grads[0], targets, out[0], scale, -100, 1e-3, 0.0, True)
        _ce_chunk_torch(grads[1], targets, out[1], scale, -100, 1e-3, 0.0, True)
        return bool(torch.allclose(out[0], out[1], atol=1e-4)
                    and torch.allclose(grads[0], grads[1], atol=1e-5))
    except Exception as exc:  # noqa: BLE001 - any compile/launch failure means "fall back"
        warnings.warn(f"linear_cross_entropy: Triton kernel unusable ({exc!r}); using 'chunked'")
        return False


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ValueError if `backend` cannot run on `device` here (unknown, no Triton/CUDA, no liger-kernel)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_cross_entropy: backend={backend!r} is unknown; "
                         f"choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and not (HAS_TRITON and (device.type == "cuda" or _interpreting())):
        raise ValueError("linear_cross_entropy: backend='triton' needs triton and CUDA tensors "
                         "(or TRITON_INTERPRET=1); use backend='chunked' or 'auto'")
    if backend == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("linear_cross_entropy: backend='liger' needs liger-kernel "
                         "(pip install liger-kernel)")


def _check_args(hidden, weight, targets, reduction, z_loss, softcap, chunk_size) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (..., D) and weight (V, D) must share D; "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets must have shape {tuple(hidden.shape[:-1])}"
                         f" (hidden without its last dim); got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integer class ids, "
                         f"got {targets.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; choose 'mean' or 'sum'")
    if z_loss < 0:
        raise ValueError(f"linear_cross_entropy: z_loss={z_loss} must be >= 0")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap={softcap} must be > 0 or None")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size} must be >= 1 or None")


def _liger_loss(hidden, weight, targets, ignore_index, reduction, z_loss, softcap, accum_dtype):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        raise ValueError("linear_cross_entropy: backend='liger' needs liger-kernel "
                         "(pip install liger-kernel)") from exc
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        ignore_index=ignore_index, lse_square_scale=z_loss, reduction=reduction,
        softcap=softcap, accum_dtype=accum_dtype)
    return loss_fn(weight, hidden, targets)  # Liger's argument order: (weight, input, target)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                         softcap: Optional[float] = None, backend: str = "auto",
                         chunk_size: Optional[int] = None,
                         accum_dtype: Optional[torch.dtype] = torch.float32,
                         overlap: bool = False) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without materializing the logits.

    hidden: (N, D) or (..., D) float (bf16/fp16/fp32); weight: (V, D), e.g. a tied embedding;
    targets: (N,) or (...) int64 class ids in [0, V), or `ignore_index`.
    reduction: "mean" over non-ignored tokens (0 if there are none) or "sum".
    z_loss: adds z_loss * logsumexp(logits)**2 per non-ignored token, reduced like the loss.
    softcap: c applies c * tanh(logits / c) before the softmax (Gemma 2).
    backend: "auto" | "triton" | "chunked" | "reference" | "liger" (see the module docstring).
    chunk_size: tokens per chunk (default: `default_chunk_size`, ~4096 rows).
    accum_dtype: torch.float32 (default) sums the weight gradient in fp32; None sums it in the
        weight's dtype like Liger (less memory, one rounding per chunk).
    overlap: on CUDA, run each chunk's weight-gradient product on a side stream, concurrently with
        its hidden-gradient product (same results; see `_WeightGradStream`). Off by default: on an
        H100 it measured no gain (94.5 vs 95.4 ms at N=16384, D=4096, V=131072, 512-row chunks).
    Under autocast the GEMMs run in the autocast dtype. Returns a 0-d fp32 tensor.
    """
    _check_args(hidden, weight, targets, reduction, z_loss, softcap, chunk_size)
    check_backend(backend, hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    targets = targets.reshape(-1).long()  # (N,)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    if backend == "reference":
        return reference_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index,
                                              reduction=reduction, z_loss=z_loss, softcap=softcap)
    if backend == "liger":
        return _liger_loss(hidden, weight, targets, ignore_index, reduction, z_loss, softcap,
                           accum_dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.element_size())
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    args = (hidden, weight, targets, ignore_index, reduction == "mean", float(z_loss),
            float(softcap or 0.0), int(chunk_size), backend,
            accum_dtype == torch.float32, bool(overlap), need_h, need_w)
    if not (need_h or need_w):
        return torch.ops.moespeed.linear_ce_fwd(*args)[0]
    return _FusedLinearCE.apply(*args)
