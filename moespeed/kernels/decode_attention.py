"""Attention of a few new query rows over a KV cache (decoding): a fused Triton flash-decoding kernel
and its PyTorch reference.

    out = decode_attention(q, k, v, q_pos, scale, window=None, slopes=None, v_dim=0, kernel="auto")

q (B, Hkv, R, dk): the R = T * G query rows of each key/value head, ordered (token t, head g) -- the
G query heads sharing a key/value head are folded into the rows (MHA: G = 1; GQA; MLA's absorbed
decode: one latent "kv head" shared by all H heads). k (B, Hkv, S, dk), v (B, Hkv, S, dv) hold
positions 0..S-1 (strided views of a larger cache are fine). v = None with v_dim > 0: the values are
k's first v_dim columns (MLA: the latent is both key and value). Row r of token t sees key position
s iff s <= q_pos[t] (and q_pos[t] - s < window); ALiBi adds slopes[h * G + g] * (s - q_pos[t]).
Returns (B, Hkv, R, dv) in k's dtype.

The reference materializes the (B, Hkv, R, S) fp32 scores: matmul, mask, softmax, matmul, so the
cache is read twice. The Triton kernel reads every cached key block once: it splits S into chunks
(enough programs to fill the GPU even at batch 1), keeps an online softmax per chunk and combines
the chunks by their log-sum-exp (flash-decoding). Key blocks past the last query position or before
the window are never read, so a static cache larger than the context costs nothing. With v = None
the key tile is reused as the value tile; the key dims are then handled as [v_dim | dk - v_dim]
(e.g. latent 256 | rope 32), each padded to a power of two.
`kernel`: auto = triton for CUDA tensors when Triton is installed, else the reference.
"""
import functools

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs
    triton = tl = None
    HAS_TRITON = False

KERNELS = ("auto", "triton", "torch")


# ------------------------------------------------------------------------------------- reference
def decode_attention_reference(q, k, v, q_pos, scale: float, window=None, slopes=None, v_dim: int = 0):
    """The definition: (B, Hkv, R, S) fp32 scores, masked softmax, weighted sum of v."""
    v = k[..., :v_dim] if v is None else v
    B, Hkv, R, _ = q.shape
    S, T = k.shape[2], q_pos.shape[0]
    scores = (q.to(k.dtype) @ k.transpose(-1, -2)).float() * scale  # (B, Hkv, R, S)
    scores = scores.view(B, Hkv, T, R // T, S)  # (B, Hkv, T, G, S)
    kv_pos = torch.arange(S, device=q.device)
    distance = q_pos[:, None] - kv_pos[None, :]  # (T, S)
    if slopes is not None:  # (Hkv * G,) -> (Hkv, 1, G, 1) times (T, 1, S)
        scores = scores - slopes.float().view(Hkv, 1, R // T, 1) * distance[:, None, :].float()
    keep = distance >= 0
    if window is not None:
        keep = keep & (distance < window)
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))  # (T, S) -> (T, 1, S)
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, R, S)
    return probs @ v  # (B, Hkv, R, dv)


