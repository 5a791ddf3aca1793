"""PEER kernels (Triton) and the plain-PyTorch references they must match.

A PEER layer has two parts, each with a reference here (the CPU path) and fused kernels (CUDA):

1. Retrieval (`product_key_topk_*`): per token and head, the top k of n * n experts by product
   keys. The fused kernel computes the 2 * n sub-key scores tile by tile (tl.dot), keeps a running
   top-k per sub-key set in registers, combines the k * k candidates and writes only the k
   scores (fp32) and expert ids; the (tokens, heads, 2, n) score tensor is never stored. Its
   backward recomputes nothing: the gradient of a selected score s = q1 . K1[i1] + q2 . K2[i2]
   goes to the two sub-queries (a gather of k sub-keys each) and to the selected sub-keys
   (a deterministic sum per sub-key over the selections sorted by sub-key).
2. Expert mix (`peer_experts_*`), after retrieval, for T tokens that each selected P
   single-neuron experts (P = heads * experts_per_head * expert_hidden_size, one "pair" per
   selected neuron):

       h[t, p] = down[rows[t, p]] . x[t]                       # (T, P)
       y[t]    = sum_p w[t, p] * act(h[t, p]) * up[rows[t, p]]  # (T, D)

   `down` and `up` are (R, D) tables (R up to millions of rows); `w` holds the softmax retrieval
   weights. The reference gathers the selected rows into (T, P, D) tensors; the kernels never do:
   - forward, one program per token: stream its P rows of `down` and `up` tile by tile (the next
     tile's rows and the tile after's indices are in flight while a tile is used), keep y[t] in
     registers, save h (T, P) fp32.
   - backward, no atomics, pairs sorted by table row (stable sort: deterministic sums):
     a. pairs kernel, per block of rows r of `up`: for each pair that selected r,
        g = dy[t] . up[r], grad_w = g * act(h), grad_h = g * w * act'(h); with dense gradients
        also grad_up[r] = sum w * act(h) * dy[t] (fp32 registers, written once, zeros where
        unselected);
     b. rows-sum kernel, per block of rows r of `down`: grad_down[r] = sum grad_h * x[t];
     c. per token: grad_x[t] = sum_p grad_h[t, p] * down[rows[t, p]].
     a and b each re-read one (T, D) activation per pair (dy, then x: 16 MiB each at 8192 x 1024
     bf16) and ask L2 to keep it; one pass with both (32 MiB) would compete with the streamed
     gradient writes for the 50 MB L2 (by reasoning; the split also halves the registers a row
     needs, so more rows are in flight).
   - deferred table gradients (`TableGradFactors`): the backward runs a (without grad_up) and c,
     and keeps the factors (rows, grad_h, w * act(h), x, dy) of grad_down and grad_up;
     `peer_table_step` runs the rows-sum kernel once per table in update mode (row-wise SGD or
     lazy AdamW on the selected rows), so no gradient buffer of the tables' size ever exists.

DRAM traffic of the expert mix per step (s = bytes per table element, pairs = T * P):
forward 2 * pairs * D * s; backward, dense: touched_rows * D * s (up rows, a) + pairs * D * s
(down rows, c) + 2 * R * D * s (the dense gradients, written once); deferred: the same without the
gradients, and the step reads and writes the touched rows (4 * touched_rows * D * s, plus the
fp32 moments for AdamW).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # triton is optional: the references are the CPU path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

HAS_TRITON = triton is not None
ACTIVATIONS = ("relu2", "gelu")
TABLE_OPTIMIZERS = ("adamw", "sgd")


def activation_fn(name: str, h: torch.Tensor) -> torch.Tensor:
    """The expert activation by name: relu2 = relu(h)^2, gelu = exact (erf) GELU."""
    if name == "relu2":
        return F.relu(h).square()
    if name == "gelu":
        return F.gelu(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act / d h for `activation_fn` (fp32 in, fp32 out)."""
    if name == "relu2":
        return 2.0 * F.relu(h)
    cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
    return cdf + h * 0.3989422804014327 * torch.exp(-0.5 * h * h)


