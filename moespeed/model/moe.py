"""DeepSeekMoE feed-forward layer: shared experts + fine-grained routed experts, dropless.

Shapes: x (B, T, D); S = B*T tokens; E routed experts of width H; top-k routing; N = S*k token
copies ("slots"). The flow of `MoE.forward`:

    1. route     logits  = x @ gate.T  in fp32                            (S, E)
                 scores  = softmax(logits) | sigmoid(logits)              (S, E)
                 ids     = topk(scores + expert_bias, k)                  (S, k)  bias: selection only
                 weights = scores[ids] (/ their sum) * route_scale        (S, k)
    2. sort      perm    = stable argsort of ids.flatten()                (N,)    copies grouped by expert
                 ends    = end row of each expert's group                 (E,)
    3. dispatch  xs      = x[perm // k]                                   (N, D)
    4. experts   h       = xs @ w1[e]        (grouped GEMM, one per group) (N, H)
                 a       = act(h [, xs @ w3[e]]) * weight                 (N, H)
                 o       = a @ w2[e]                                      (N, D)
    5. combine   y[s]    = sum over s's k copies of o (un-permute, sum)    (S, D)
    6. shared    y      += w2_s(act(x @ w1_s [, x @ w3_s]))               (S, D)

Step 4 has two loop-free implementations (`MoEConfig.dispatch`):
- `grouped_mm`: `torch._grouped_mm(xs, w, offs=ends)` (CUTLASS grouped GEMM on CUDA sm80+, bf16; a C++
  kernel on CPU). Offsets are int32 cumulative ends; on torch >= 2.9 groups need no row padding (only
  16-byte aligned strides: D and H multiples of 8 in bf16) and empty groups are fine.
- `padded_bmm`: rows packed into blocks of C0 = ceil(N/E) rows, at most 2E blocks, one expert each,
  and batched `bmm` with each block's expert weights: memory stays <= 2x the (N, D) activations and
  2x the weights whatever the routing skew (never a (tokens, experts, d_model) tensor).
`naive_loop` is the readable reference: a Python loop over experts (tests and benchmark baseline).
`auto` picks `grouped_mm` for bf16 where it runs (CUDA sm80+ or CPU, aligned dims), else
`padded_bmm` (e.g. fp32: `grouped_mm` runs fp32 on CPU eagerly but torch.compile rejects it).

No host sync in the forward of the vectorized paths (offsets stay on the device, shapes are static
given S), so they are compile friendly; `naive_loop` syncs (nonzero). Dispatch and combine are
custom autograd functions whose backward is the other one (gather <-> un-permute-and-sum): no
atomics, deterministic. The routing weight is applied to the hidden activation (width H) inside one
fused activation function, compiled by `torch.compile` on CUDA.

Load balancing: expert-level aux loss E * sum_i f_i P_i (f_i = share of the N slots routed to
expert i, P_i = mean routing probability), the sequence-wise variant (DeepSeek-V3, per sequence then
averaged), router z-loss (mean logsumexp(logits)^2) and the aux-loss-free bias (DeepSeek-V3):
`update_bias()` moves `expert_bias` by +-gamma against each expert's load since the last call.
Optional capacity factor: an expert keeps its first C = ceil(capacity_factor * N / E) copies in
token order (causal: a copy is only ever dropped because of earlier tokens); dropped copies add 0.

Expert parallelism (experts split over ranks) lives in moe_ep.py; `moespeed.train.distributed`
installs it as `expert_parallel`, the only hook here (steps 3-5 then run across ranks).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moespeed.errors import ConfigError
from moespeed.options import option

ACTIVATIONS = ("relu2", "swiglu", "gelu")
SCORE_FUNCS = ("softmax", "sigmoid")
DISPATCHES = ("auto", "grouped_mm", "padded_bmm", "naive_loop")


@dataclasses.dataclass
class MoEConfig:
    """DeepSeekMoE layer: `n_shared_experts` always-on experts + top-k of `n_routed_experts`."""

    n_routed_experts: int = option(8, "number of routed experts E")
    n_shared_experts: int = option(1, "always-on experts, fused into one dense FFN of width n*moe_inter_dim")
    num_experts_per_tok: int = option(2, "routed experts per token (top-k)")
    moe_inter_dim: int = option(256, "hidden width of each routed (and shared) expert")
    activation: str = option("relu2", "expert activation", choices=ACTIVATIONS)
    score_func: str = option("softmax", "router scores from logits", choices=SCORE_FUNCS)
    norm_topk_prob: bool = option(True, "renormalize the top-k weights of a token to sum to 1")
    route_scale: float = option(1.0, "multiplier on the routing weights")
    aux_loss_coef: float = option(0.01, "expert-level balance loss E*sum_i f_i*P_i (Switch/DeepSeek)")
    seq_aux_loss_coef: float = option(0.0, "sequence-wise balance loss (DeepSeek-V3)")
    bias_update_speed: float = option(0.0, "gamma of aux-loss-free balancing (expert_bias step); 0 = off")
    z_loss_coef: float = option(0.0, "router z-loss: mean logsumexp(logits)^2")
    capacity_factor: float = option(0.0, "0 = dropless; >0 keeps ceil(cf*N/E) copies per expert, drops the rest")
    dispatch: str = option("auto", "expert compute: auto | grouped_mm | padded_bmm | naive_loop (reference)",
                           choices=DISPATCHES)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid `model.moe.<key>`."""
        for key in ("n_routed_experts", "moe_inter_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.moe.{key} = {getattr(self, key)}: must be >= 1")
        if self.n_shared_experts < 0:
            raise ConfigError(f"model.moe.n_shared_experts = {self.n_shared_experts}: must be >= 0")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(
                f"model.moe.num_experts_per_tok = {self.num_experts_per_tok}: must be between 1 and "
                f"model.moe.n_routed_experts ({self.n_routed_experts})")
        for key, allowed in (("activation", ACTIVATIONS), ("score_func", SCORE_FUNCS), ("dispatch", DISPATCHES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.moe.{key} = {getattr(self, key)!r}: allowed are {' | '.join(allowed)}")
        for key in ("aux_loss_coef", "seq_aux_loss_coef", "bias_update_speed", "z_loss_coef", "capacity_factor"):
            if not getattr(self, key) >= 0:  # also rejects NaN
                raise ConfigError(f"model.moe.{key} = {getattr(self, key)}: must be >= 0")
        if not self.route_scale > 0:
            raise ConfigError(f"model.moe.route_scale = {self.route_scale}: must be > 0")


# ----------------------------------------------------------------------------------------------
# Fused pointwise pieces (plain torch; compiled into one kernel each on CUDA)
# ----------------------------------------------------------------------------------------------

_FUSE_ON_CUDA = os.environ.get("MOESPEED_NO_FUSE", "0") != "1"


def _fused(fn: Callable) -> Callable:
    """`fn` (a pure function) run through `torch.compile` on CUDA tensors to fuse its pointwise ops;
    eager elsewhere, when an outer torch.compile is already tracing it, or if compiling fails."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not (_FUSE_ON_CUDA and args[0].is_cuda) or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - pure function: rerunning it eagerly is safe
            if compiled is fn:
                raise
            warnings.warn(f"moespeed.model.moe: torch.compile of {fn.__name__} failed ({type(e).__name__}: "
                          f"{e}); running it eagerly from now on")
            compiled = fn
            return fn(*args)

    return wrapper


def _act(h: Tensor, g: Tensor | None, activation: str) -> Tensor:
    """The expert activation in fp32: relu(h)^2 | gelu(h) | silu(h) * g."""
    h = h.float()
    if activation == "swiglu":
        return F.silu(h) * g.float()
    if activation == "relu2":
        return F.relu(h).square()
    return F.gelu(h, approximate="tanh")


@_fused
def _act_fwd(h: Tensor, g: Tensor | None, scale: Tensor | None, activation: str) -> Tensor:
    """act(h, g) * scale[:, None], rounded once to h's dtype. h, g: (M, H); scale: (M,) or None."""
    a = _act(h, g, activation)  # (M, H) fp32
    if scale is not None:
        a = a * scale.unsqueeze(-1)
    # no `.to` when h is fp32: torch 2.11's compiled autograd.Function gave zero input gradients when
    # forward returned a no-op `.to` of its result (fixed in later torch; tests/test_moe.py checks)
    return a if a.dtype == h.dtype else a.to(h.dtype)


@_fused
def _act_bwd(grad: Tensor, h: Tensor, g: Tensor | None, scale: Tensor | None, activation: str,
             need_scale_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of `_act_fwd` w.r.t. h, g and scale (recomputes the activation; fp32 math)."""
    grad32 = grad.float()
    grad_a = grad32 * scale.unsqueeze(-1) if scale is not None else grad32  # (M, H)
    h32 = h.float()
    grad_g = None
    if activation == "swiglu":
        sig = torch.sigmoid(h32)
        grad_h = grad_a * g.float() * sig * (1 + h32 * (1 - sig))
        grad_g = (grad_a * h32 * sig).to(g.dtype)
    elif activation == "relu2":
        grad_h = grad_a * 2 * F.relu(h32)
    else:
        grad_h = torch.ops.aten.gelu_backward(grad_a, h32, approximate="tanh")
    grad_scale = (grad32 * _act(h, g, activation)).sum(-1) if need_scale_grad else None  # (M,)
    return grad_h.to(h.dtype), grad_g, grad_scale


class _ScaledActivation(torch.autograd.Function):
    """a = act(h, g) * scale[:, None]; saves only h, g, scale (the activation is recomputed)."""

    @staticmethod
    def forward(ctx, h, g, scale, activation):
        ctx.activation = activation
        ctx.save_for_backward(h, g, scale)
        return _act_fwd(h, g, scale, activation)

    @staticmethod
    def backward(ctx, grad):
        h, g, scale = ctx.saved_tensors
        need_scale_grad = scale is not None and ctx.needs_input_grad[2]
        grad_h, grad_g, grad_scale = _act_bwd(grad.contiguous(), h, g, scale, ctx.activation, need_scale_grad)
        return grad_h, grad_g, grad_scale, None


def scaled_activation(h: Tensor, g: Tensor | None, scale: Tensor | None, activation: str) -> Tensor:
    """act(h, g) * scale[:, None] with a memory-lean fused backward. h, g: (M, H); scale: (M,) fp32."""
    return _ScaledActivation.apply(h, g, scale, activation)


@_fused
def _unpermute_sum(o: Tensor, inv_perm: Tensor, k: int) -> Tensor:
    """y[s] = sum_j o[inv_perm[s*k + j]]: back to token order, summing each token's k copies."""
    rows = o.index_select(0, inv_perm)  # (N, D) in token order
    return rows.view(-1, k, o.shape[-1]).sum(1)  # (S, D)


class _Dispatch(torch.autograd.Function):
    """xs = x[token_idx] (N, D); the backward sums each token's k copies (no atomics)."""

    @staticmethod
    def forward(ctx, x, token_idx, inv_perm, k):
        ctx.k = k
        ctx.save_for_backward(inv_perm)
        return x.index_select(0, token_idx)

    @staticmethod
    def backward(ctx, grad):
        (inv_perm,) = ctx.saved_tensors
        return _unpermute_sum(grad.contiguous(), inv_perm, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """y = un-permute-and-sum of the expert outputs o (N, D) -> (S, D); the backward is a gather."""

    @staticmethod
    def forward(ctx, o, inv_perm, token_idx, k):
        ctx.save_for_backward(token_idx)
        return _unpermute_sum(o, inv_perm, k)

    @staticmethod
    def backward(ctx, grad):
        (token_idx,) = ctx.saved_tensors
        return grad.index_select(0, token_idx), None, None, None


# ----------------------------------------------------------------------------------------------
# Routing bookkeeping
# ----------------------------------------------------------------------------------------------

class Routing(NamedTuple):
    """What the router decided for S tokens (all on x's device)."""

    logits: Tensor  # (S, E) fp32
    probs: Tensor  # (S, E) fp32 routing probabilities (rows sum to 1) for the balance losses
    ids: Tensor  # (S, k) int64 chosen experts
    weights: Tensor  # (S, k) fp32 combine weights
    perm: Tensor  # (N,) slot index s*k+j of the n-th copy in expert order
    inv_perm: Tensor  # (N,) position in expert order of slot s*k+j
    sorted_ids: Tensor  # (N,) expert of the n-th copy in expert order
    counts: Tensor  # (E,) int64 copies routed to each expert (before any dropping)
    ends: Tensor  # (E,) int64 end row of each expert's group in expert order


def _histogram(sorted_keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Counts (n,) of each key in [0, n) and their cumulative ends, from sorted keys (no sync, no atomics)."""
    keys = torch.arange(n, device=sorted_keys.device, dtype=sorted_keys.dtype)
    ends = torch.searchsorted(sorted_keys, keys, right=True)  # (n,)
    return torch.diff(ends, prepend=ends.new_zeros(1)), ends


def _sort_by_expert(ids: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group the N = S*k copies by expert (stable: token order within a group): perm, inv_perm,
    sorted_ids (N,) and counts, ends (E,)."""
    flat = ids.reshape(-1)  # (N,)
    sorted_ids, perm = torch.sort(flat, stable=True)  # (N,), (N,)
    inv_perm = torch.empty_like(perm).scatter_(0, perm, torch.arange(flat.numel(), device=flat.device))
    counts, ends = _histogram(sorted_ids, n_experts)  # (E,), (E,)
    return perm, inv_perm, sorted_ids, counts, ends


def _position_in_group(sorted_ids: Tensor, counts: Tensor, ends: Tensor) -> Tensor:
    """(N,) rank of the n-th copy (expert order) among the copies of its expert: 0, 1, ..."""
    starts = ends - counts  # (E,)
    return torch.arange(sorted_ids.numel(), device=sorted_ids.device) - starts[sorted_ids]


def _block_layout(sorted_ids: Tensor, counts: Tensor, ends: Tensor) -> tuple[Tensor, Tensor, int]:
    """Blocks of C0 = ceil(N/E) rows, one expert each, for `padded_bmm`.

    Returns slot (N,): row of each copy in the (2E*C0) padded buffer; block_expert (2E,): the expert
    of each block (unused trailing blocks hold no rows); C0. At most 2E blocks are needed since
    sum_e ceil(c_e / C0) < N / C0 + E <= 2E.
    """
    n, n_experts = sorted_ids.numel(), counts.numel()
    rows = -(-n // n_experts)  # C0
    blocks = -(-counts // rows)  # (E,) blocks per expert
    block_ends = torch.cumsum(blocks, 0)  # (E,)
    position = _position_in_group(sorted_ids, counts, ends)  # (N,)
    block = (block_ends - blocks)[sorted_ids] + position // rows  # (N,)
    slot = block * rows + position % rows  # (N,)
    all_blocks = torch.arange(2 * n_experts, device=counts.device)
    block_expert = torch.searchsorted(block_ends, all_blocks, right=True).clamp_(max=n_experts - 1)  # (2E,)
    return slot, block_expert, rows


def _expert_ffn(x: Tensor, scale: Tensor, mm: Callable[[Tensor, Tensor], Tensor],
                w1: Tensor, w2: Tensor, w3: Tensor | None, activation: str) -> Tensor:
    """o = (act(x @ w1[e] [, x @ w3[e]]) * scale) @ w2[e] for rows grouped by expert; `mm` does the grouping."""
    h = mm(x, w1)  # (M, H)
    g = mm(x, w3) if w3 is not None else None  # (M, H)
    return mm(scaled_activation(h, g, scale, activation), w2)  # (M, D)


def grouped_mm_experts(xs: Tensor, scale: Tensor, ends: Tensor, w1: Tensor, w2: Tensor,
                       w3: Tensor | None, activation: str) -> Tensor:
    """Expert FFNs over expert-sorted rows xs (N, D) with `torch._grouped_mm`; ends (E,) group ends."""
    offs = ends.to(torch.int32)  # (E,) cumulative ends, as _grouped_mm wants
    return _expert_ffn(xs, scale, lambda a, w: torch._grouped_mm(a, w, offs=offs), w1, w2, w3, activation)


def padded_bmm_experts(xs: Tensor, scale: Tensor, sorted_ids: Tensor, counts: Tensor, ends: Tensor,
                       w1: Tensor, w2: Tensor, w3: Tensor | None, activation: str) -> Tensor:
    """Same as `grouped_mm_experts` with blocks of rows and batched `bmm` (any device and dtype)."""
    slot, block_expert, rows = _block_layout(sorted_ids, counts, ends)
    n_rows, d = 2 * counts.numel() * rows, xs.shape[-1]
    packed = xs.new_zeros(n_rows, d).index_copy(0, slot, xs)  # (2E*C0, D) padding rows are zero
    packed_scale = scale.new_zeros(n_rows).index_copy(0, slot, scale)  # (2E*C0,)

    def block_mm(a: Tensor, w: Tensor) -> Tensor:
        blocks = a.view(-1, rows, a.shape[-1])  # (2E, C0, in)
        return torch.bmm(blocks, w.index_select(0, block_expert)).flatten(0, 1)  # (2E*C0, out)

    out = _expert_ffn(packed, packed_scale, block_mm, w1, w2, w3, activation)  # (2E*C0, D)
    return out.index_select(0, slot)  # (N, D)


def naive_loop_experts(x: Tensor, ids: Tensor, weights: Tensor, capacity: int, w1: Tensor, w2: Tensor,
                       w3: Tensor | None, activation: str) -> Tensor:
    """Reference: one Python iteration per expert. x (S, D), ids/weights (S, k) -> y (S, D)."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)  # copies routed to e, in token order
        if capacity:
            tok, slot = tok[:capacity], slot[:capacity]
        xe = x[tok]  # (c_e, D)
        a = _act(xe @ w1[e], xe @ w3[e] if w3 is not None else None, activation).to(x.dtype)  # (c_e, H)
        o = (a @ w2[e]) * weights[tok, slot].unsqueeze(-1).to(x.dtype)  # (c_e, D)
        y = y.index_add(0, tok, o)
    return y


@torch.no_grad()
def update_biases(moes: list) -> None:
    """`update_bias` of several MoE layers, with one all-reduce of all their counts."""
    moes = [m for m in moes if m.cfg.bias_update_speed != 0]
    if not moes:
        return
    counts = torch.cat([m._bias_counts for m in moes])  # (sum of E,) a copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    for m, load in zip(moes, counts.float().split([m._bias_counts.numel() for m in moes])):  # (E,) each
        m.expert_bias += m.cfg.bias_update_speed * torch.sign(load.mean() - load).to(m.expert_bias.dtype)
        m._bias_counts.zero_()


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether eager `torch._grouped_mm` runs here: CUDA bf16 on sm80+, or CPU fp32/bf16; strides of
    16-byte multiples. (Under torch.compile its meta kernel accepts bf16 only.)"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d * itemsize % 16 for d in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class SharedExperts(nn.Module):
    """The always-on experts as one dense FFN of width n_shared * moe_inter_dim."""

    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (S, D) -> (S, D)
        g = self.w3(x) if self.w3 is not None else None
        return self.w2(scaled_activation(self.w1(x), g, None, self.activation))


class MoE(nn.Module):
    """DeepSeekMoE FFN: shared experts + top-k of E fine-grained routed experts (see module doc)."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        cfg.validate()
        self.cfg, self.d_model, self.init_std = cfg, d_model, init_std
        e, h = cfg.n_routed_experts, cfg.moe_inter_dim
        self.gate = nn.Parameter(torch.empty(e, d_model))  # router, used in fp32
        self.w1 = nn.Parameter(torch.empty(e, d_model, h))
        self.w2 = nn.Parameter(torch.empty(e, h, d_model))
        self.w3 = nn.Parameter(torch.empty(e, d_model, h)) if cfg.activation == "swiglu" else None
        self.shared = (SharedExperts(d_model, cfg.n_shared_experts * h, cfg.activation)
                       if cfg.n_shared_experts > 0 else None)
        self.register_buffer("expert_bias", torch.zeros(e), persistent=True)  # selection only
        # Token counters: preallocated non-persistent buffers (they follow .to(device) and are mutated
        # in place, which torch.compile supports). Under DDP use broadcast_buffers=False so rank 0's
        # counts never overwrite the others'.
        self.register_buffer("_load_counts", torch.zeros(e, dtype=torch.long), persistent=False)  # since load_stats()
        self.register_buffer("_bias_counts", torch.zeros(e, dtype=torch.long), persistent=False)  # since update_bias()
        self.register_buffer("_dropped", torch.zeros((), dtype=torch.long), persistent=False)  # capacity drops
        self._last_aux: dict[str, Tensor] = {}
        # Set by moespeed.train.distributed when the routed experts are split over ranks (moe_ep.py);
        # None = every expert lives here (the single-device path below).
        self.expert_parallel = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=self.init_std)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) -> (y: (B, T, D), aux_loss: fp32 scalar, already weighted by the coefs)."""
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)  # (S, D)
        # EP allgather: the group's tokens start moving now, so the router's work overlaps the gather
        gathered = self.expert_parallel.prefetch(x2) if self.expert_parallel is not None else None
        r = self.route(x2)
        capacity = self.capacity(b * t)
        aux = self._aux_loss(r, b)
        if self.training:
            self._count(r, capacity)
        y = self._routed(x2, r, capacity, gathered)  # (S, D)
        if self.shared is not None:
            y = y + self.shared(x2)
        return y.view(b, t, d), aux

    def route(self, x2: Tensor) -> Routing:
        """Router: fp32 logits, top-k selection with `expert_bias`, combine weights, expert order."""
        cfg = self.cfg
        with torch.autocast(x2.device.type, enabled=False):
            logits = F.linear(x2.float(), self.gate.float())  # (S, E)
        if cfg.score_func == "softmax":
            scores = probs = logits.softmax(-1)  # (S, E)
        else:
            scores = logits.sigmoid()  # (S, E)
            probs = scores / scores.sum(-1, keepdim=True)
        ids = torch.topk(scores.detach() + self.expert_bias.float(), cfg.num_experts_per_tok,
                         dim=-1, sorted=False).indices  # (S, k)
        weights = scores.gather(-1, ids)  # (S, k)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * cfg.route_scale
        perm, inv_perm, sorted_ids, counts, ends = _sort_by_expert(ids, cfg.n_routed_experts)
        return Routing(logits, probs, ids, weights, perm, inv_perm, sorted_ids, counts, ends)

    def capacity(self, n_tokens: int) -> int:
        """Copies an expert keeps: ceil(capacity_factor * N / E), or 0 for dropless."""
        cfg = self.cfg
        if cfg.capacity_factor <= 0:
            return 0
        return math.ceil(cfg.capacity_factor * n_tokens * cfg.num_experts_per_tok / cfg.n_routed_experts)

    def dispatch_mode(self, x2: Tensor) -> str:
        """The concrete expert-compute path for this input (resolves `auto`)."""
        mode, dtype = self.cfg.dispatch, _compute_dtype(x2)
        supported = grouped_mm_supported(x2.device, dtype, (self.d_model, self.cfg.moe_inter_dim))
        if mode == "grouped_mm" and not supported:
            raise ConfigError(
                f"model.moe.dispatch = 'grouped_mm': torch._grouped_mm does not run on {x2.device.type} "
                f"with {dtype} and d_model={self.d_model}, moe_inter_dim={self.cfg.moe_inter_dim} "
                "(needs torch >= 2.9, CUDA bf16 sm80+ or CPU, 16-byte aligned dims); use 'auto'")
        if mode == "auto":  # bf16 only: fp32 grouped_mm runs on CPU but cannot be compiled
            return "grouped_mm" if supported and dtype == torch.bfloat16 else "padded_bmm"
        return mode

    def _routed(self, x2: Tensor, r: Routing, capacity: int, gathered: tuple[Tensor, ...] | None = None) -> Tensor:
        """Routed experts for all S tokens: (S, D), in the compute dtype. gathered: EP's prefetch."""
        if self.expert_parallel is not None:
            return self.expert_parallel.routed(self, x2, r, capacity, gathered)
        mode, k = self.dispatch_mode(x2), self.cfg.num_experts_per_tok
        dtype = _compute_dtype(x2)
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        w3 = self.w3.to(dtype) if self.w3 is not None else None
        act = self.cfg.activation
        with torch.autocast(x2.device.type, enabled=False):
            x2 = x2.to(dtype)
            if mode == "naive_loop":
                return naive_loop_experts(x2, r.ids, r.weights, capacity, w1, w2, w3, act)
            scale = r.weights.reshape(-1)[r.perm]  # (N,) combine weight of each copy, expert order
            if capacity:
                scale = scale * (_position_in_group(r.sorted_ids, r.counts, r.ends) < capacity)
            token_idx = r.perm // k  # (N,) token of each copy, expert order
            xs = _Dispatch.apply(x2, token_idx, r.inv_perm, k)  # (N, D)
            if mode == "grouped_mm":
                o = grouped_mm_experts(xs, scale, r.ends, w1, w2, w3, act)  # (N, D)
            else:
                o = padded_bmm_experts(xs, scale, r.sorted_ids, r.counts, r.ends, w1, w2, w3, act)
            return _Combine.apply(o, r.inv_perm, token_idx, k)  # (S, D)

    # -- load balancing ------------------------------------------------------------------------

    def _aux_loss(self, r: Routing, batch: int) -> Tensor:
        """Weighted sum of the enabled balance losses; remembers each term for `load_stats`."""
        cfg = self.cfg
        n_experts, n_slots = cfg.n_routed_experts, r.ids.numel()
        terms: dict[str, tuple[float, Tensor]] = {}
        if cfg.aux_loss_coef > 0:
            counts = r.counts if self.expert_parallel is None else self.expert_parallel.group_counts(r.counts)
            f = counts.float() / counts.sum()  # (E,) share of slots (of the whole EP group under EP)
            terms["aux_balance"] = (cfg.aux_loss_coef, n_experts * (f * r.probs.mean(0)).sum())
        if cfg.seq_aux_loss_coef > 0:
            seq = torch.arange(batch, device=r.ids.device).repeat_interleave(r.ids.numel() // batch)  # (N,)
            keys = seq * n_experts + r.ids.reshape(-1)  # (N,) (sequence, expert) pairs
            seq_counts, _ = _histogram(keys.sort().values, batch * n_experts)  # (B*E,)
            f_seq = seq_counts.view(batch, n_experts).float() / (n_slots // batch)  # (B, E)
            p_seq = r.probs.view(batch, -1, n_experts).mean(1)  # (B, E)
            terms["aux_seq"] = (cfg.seq_aux_loss_coef, n_experts * (f_seq * p_seq).sum(-1).mean())
        if cfg.z_loss_coef > 0:
            terms["z_loss"] = (cfg.z_loss_coef, torch.logsumexp(r.logits, -1).square().mean())
        aux = r.logits.new_zeros(())
        for coef, value in terms.values():
            aux = aux + coef * value
        self._last_aux = {name: value.detach() for name, (_, value) in terms.items()}
        self._last_aux["aux_loss"] = aux.detach()
        return aux

    @torch.no_grad()
    def _count(self, r: Routing, capacity: int) -> None:
        """Accumulate per-expert token counts (and dropped copies) on the device, no sync."""
        self._load_counts += r.counts
        if self.cfg.bias_update_speed > 0:
            self._bias_counts += r.counts
        if capacity:
            self._dropped += (r.counts - capacity).clamp(min=0).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing: expert_bias += gamma * sign(mean load - load), then reset the count.

        Call after each optimizer step (all ranks). Counts are all-reduced first under torch.distributed
        so every rank applies the same update. No-op when bias_update_speed == 0 or nothing was counted.
        """
        update_biases([self])

    def load_stats(self, reset: bool = True) -> dict:
        """Per-expert token share since the last reset, imbalance, last aux losses (python numbers).

        Local to this rank (no collective). `reset` zeroes the counts afterwards.
        """
        n_experts = self.cfg.n_routed_experts
        stats: dict = {name: float(v) for name, v in self._last_aux.items()}
        stats["expert_bias_absmax"] = float(self.expert_bias.abs().max())
        if int(self._load_counts.sum()) == 0:
            return stats
        counts = self._load_counts.double()
        share = counts / counts.sum()  # (E,)
        stats.update(expert_share=[round(v, 6) for v in share.tolist()],
                     max_over_mean=float(share.max()) * n_experts,
                     min_over_mean=float(share.min()) * n_experts,
                     tokens_routed=int(counts.sum()))
        if self.cfg.capacity_factor > 0:
            stats["drop_frac"] = float(self._dropped) / float(counts.sum())
        if reset:
            self._load_counts.zero_()
            self._dropped.zero_()
        return stats


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts run in: the autocast dtype when autocast is on, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