# ---------------------------------------------------------------------------------------- triton
if HAS_TRITON:

    @triton.jit
    def _decode_chunk_kernel(Q, K, V, POS, WIN, SLOPES, O, LSE, S, R, G, chunk, scale, n_kv_heads,
                             sq_b, sq_h, sq_r, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                             so_b, so_h, so_c, so_r, sl_b, sl_h, sl_c,
                             DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DA_P: tl.constexpr,
                             DB_P: tl.constexpr, DV_P: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_N: tl.constexpr, V_IN_K: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             HAS_ALIBI: tl.constexpr):
        """One (chunk of keys, batch x kv head): normalized partial output (R, DV) and its LSE (R,)."""
        chunk_id = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = bh // n_kv_heads, bh % n_kv_heads
        rows = tl.arange(0, BLOCK_R)
        row_ok = rows < R
        q_pos = tl.load(POS + rows // G, mask=row_ok, other=0)  # (BLOCK_R,) position of each row's token
        da = tl.arange(0, DA_P)
        q_ptr = Q + b * sq_b + h * sq_h + rows[:, None] * sq_r
        qa = tl.load(q_ptr + da[None, :], mask=row_ok[:, None] & (da[None, :] < DA), other=0.0)
        if DB > 0:
            db = tl.arange(0, DB_P)
            qb = tl.load(q_ptr + DA + db[None, :], mask=row_ok[:, None] & (db[None, :] < DB), other=0.0)
        if HAS_WINDOW:
            window = tl.load(WIN)
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h * G + rows % G, mask=row_ok, other=0.0)
        dv = tl.arange(0, DV_P)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, DV_P], tl.float32)
        start = chunk_id * chunk
        end = tl.minimum(start + chunk, S)
        end = tl.minimum(end, tl.max(tl.where(row_ok, q_pos, 0)) + 1)  # nothing after the last query
        if HAS_WINDOW:  # nothing before the first query's window
            start = tl.maximum(start, tl.min(tl.where(row_ok, q_pos, S)) - window + 1)
        k_base = K + b * sk_b + h * sk_h
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            ka = tl.load(k_base + cols[:, None] * sk_s + da[None, :], mask=col_ok[:, None] & (da[None, :] < DA),
                         other=0.0)
            s = tl.dot(qa, tl.trans(ka))  # (BLOCK_R, BLOCK_N) fp32
            if DB > 0:
                kb = tl.load(k_base + cols[:, None] * sk_s + DA + db[None, :],
                             mask=col_ok[:, None] & (db[None, :] < DB), other=0.0)
                s += tl.dot(qb, tl.trans(kb))
            s = s * scale
            distance = q_pos[:, None] - cols[None, :]
            if HAS_ALIBI:
                s -= slope[:, None] * distance.to(tl.float32)
            keep = col_ok[None, :] & (distance >= 0)
            if HAS_WINDOW:
                keep = keep & (distance < window)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IN_K:
                v = ka  # DA == DV: the value is the key's first DV columns
            else:
                v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_s + dv[None, :],
                            mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
        o_ptr = O + b * so_b + h * so_h + chunk_id * so_c + rows[:, None] * so_r + dv[None, :]
        tl.store(o_ptr, out, mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(LSE + b * sl_b + h * sl_h + chunk_id * sl_c + rows, lse, mask=row_ok)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot_dim(n: int) -> int:
    """A head-dim block for tl.dot: a power of two >= 16 (GPU dots need K >= 16; the loads mask the pad)."""
    return max(16, _pow2(n))


# Launch parameters of the Triton kernel. block_n None: 64 keys per block when a padded key or value
# part is >= 256 wide, else 128. The decode benchmark's --kernel-sweep measures the alternatives.
LAUNCH = {"programs_per_sm": 2, "block_n": None, "num_warps": 4, "num_stages": 2}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _n_programs_target(device: torch.device) -> int:
    """About LAUNCH["programs_per_sm"] waves of programs (4 programs when interpreting on CPU)."""
    return LAUNCH["programs_per_sm"] * _sm_count(device) if device.type == "cuda" else 4


def _chunking(S: int, n_bh: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(keys per chunk, number of chunks): enough chunks to fill the GPU, each a multiple of block_n."""
    blocks = triton.cdiv(S, block_n)
    n_chunks = max(1, min(blocks, triton.cdiv(_n_programs_target(device), n_bh)))
    chunk = triton.cdiv(blocks, n_chunks) * block_n
    return chunk, triton.cdiv(S, chunk)


def _decode_triton(q, k, v, q_pos, window, slopes, scale: float, v_dim: int) -> torch.Tensor:
    B, Hkv, R, dk = q.shape
    v_in_k = v is None
    S, dv, T = k.shape[2], v_dim if v_in_k else v.shape[-1], q_pos.shape[0]
    q = q.to(k.dtype).contiguous()
    da, db = (dv, dk - dv) if v_in_k else (dk, 0)
    block_r = max(16, _pow2(R))
    block_n = LAUNCH["block_n"] or (64 if max(_pow2(da), _pow2(dv)) >= 256 else 128)
    chunk, n_chunks = _chunking(S, B * Hkv, block_n, q.device)
    o = torch.empty(B, Hkv, n_chunks, R, dv, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hkv, n_chunks, R, device=q.device, dtype=torch.float32)
    dummy = q_pos  # stands in for absent optional pointers (never read)
    v = k if v_in_k else v
    _decode_chunk_kernel[(n_chunks, B * Hkv)](
        q, k, v, q_pos, window if window is not None else dummy, slopes if slopes is not None else dummy,
        o, lse, S, R, R // T, chunk, scale, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        DA=da, DB=db, DV=dv, DA_P=_dot_dim(da), DB_P=_dot_dim(db), DV_P=_dot_dim(dv), BLOCK_R=block_r,
        BLOCK_N=block_n, V_IN_K=v_in_k, HAS_WINDOW=window is not None, HAS_ALIBI=slopes is not None,
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])
    weights = torch.softmax(lse, dim=2)  # (B, Hkv, n_chunks, R): each chunk's share of the total
    return (weights[..., None] * o).sum(dim=2).to(k.dtype)  # (B, Hkv, R, dv)


@torch.library.custom_op("moespeed::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_pos: torch.Tensor, scale: float,
               window: torch.Tensor | None, slopes: torch.Tensor | None, v_dim: int) -> torch.Tensor:
    return _decode_triton(q, k, v, q_pos, window, slopes, scale, v_dim)


@_decode_op.register_fake
def _(q, k, v, q_pos, scale, window, slopes, v_dim):
    return q.new_empty(*q.shape[:-1], v_dim if v is None else v.shape[-1], dtype=k.dtype)


# ------------------------------------------------------------------------------------ dispatch
def decode_attention(q, k, v, q_pos, scale: float, window=None, slopes=None, v_dim: int = 0,
                     kernel: str = "auto"):
    """Decode attention (see the module docstring); kernel = auto | triton | torch."""
    use_triton = kernel == "triton" or (kernel == "auto" and q.is_cuda and HAS_TRITON)
    if use_triton and not HAS_TRITON:
        raise RuntimeError("decode_attention: kernel='triton' needs triton installed; use 'torch' or 'auto'")
    if use_triton:
        return _decode_op(q, k, v, q_pos, scale, window, slopes, v_dim)
    return decode_attention_reference(q, k, v, q_pos, scale, window, slopes, v_dim)