def triton_usable(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA tensors, or any tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ============================================================================ references
def product_key_topk_reference(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts by product keys, scoring 2 * n sub-keys and k * k candidates, never all n * n.

    q: (..., G, 2, dk) sub-queries, G = groups (heads); keys: (G or 1, 2, n, dk) sub-keys
    (one set shared by all groups when its first dim is 1). Scores are computed in fp32.
    Returns scores (..., G, k) fp32, descending, and expert ids (..., G, k) int64 in
    [0, n * n), id = i1 * n + i2.
    """
    n = keys.shape[2]
    q, keys = q.float(), keys.float()
    if keys.shape[0] == 1:
        sim = torch.einsum("...gcd,cnd->...gcn", q, keys[0])           # (..., G, 2, n)
    else:
        sim = torch.einsum("...gcd,gcnd->...gcn", q, keys)             # (..., G, 2, n)
    sub_scores, sub_ids = sim.topk(k, dim=-1)                          # (..., G, 2, k)
    cand = sub_scores[..., 0, :, None] + sub_scores[..., 1, None, :]   # (..., G, k, k)
    cand_ids = sub_ids[..., 0, :, None] * n + sub_ids[..., 1, None, :]  # (..., G, k, k)
    scores, pos = cand.flatten(-2).topk(k, dim=-1)                     # (..., G, k)
    ids = cand_ids.flatten(-2).gather(-1, pos)                         # (..., G, k)
    return scores, ids


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


class TableGradFactors:
    """Deferred gradients of one PEER layer's `down` and `up` tables, kept as factors.

    Each backward adds a part (rows (T, P), coef_down = grad_h (T, P), coef_up = w * act(h)
    (T, P), x (T, D), dy (T, D)); the gradients they stand for are
        grad_down[r] = sum over pairs (t, p) with rows[t, p] = r of coef_down[t, p] * x[t]
        grad_up[r]   = sum over the same pairs of coef_up[t, p] * dy[t].
    Several parts (gradient accumulation) simply add. `peer_table_step` consumes them.
    """

    def __init__(self):
        self.parts: list[tuple[torch.Tensor, ...]] = []

    def add(self, rows, coef_down, coef_up, x, dy) -> None:
        self.parts.append((rows, coef_down, coef_up, x, dy))

    def clear(self) -> None:
        self.parts = []

    def merged(self) -> tuple[torch.Tensor, ...]:
        """All parts as one: rows (M, P) int32, coef_down, coef_up (M, P) fp32, x, dy (M, D)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return tuple(torch.cat(ts) for ts in zip(*self.parts))

    def dense(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense fp32 gradients (num_rows, D) of down and up (reference; for tests and checks)."""
        rows, cd, cu, x, dy = self.merged()
        flat = rows.reshape(-1).long()                                     # (M * P,)
        g_down = torch.zeros(num_rows, x.shape[1], device=x.device, dtype=torch.float32)
        g_up = torch.zeros_like(g_down)
        g_down.index_add_(0, flat, (cd[..., None] * x.float()[:, None, :]).reshape(-1, x.shape[1]))
        g_up.index_add_(0, flat, (cu[..., None] * dy.float()[:, None, :]).reshape(-1, x.shape[1]))
        return g_down, g_up


def table_step_reference(factors: TableGradFactors, down: torch.Tensor, up: torch.Tensor,
                         states: dict, hp: dict) -> None:
    """Row-wise update of the rows selected since the last step (in place), from the factors.

    hp: algorithm ("sgd" | "adamw"), lr_down, lr_up, wd_down, wd_up, and for adamw beta1,
    beta2, eps, step (the bias-correction count). Lazy AdamW: only selected rows' moments and
    weights change (decoupled weight decay too); states holds fp32 exp_avg_*/exp_avg_sq_*.
    """
    g_down, g_up = factors.dense(down.shape[0])
    touched = torch.unique(factors.merged()[0].reshape(-1).long())          # (U,)
    for name, table, grad in (("down", down, g_down), ("up", up, g_up)):
        lr, wd = hp["lr_" + name], hp["wd_" + name]
        g = grad[touched]                                                  # (U, D)
        p = table[touched].float() * (1.0 - lr * wd)
        if hp["algorithm"] == "adamw":
            m, v = states["exp_avg_" + name], states["exp_avg_sq_" + name]
            m[touched] = hp["beta1"] * m[touched] + (1 - hp["beta1"]) * g
            v[touched] = hp["beta2"] * v[touched] + (1 - hp["beta2"]) * g * g
            bc1, bc2 = 1 - hp["beta1"] ** hp["step"], 1 - hp["beta2"] ** hp["step"]
            p = p - lr * (m[touched] / bc1) / ((v[touched] / bc2).sqrt() + hp["eps"])
        else:
            p = p - lr * g
        table[touched] = p.to(table.dtype)


# ============================================================================ entry points
@torch.compiler.disable  # a clean graph break under torch.compile: the kernels launch eagerly
def product_key_topk_triton(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused retrieval, same contract as `product_key_topk_reference` (gradients for q and keys)."""
    if not HAS_TRITON:
        raise RuntimeError("product_key_topk_triton needs triton; use product_key_topk_reference")
    return _ProductKeyTopK.apply(q, keys, k)


@torch.compiler.disable
def peer_experts_triton(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, down: torch.Tensor,
                        up: torch.Tensor, activation: str,
                        table_grad: TableGradFactors | None = None) -> torch.Tensor:
    """Fused expert mix, same contract as `peer_experts_reference` (gradients for x, w, down, up).

    With `table_grad`, the backward gives no gradient to `down` and `up` and adds its factors
    to `table_grad` instead (see `TableGradFactors`).
    """
    if not HAS_TRITON:
        raise RuntimeError("peer_experts_triton needs triton; use peer_experts_reference")
    return _PEERExperts.apply(x, rows, w, down, up, activation, table_grad, True)


def peer_experts_deferred_reference(x, rows, w, down, up, activation, table_grad: TableGradFactors):
    """`peer_experts_triton` with deferred table gradients, in PyTorch (the CPU path)."""
    return _PEERExperts.apply(x, rows, w, down, up, activation, table_grad, False)


@torch.no_grad()
def peer_table_step(factors: TableGradFactors, down: torch.Tensor, up: torch.Tensor,
                    states: dict, hp: dict) -> None:
    """Apply `table_step_reference`'s update with the fused kernel where Triton runs."""
    if not factors.parts:
        return
    if not triton_usable(down.device):
        table_step_reference(factors, down, up, states, hp)
        return
    rows, cd, cu, x, dy = (t.contiguous() for t in factors.merged())
    R, D = down.shape
    order, offsets = _sort_by_row(rows, R)
    adam = hp["algorithm"] == "adamw"
    bc1 = 1 - hp["beta1"] ** hp["step"] if adam else 1.0
    bc2 = 1 - hp["beta2"] ** hp["step"] if adam else 1.0
    # a fixed config (an in-place update cannot be autotuned): one row per program, few warps,
    # so that many rows are in flight (the kernel is latency-bound: offsets -> order -> rows)
    block_d, block_r = triton.next_power_of_2(D), 1
    for name, table, coef, src in (("down", down, cd, x), ("up", up, cu, dy)):
        m, v = (states["exp_avg_" + name], states["exp_avg_sq_" + name]) if adam else (table, table)
        assert not adam or (m.is_contiguous() and v.is_contiguous())
        _peer_rows_sum_kernel[(triton.cdiv(R, block_r),)](
            src, coef, order, offsets, table, m, v, R, rows.shape[1], D, src.stride(0), table.stride(0),
            hp["lr_" + name], hp["wd_" + name], hp.get("beta1", 0.0), hp.get("beta2", 0.0),
            hp.get("eps", 0.0), bc1, bc2, MODE=2 if adam else 1, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=max(1, min(4, block_d // 512)))


# ============================================================================ Triton kernels
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

    # ------------------------------------------------------------------------ retrieval
    @triton.jit
    def _top_sorted(vals, ids, KP: tl.constexpr):
        """The KP largest of each row of vals (BM, W) with their ids, sorted descending (KP passes)."""
        col = tl.arange(0, vals.shape[1])                                         # (W,)
        slot = tl.arange(0, KP)
        top_v = tl.full([vals.shape[0], KP], float("-inf"), tl.float32)
        top_i = tl.zeros([vals.shape[0], KP], dtype=ids.dtype)
        for i in range(KP):
            m = tl.max(vals, 1)                                                   # (BM,)
            pick = tl.min(tl.where(vals == m[:, None], col[None, :], vals.shape[1]), 1)  # lowest column
            chosen = col[None, :] == pick[:, None]                                # (BM, W)
            top_i = tl.where(slot[None, :] == i, tl.sum(tl.where(chosen, ids, 0), 1)[:, None], top_i)
            top_v = tl.where(slot[None, :] == i, m[:, None], top_v)
            vals = tl.where(chosen, float("-inf"), vals)
        return top_v, top_i

    @triton.jit
    def _insert(best, best_id, x, x_id, slot, KP: tl.constexpr):
        """Running top-K: put x (BM,) in place of the K-th best of best (BM, KP) where x beats it.
        Slots >= K hold +inf, so they are never replaced."""
        kth = tl.min(best, 1)                                                    # (BM,)
        low = tl.min(tl.where(best == kth[:, None], slot[None, :], KP), 1)       # slot of the K-th best
        hit = (slot[None, :] == low[:, None]) & (x > kth)[:, None]
        return tl.where(hit, x[:, None], best), tl.where(hit, x_id[:, None], best_id)

    @triton.jit
    def _subkey_topk(q, key_ptr, n, stride_kn, offs_d, mask_d,
                     K: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr):
        """Top-K of q . key[i] over n sub-keys, streaming BLOCK_N keys at a time.

        q (BM, BLOCK_DK) sub-queries; key_ptr -> (n, dk) sub-keys, row stride stride_kn.
        Returns values (BM, KP) fp32 sorted descending and ids (BM, KP) int32; slots >= K are -inf.
        A chunk's scores that beat the running K-th best are inserted largest first; later
        chunks, where few scores qualify, take few passes.
        """
        slot = tl.arange(0, KP)
        best = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros([q.shape[0], KP], tl.float32)
        best_id = tl.zeros([q.shape[0], KP], dtype=tl.int32)
        for n0 in range(0, n, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n
            kt = tl.load(key_ptr + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=mask_d[:, None] & mask_n[None, :], other=0.0)        # (BLOCK_DK, BLOCK_N)
            s = tl.dot(q, kt, input_precision="ieee")                            # (BM, BLOCK_N) fp32
            s = tl.where(mask_n[None, :], s, float("-inf"))
            todo = tl.sum((s > tl.min(best, 1)[:, None]).to(tl.int32), 1)        # scores that qualify
            for _ in range(tl.minimum(tl.max(todo, 0), K)):
                m = tl.max(s, 1)                                                 # best left in chunk
                j = tl.min(tl.where(s == m[:, None], offs_n[None, :], n), 1)     # its (lowest) column
                s = tl.where(offs_n[None, :] == j[:, None], float("-inf"), s)
                best, best_id = _insert(best, best_id, m, j, slot, KP)
        best = tl.where(slot[None, :] < K, best, float("-inf"))
        return _top_sorted(best, best_id, KP)

    @triton.jit
    def _column(t, slot, a):
        """Column a of t (BM, KP) as (BM,)."""
        return tl.sum(tl.where(slot[None, :] == a, t, 0), 1)

    @triton.jit
    def _pk_topk_kernel(q_ptr, key_ptr, score_ptr, id_ptr, T, H, n, dk,
                        stride_qt, stride_qh, stride_qc, stride_kp, stride_kc, stride_kn,
                        K: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, KP: tl.constexpr):
        """Programs (token blocks, heads): top-K experts of BLOCK_M tokens for one head.

        q (T, H, 2, dk), keys (pools, 2, n, dk) -> scores (T, H, K) fp32 desc, ids (T, H, K) int64.
        Candidates: v1[a] + v2[b] with both lists sorted, so only (a + 1) * (b + 1) <= K can be
        in the top K (each other one has K candidates at least as large): ~K log K insertions.
        """
        head = tl.program_id(1)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        offs_d = tl.arange(0, BLOCK_DK)
        mask_d = offs_d < dk
        if SHARED:
            key_base = key_ptr
        else:
            key_base = key_ptr + head * stride_kp
        q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :]
        qmask = mask_m[:, None] & mask_d[None, :]
        q1 = tl.load(q_rows, mask=qmask, other=0.0)                                # (BM, BLOCK_DK)
        q2 = tl.load(q_rows + stride_qc, mask=qmask, other=0.0)
        v1, i1 = _subkey_topk(q1, key_base, n, stride_kn, offs_d, mask_d, K, BLOCK_N, KP)
        v2, i2 = _subkey_topk(q2, key_base + stride_kc, n, stride_kn, offs_d, mask_d, K, BLOCK_N, KP)
        slot = tl.arange(0, KP)
        best = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
        best_id = tl.zeros([BLOCK_M, KP], dtype=tl.int32)
        for a in range(K):
            va, ia = _column(v1, slot, a), _column(i1, slot, a)
            for b in range(K // (a + 1)):                                        # (a + 1) * (b + 1) <= K
                best, best_id = _insert(best, best_id, va + _column(v2, slot, b),
                                        ia * n + _column(i2, slot, b), slot, KP)
        best = tl.where(slot[None, :] < K, best, float("-inf"))
        scores, ids = _top_sorted(best, best_id, KP)                             # (BM, KP)
        out = (offs_m[:, None].to(tl.int64) * H + head) * K + slot[None, :]
        omask = mask_m[:, None] & (slot[None, :] < K)
        tl.store(score_ptr + out, scores, mask=omask)
        tl.store(id_ptr + out, ids.to(tl.int64), mask=omask)

    @triton.jit
    def _pk_bwd_q_kernel(ds_ptr, id_ptr, key_ptr, dq_ptr, T, H, n, K, dk,
                         stride_kp, stride_kc, stride_kn,
                         SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                         KP: tl.constexpr):
        """dq[t, h, c] = sum_j ds[t, h, j] * keys[pool, c, i_c[t, h, j]]; dq (T, H, 2, dk) contiguous."""
        head = tl.program_id(1)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_DK)
        mask_d = offs_d < dk
        slot = tl.arange(0, KP)
        sel = (offs_m[:, None].to(tl.int64) * H + head) * K + slot[None, :]       # (BM, KP) into (T, H, K)
        msk = (offs_m[:, None] < T) & (slot[None, :] < K)
        ds = tl.load(ds_ptr + sel, mask=msk, other=0.0)
        ids = tl.load(id_ptr + sel, mask=msk, other=0)
        if SHARED:
            key_base = key_ptr
        else:
            key_base = key_ptr + head * stride_kp
        qrow = (offs_m[:, None].to(tl.int64) * H + head) * 2                       # (BM, 1) row of (T*H*2, dk)
        for c in tl.static_range(2):
            if c == 0:
                i = ids // n
            else:
                i = ids % n
            kr = tl.load(key_base + c * stride_kc + i[:, :, None] * stride_kn + offs_d[None, None, :],
                         mask=msk[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)  # (BM, KP, BDK)
            dq = tl.sum(ds[:, :, None] * kr, 1)                                    # (BM, BLOCK_DK)
            tl.store(dq_ptr + (qrow + c) * dk + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                     mask=(offs_m[:, None] < T) & mask_d[None, :])

    @triton.jit
    def _pk_bwd_keys_kernel(ds_ptr, q_ptr, order_ptr, offsets_ptr, dkey_ptr, K, dk,
                            BLOCK_E: tl.constexpr, BLOCK_DK: tl.constexpr):
        """One program per sub-key row r of (pools * 2 * n): dkeys[r] = sum of ds[sel] * q[sel's half]
        over the selections that used it. Entries e = sel * 2 + half are sorted by sub-key row."""
        r = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_DK)
        mask_d = offs_d < dk
        start = tl.load(offsets_ptr + r)
        end = tl.load(offsets_ptr + r + 1)
        acc = tl.zeros([BLOCK_E, BLOCK_DK], dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < end
            e = tl.load(order_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
            sel = e // 2
            ds = tl.load(ds_ptr + sel, mask=mask_e, other=0.0)                     # (BLOCK_E,)
            qrow = (sel // K) * 2 + e % 2                                          # row of (T*H*2, dk)
            qv = tl.load(q_ptr + qrow[:, None] * dk + offs_d[None, :],
                         mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += ds[:, None] * qv
        tl.store(dkey_ptr + r * dk + offs_d, tl.sum(acc, 0).to(dkey_ptr.dtype.element_ty), mask=mask_d)

    # ------------------------------------------------------------------------ expert mix
    @triton.jit
    def _gather_rows(tab_ptr, row, mask_p, offs_d, mask_d, stride_tab):
        """Rows `row` (BLOCK_P,) of a table -> (BLOCK_P, BLOCK_D) in the table dtype (masked = 0)."""
        return tl.load(tab_ptr + row[:, None] * stride_tab + offs_d[None, :],
                       mask=mask_p[:, None] & mask_d[None, :], other=0.0)

    @triton.jit
    def _peer_fwd_kernel(x_ptr, rows_ptr, w_ptr, down_ptr, up_ptr, y_ptr, h_ptr,
                         P, D, stride_x, stride_y, stride_tab,
                         ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per token: y[t] = sum_p w * act(down[row] . x[t]) * up[row]; saves h.

        Software-pipelined: while tile i is used, the rows of tile i + 1 are in flight and the
        row indices of tile i + 2 too (so a gather never waits on its index load)."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_ptr + t * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        offs_p = tl.arange(0, BLOCK_P)                                   # tile i
        mask_p = offs_p < P
        row = tl.load(rows_ptr + t * P + offs_p, mask=mask_p, other=0).to(tl.int64)
        u = _gather_rows(down_ptr, row, mask_p, offs_d, mask_d, stride_tab)
        v = _gather_rows(up_ptr, row, mask_p, offs_d, mask_d, stride_tab)
        offs_n = offs_p + BLOCK_P                                        # tile i + 1
        mask_n = offs_n < P
        row_n = tl.load(rows_ptr + t * P + offs_n, mask=mask_n, other=0).to(tl.int64)
        for p0 in range(0, P, BLOCK_P):
            offs_nn = offs_n + BLOCK_P                                   # tile i + 2: indices only
            mask_nn = offs_nn < P
            row_nn = tl.load(rows_ptr + t * P + offs_nn, mask=mask_nn, other=0).to(tl.int64)
            u_n = _gather_rows(down_ptr, row_n, mask_n, offs_d, mask_d, stride_tab)
            v_n = _gather_rows(up_ptr, row_n, mask_n, offs_d, mask_d, stride_tab)
            w = tl.load(w_ptr + t * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            h = tl.sum(u.to(tl.float32) * x[None, :], axis=1)                     # (BLOCK_P,)
            tl.store(h_ptr + t * P + offs_p, h, mask=mask_p)
            f, _ = _act_and_grad(h, ACT)
            acc += tl.sum((w * f)[:, None] * v.to(tl.float32), axis=0)
            offs_p, mask_p, u, v = offs_n, mask_n, u_n, v_n
            offs_n, mask_n, row_n = offs_nn, mask_nn, row_nn
        tl.store(y_ptr + t * stride_y + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _peer_bwd_x_kernel(gh_ptr, rows_ptr, down_ptr, gx_ptr, P, D, stride_gx, stride_tab,
                           BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per token: grad_x[t] = sum_p grad_h[t, p] * down[rows[t, p]] (pipelined as
        the forward)."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        row = tl.load(rows_ptr + t * P + offs_p, mask=mask_p, other=0).to(tl.int64)
        u = _gather_rows(down_ptr, row, mask_p, offs_d, mask_d, stride_tab)
        offs_n = offs_p + BLOCK_P
        mask_n = offs_n < P
        row_n = tl.load(rows_ptr + t * P + offs_n, mask=mask_n, other=0).to(tl.int64)
        for p0 in range(0, P, BLOCK_P):
            offs_nn = offs_n + BLOCK_P
            mask_nn = offs_nn < P
            row_nn = tl.load(rows_ptr + t * P + offs_nn, mask=mask_nn, other=0).to(tl.int64)
            u_n = _gather_rows(down_ptr, row_n, mask_n, offs_d, mask_d, stride_tab)
            gh = tl.load(gh_ptr + t * P + offs_p, mask=mask_p, other=0.0)
            acc += tl.sum(gh[:, None] * u.to(tl.float32), axis=0)
            offs_p, mask_p, u = offs_n, mask_n, u_n
            offs_n, mask_n, row_n = offs_nn, mask_nn, row_nn
        tl.store(gx_ptr + t * stride_gx + offs_d, acc.to(gx_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _peer_bwd_pairs_kernel(dy_ptr, w_ptr, h_ptr, up_ptr, order_ptr, offsets_ptr,
                               gw_ptr, gh_ptr, gup_ptr, R, P, D, stride_dy, stride_tab,
                               ACT: tl.constexpr, DENSE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """BLOCK_R rows r of `up` per program; for each pair (t, p) that selected r:
        g = dy[t] . up[r], grad_w = g * act(h), grad_h = g * w * act'(h); if DENSE also
        grad_up[r] = sum w * act(h) * dy[t], written once (zeros where nobody selected r).

        The pairs of row r are order[offsets[r]:offsets[r + 1]] (flat indices t * P + p). dy rows
        are re-read per pair and kept in L2 (evict_last); table rows stream through.
        """
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        start = tl.load(offsets_ptr + offs_r, mask=mask_r, other=0)
        count = tl.load(offsets_ptr + offs_r + 1, mask=mask_r, other=0) - start   # (BLOCK_R,)
        tab = offs_r[:, None].to(tl.int64) * stride_tab + offs_d[None, :]        # (BLOCK_R, BLOCK_D)
        v = tl.load(up_ptr + tab, mask=(count > 0)[:, None] & mask_d[None, :], other=0.0,
                    eviction_policy="evict_first")
        g_up = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j in range(0, tl.max(count, 0)):
            valid = j < count
            pair = tl.load(order_ptr + start + j, mask=valid, other=0).to(tl.int64)  # (BLOCK_R,)
            dy = tl.load(dy_ptr + (pair // P)[:, None] * stride_dy + offs_d[None, :],
                         mask=valid[:, None] & mask_d[None, :], other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            h = tl.load(h_ptr + pair, mask=valid, other=0.0)
            w = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            f, df = _act_and_grad(h, ACT)
            g = tl.sum(dy * v.to(tl.float32), axis=1)                            # d loss / d (w * act(h))
            tl.store(gw_ptr + pair, g * f, mask=valid)
            tl.store(gh_ptr + pair, g * w * df, mask=valid)
            if DENSE:
                g_up += (w * f)[:, None] * dy
        if DENSE:
            tl.store(gup_ptr + tab, g_up.to(gup_ptr.dtype.element_ty),
                     mask=mask_r[:, None] & mask_d[None, :], cache_modifier=".cs")

    @triton.jit
    def _peer_rows_sum_kernel(src_ptr, coef_ptr, order_ptr, offsets_ptr, tab_ptr, m_ptr, v_ptr,
                              R, P, D, stride_src, stride_tab, lr, wd, beta1, beta2, eps, bc1, bc2,
                              MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """BLOCK_R table rows per program; for each, g[r] = sum over the pairs (t, p) at r of
        coef[t * P + p] * src[t] (fp32), then by MODE:
        0: write g[r] into tab_ptr (a gradient buffer), zeros where nobody selected r;
        1: SGD on the table tab_ptr: p = p * (1 - lr * wd) - lr * g, selected rows only;
        2: lazy AdamW on the table and its fp32 moments m_ptr, v_ptr ((R, D) contiguous),
           selected rows only (bias corrections bc1, bc2 given).
        """
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        start = tl.load(offsets_ptr + offs_r, mask=mask_r, other=0)
        count = tl.load(offsets_ptr + offs_r + 1, mask=mask_r, other=0) - start   # (BLOCK_R,)
        g = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j in range(0, tl.max(count, 0)):
            valid = j < count
            pair = tl.load(order_ptr + start + j, mask=valid, other=0).to(tl.int64)  # (BLOCK_R,)
            src = tl.load(src_ptr + (pair // P)[:, None] * stride_src + offs_d[None, :],
                          mask=valid[:, None] & mask_d[None, :], other=0.0,
                          eviction_policy="evict_last").to(tl.float32)
            g += tl.load(coef_ptr + pair, mask=valid, other=0.0)[:, None] * src
        tab = offs_r[:, None].to(tl.int64) * stride_tab + offs_d[None, :]        # (BLOCK_R, BLOCK_D)
        if MODE == 0:
            tl.store(tab_ptr + tab, g.to(tab_ptr.dtype.element_ty),
                     mask=mask_r[:, None] & mask_d[None, :], cache_modifier=".cs")
        else:
            mask = (count > 0)[:, None] & mask_d[None, :]
            p = tl.load(tab_ptr + tab, mask=mask, other=0.0).to(tl.float32) * (1.0 - lr * wd)
            if MODE == 1:
                p = p - lr * g
            else:
                state = offs_r[:, None].to(tl.int64) * D + offs_d[None, :]
                m = beta1 * tl.load(m_ptr + state, mask=mask, other=0.0) + (1.0 - beta1) * g
                v = beta2 * tl.load(v_ptr + state, mask=mask, other=0.0) + (1.0 - beta2) * g * g
                tl.store(m_ptr + state, m, mask=mask)
                tl.store(v_ptr + state, v, mask=mask)
                p = p - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
            tl.store(tab_ptr + tab, p.to(tab_ptr.dtype.element_ty), mask=mask)


# ============================================================================ launching
_MAX_TILE = 8192  # elements of one (BLOCK, BLOCK_D) tile of table rows; the pipelined kernels hold two


def _row_tile_configs(block_d: int, name: str, sizes: tuple) -> list:
    """Autotune candidates: `name` rows per tile x warps, with 8 to 64 tile elements per thread
    (the latency-bound row kernels want many small programs in flight) and tile <= _MAX_TILE."""
    configs = [triton.Config({name: b}, num_warps=nw) for b in sizes for nw in (1, 2, 4, 8)
               if 8 * 32 * nw <= b * block_d <= min(_MAX_TILE, 64 * 32 * nw)]
    return configs or [triton.Config({name: 1}, num_warps=1)]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, block_d: int):
    """An autotuned launcher for one kernel and row width (GPU only)."""
    kernel = globals()[kernel_name]
    if kernel_name == "_pk_topk_kernel":
        # (rows, keys per chunk, warps): all compile spill-free for sm_90 at dk 64, k 16
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw) for bm, bn, nw in
                   ((16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 64, 4), (32, 64, 8), (64, 32, 4),
                    (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8))]
        key = ["T", "n", "dk"]  # K is a constexpr: a kernel per K
    elif kernel_name in ("_peer_bwd_pairs_kernel", "_peer_rows_sum_kernel"):
        configs = _row_tile_configs(block_d, "BLOCK_R", (1, 2, 4))
        key = ["R", "P", "D", "DENSE"] if kernel_name == "_peer_bwd_pairs_kernel" else ["R", "P", "D"]
    else:  # the per-token kernels
        configs = _row_tile_configs(block_d, "BLOCK_P", (1, 2, 4, 8))
        key = ["P", "D"]
    return triton.autotune(configs=configs, key=key)(kernel)


_INTERPRETER_META = {"_pk_topk_kernel": {"BLOCK_M": 16, "BLOCK_N": 16},
                     "_peer_bwd_pairs_kernel": {"BLOCK_R": 2}, "_peer_rows_sum_kernel": {"BLOCK_R": 2},
                     "_peer_fwd_kernel": {"BLOCK_P": 4}, "_peer_bwd_x_kernel": {"BLOCK_P": 4}}


def _launch(kernel_name: str, grid, *args, block_d: int, **meta):
    """Launch with autotuning on GPU; with a small fixed config under the interpreter.

    grid: a tuple, or a function of the chosen meta-parameters (as Triton's launch grids)."""
    if _interpreting():
        meta.update(_INTERPRETER_META[kernel_name])
        grid = grid(meta) if callable(grid) else grid
        globals()[kernel_name][grid](*args, **meta)
    else:
        _tuned(kernel_name, block_d)[grid](*args, **meta)


_ACT_CODE = {"relu2": 0, "gelu": 1}


def _sort_by_row(rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by table row: order (T * P,) int64 flat pair indices, stable, and
    offsets (num_rows + 1,) int32 with row r's pairs at order[offsets[r]:offsets[r + 1]]."""
    sorted_rows, order = torch.sort(rows.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.arange(num_rows + 1, device=rows.device, dtype=torch.int32)
    return order, torch.searchsorted(sorted_rows, bounds, out_int32=True)


class _ProductKeyTopK(torch.autograd.Function):
    """Autograd wrapper of the fused retrieval: q (..., H, 2, dk), keys (pools, 2, n, dk), k."""

    @staticmethod
    def forward(ctx, q, keys, k):
        *lead, H, _, dk = q.shape
        pools, _, n, _ = keys.shape
        ctx.dtypes = q.dtype, keys.dtype
        qf = q.reshape(-1, H, 2, dk).contiguous()                                 # (T, H, 2, dk)
        keys = keys.contiguous()
        if _interpreting():  # the interpreter's tl.dot mishandles bf16; fp32 gives the same scores
            qf, keys = qf.float(), keys.float()
        T = qf.shape[0]
        scores = torch.empty(T, H, k, device=q.device, dtype=torch.float32)
        ids = torch.empty(T, H, k, device=q.device, dtype=torch.int64)
        block_dk = max(16, triton.next_power_of_2(dk))
        kp = triton.next_power_of_2(k)
        _launch("_pk_topk_kernel", lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), H),
                qf, keys, scores, ids, T, H, n, dk, *qf.stride()[:3], *keys.stride()[:3],
                block_d=block_dk, K=k, SHARED=pools == 1, BLOCK_DK=block_dk, KP=kp)
        ctx.save_for_backward(qf, keys, ids)
        ctx.q_shape = q.shape
        ctx.mark_non_differentiable(ids)
        return scores.view(*lead, H, k), ids.view(*lead, H, k)

    @staticmethod
    def backward(ctx, dscores, _):
        qf, keys, ids = ctx.saved_tensors
        T, H, _, dk = qf.shape
        pools, _, n, _ = keys.shape
        k = ids.shape[-1]
        ds = dscores.reshape(T, H, k).float().contiguous()
        block_dk = max(16, triton.next_power_of_2(dk))
        kp = triton.next_power_of_2(k)
        dq = torch.empty(qf.shape, device=qf.device, dtype=ctx.dtypes[0])
        block_m = 4  # small tiles: (block_m, kp, block_dk) gathered sub-keys per program
        _pk_bwd_q_kernel[(triton.cdiv(T, block_m), H)](
            ds, ids, keys, dq, T, H, n, k, dk, *keys.stride()[:3],
            SHARED=pools == 1, BLOCK_M=block_m, BLOCK_DK=block_dk, KP=kp, num_warps=4)
        # every selection e = (t, h, j) used sub-key row (pool * 2 + c) * n + i_c of the keys
        sub = torch.stack((ids // n, n + ids % n), dim=-1)                        # (T, H, k, 2)
        if pools > 1:
            sub = sub + (torch.arange(H, device=ids.device) * 2 * n).view(1, H, 1, 1)
        sorted_sub, order = torch.sort(sub.reshape(-1).to(torch.int32), stable=True)  # deterministic sums
        bounds = torch.arange(pools * 2 * n + 1, device=ids.device, dtype=torch.int32)
        offsets = torch.searchsorted(sorted_sub, bounds, out_int32=True)          # (pools * 2 * n + 1,)
        dkeys = torch.empty(keys.shape, device=keys.device, dtype=ctx.dtypes[1])
        _pk_bwd_keys_kernel[(pools * 2 * n,)](ds, qf, order, offsets, dkeys, k, dk,
                                              BLOCK_E=32, BLOCK_DK=block_dk, num_warps=4)
        return dq.view(ctx.q_shape), dkeys, None


class _PEERExperts(torch.autograd.Function):
    """Autograd wrapper of the expert mix: x (T, D), rows (T, P), w (T, P), down/up (R, D).

    table_grad: None (dense gradients for down and up) or a TableGradFactors that receives
    the backward's factors instead. use_triton: kernels, or the same steps in PyTorch.
    """

    @staticmethod
    def forward(ctx, x, rows, w, down, up, activation, table_grad, use_triton):
        x, w = x.contiguous(), w.contiguous()
        rows = rows.to(torch.int32).contiguous()
        down, up = down.contiguous(), up.contiguous()
        if use_triton:
            y, h = _mix_forward_triton(x, rows, w, down, up, activation)
        else:
            y, h = _mix_forward_torch(x, rows, w, down, up, activation)
        ctx.save_for_backward(x, rows, w, down, up, h)
        ctx.activation, ctx.table_grad, ctx.use_triton = activation, table_grad, use_triton
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rows, w, down, up, h = ctx.saved_tensors
        dy = dy.contiguous()
        dense = ctx.table_grad is None
        step = _mix_backward_triton if ctx.use_triton else _mix_backward_torch
        grad_x, grad_w, grad_h, grad_down, grad_up = step(x, dy, rows, w, down, up, h, ctx.activation, dense)
        if not dense:
            coef_up = w.float() * activation_fn(ctx.activation, h)                 # (T, P)
            ctx.table_grad.add(rows, grad_h, coef_up, x, dy)
        return grad_x, None, grad_w.to(w.dtype), grad_down, grad_up, None, None, None


def _mix_forward_triton(x, rows, w, down, up, activation):
    (T, D), P = x.shape, rows.shape[1]
    y = torch.empty_like(x)
    h = torch.empty(T, P, device=x.device, dtype=torch.float32)
    _launch("_peer_fwd_kernel", (T,), x, rows, w, down, up, y, h, P, D, x.stride(0), y.stride(0),
            down.stride(0), block_d=triton.next_power_of_2(D), ACT=_ACT_CODE[activation],
            BLOCK_D=triton.next_power_of_2(D))
    return y, h


def _mix_backward_triton(x, dy, rows, w, down, up, h, activation, dense):
    """(grad_x, grad_w, grad_h, grad_down | None, grad_up | None) with the backward kernels:
    pairs (per up row: grad_w, grad_h, grad_up), rows-sum (per down row: grad_down), grad_x."""
    (T, D), P, R = x.shape, rows.shape[1], down.shape[0]
    block_d = triton.next_power_of_2(D)
    order, offsets = _sort_by_row(rows, R)
    per_rows = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)  # noqa: E731 - a launch grid
    grad_w = torch.empty(T, P, device=x.device, dtype=torch.float32)
    grad_h = torch.empty(T, P, device=x.device, dtype=torch.float32)
    grad_up = torch.empty_like(up) if dense else None
    _launch("_peer_bwd_pairs_kernel", per_rows, dy, w, h, up, order, offsets, grad_w, grad_h,
            grad_up if dense else grad_w,  # unused without DENSE
            R, P, D, dy.stride(0), up.stride(0),
            block_d=block_d, ACT=_ACT_CODE[activation], DENSE=dense, BLOCK_D=block_d)
    grad_down = None
    if dense:
        grad_down = torch.empty_like(down)
        _launch("_peer_rows_sum_kernel", per_rows, x, grad_h, order, offsets, grad_down, grad_down,
                grad_down, R, P, D, x.stride(0), grad_down.stride(0), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0,
                block_d=block_d, MODE=0, BLOCK_D=block_d)
    grad_x = torch.empty_like(x)
    _launch("_peer_bwd_x_kernel", (T,), grad_h, rows, down, grad_x, P, D, grad_x.stride(0),
            down.stride(0), block_d=block_d, BLOCK_D=block_d)
    return grad_x, grad_w, grad_h, grad_down, grad_up


def _mix_forward_torch(x, rows, w, down, up, activation):
    """The forward kernel's steps in PyTorch (fp32 math): y (T, D) in x.dtype, h (T, P) fp32."""
    idx = rows.long()
    h = torch.einsum("td,tpd->tp", x.float(), down[idx].float())                # (T, P)
    a = w.float() * activation_fn(activation, h)                               # (T, P)
    return torch.einsum("tp,tpd->td", a, up[idx].float()).to(x.dtype), h


def _mix_backward_torch(x, dy, rows, w, down, up, h, activation, dense):
    """The backward kernels' steps in PyTorch (fp32 math), same outputs as `_mix_backward_triton`."""
    idx = rows.long()
    f = activation_fn(activation, h)                                           # (T, P)
    g = torch.einsum("td,tpd->tp", dy.float(), up[idx].float())                 # (T, P)
    grad_w, grad_h = g * f, g * w.float() * activation_grad(activation, h)
    grad_x = torch.einsum("tp,tpd->td", grad_h, down[idx].float()).to(x.dtype)
    if not dense:
        return grad_x, grad_w, grad_h, None, None
    factors = TableGradFactors()
    factors.add(rows, grad_h, w.float() * f, x, dy)
    grad_down, grad_up = factors.dense(down.shape[0])
    return grad_x, grad_w, grad_h, grad_down.to(down.dtype), grad_up.to(up.dtype)
