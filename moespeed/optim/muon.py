"""Muon: momentum + Newton–Schulz orthogonalization for hidden matrices (2-D) and expert stacks (3-D).

How a step works, per parameter `p` with gradient `g` (the math of `torch.optim.Muon`):

    buf = momentum * buf + (1 - momentum) * g                 # buf.lerp_(g, 1 - momentum)
    u   = (1 - momentum) * g + momentum * buf  if nesterov else buf
    O   = NS(u)                                               # bf16, ~ U V^T of u = U S V^T
    p  *= 1 - lr * weight_decay                               # decoupled weight decay
    p  -= lr * scale(rows, cols) * O

NS is the quintic Newton–Schulz iteration X <- a X + (b A + c A^2) X with A = X X^T, run in bf16 on
X = u / ||u||_F (so every singular value starts in (0, 1]); the default coefficients
(3.4445, -4.7750, 2.0315) with 5 steps push singular values into roughly [0.7, 1.2], not exactly 1,
which works as well in practice. `scale` makes updates of rectangular matrices comparable:
"original" = sqrt(max(1, rows / cols)) (Keller Jordan), "match_rms_adamw" = 0.2 * sqrt(max(rows, cols))
(Moonshot; update RMS ~0.2 like AdamW's, so AdamW learning rate and weight decay carry over).
For 2-D params the result equals `torch.optim.Muon` with the same hyperparameters.

Shapes. Muon orthogonalizes *blocks*, the last two dims of a param, which are (rows, cols) as in an
`nn.Linear` weight (out_features, in_features):
  * 2-D `[rows, cols]`: one block.
  * 3-D `[E, rows, cols]` (stacked expert weights): E blocks, one per expert.
  * split: a param with attribute `p._muon_split = n` (or in a group with option `split=n`; the
    attribute wins) is cut into n row-blocks of `[rows / n, cols]`, e.g. a query projection
    `[n_heads * head_dim, d_model]` orthogonalized per head. Only row-blocks are supported.
`scale` uses the block shape. All blocks of equal shape (and equal NS settings) across all params and
groups are stacked and orthogonalized in one batched call (`baddbmm`), in chunks of at most
`batch_numel` elements per rank to bound memory.

Distributed. When torch.distributed is initialized with more than one rank, params in groups with
`replicated=True` (the default) must be identical on every rank of `process_group` (DDP: full
replicas; FSDP2: DTensors, whose full value is what counts). The blocks of each shape are split into
contiguous, balanced shares, one per rank (remainder blocks go to the ranks with the least NS work so
far, measured in FLOPs), so every block is orthogonalized by exactly one rank; the results are
all-gathered and every rank applies every update. Momentum buffers stay replicated (every rank
updates all of them, a cheap elementwise op) so that any rank's `state_dict()` is complete.
Collectives depend only on the param list, never on which grads exist: a param whose `.grad` is
None still takes part (its owner orthogonalizes zeros) and is then left untouched (no weight decay,
no momentum change), like `torch.optim.Muon` skips it. Ranks must therefore hold the same param
list in the same order.
DTensor params (FSDP2, sharded on any dim): each rank updates its local momentum shard, the update
`u` is gathered with `full_tensor()` on every rank (simple; the bytes moved equal one FSDP param
all-gather in bf16), the owner of each block orthogonalizes it, and every rank adds the local shard of
the full update. Use `replicated=False` for params that differ between ranks (e.g. expert-parallel
local experts, pipeline stages): each rank then orthogonalizes all of them itself, with no collective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor (FSDP2 params); absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor, distribute_tensor = (), None

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
ADJUST_LR_FNS = ("original", "match_rms_adamw")
BATCH_NUMEL = 2**26  # elements per batched NS call per rank (128 MiB of bf16 input)

# Name components (split on ".") that keep a 2-D/3-D param out of Muon; see `muon_eligible`.
_EXCLUDED_SUBSTRINGS = ("embed", "norm", "bias")
_EXCLUDED_COMPONENTS = ("lm_head", "head", "router", "gate")


def newton_schulz(G: Tensor, steps: int = NS_STEPS,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = EPS) -> Tensor:
    """Orthogonalize each matrix of `G` (..., rows, cols) with the quintic Newton–Schulz iteration.

    Runs in bf16 and returns bf16 of G's shape; every matrix is normalized on its own.
    """
    a, b, c = coefficients
    rows, cols = G.shape[-2:]
    X = G.reshape(-1, rows, cols).bfloat16()  # (n, rows, cols); a copy unless G was bf16
    tall = rows > cols
    if tall:
        X = X.mT  # (n, cols, rows): keeps the Gram matrix A the smaller side
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= ||X||_F = 1
    for _ in range(steps):
        A = X @ X.mT  # (n, m, m), m = min(rows, cols)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if tall:
        X = X.mT  # (n, rows, cols)
    return X.reshape(G.shape)


def ns_flops(rows: int, cols: int, steps: int = NS_STEPS) -> int:
    """Matmul FLOPs of `newton_schulz` on one (rows, cols) matrix."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)  # X X^T and B X: 2 m^2 n each; A A: 2 m^3


def lr_scale(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Factor on the learning rate for an orthogonalized (rows, cols) block."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn = {adjust_lr_fn!r}: use one of {ADJUST_LR_FNS}")


def muon_eligible(name: str, p: torch.nn.Parameter) -> bool:
    """Whether the param named `name` should be trained by Muon (else AdamW).

    Rule: a param's own `_muon_eligible` attribute (True/False) wins, e.g. for PEER's expert tables,
    which are 2-D but embedding-like. Otherwise 2-D and 3-D params are hidden matrices, except when a
    dotted component of the name contains "embed", "norm" or "bias", or equals "lm_head", "head",
    "router" or "gate" (a MoE router, as DeepSeek names it; "gate_proj" of a SwiGLU MLP stays
    eligible). Everything else (vectors, scalars) goes to AdamW.
    """
    override = getattr(p, "_muon_eligible", None)
    if override is not None:
        return bool(override) and p.ndim in (2, 3)
    if p.ndim not in (2, 3):
        return False
    parts = name.lower().split(".")
    if any(s in part for part in parts for s in _EXCLUDED_SUBSTRINGS):
        return False
    return not any(part in _EXCLUDED_COMPONENTS for part in parts)


@dataclass(eq=False)
class _Job:
    """One param in one step: its blocks, and their NS input and output once known."""

    param: Tensor
    group: dict
    blocks: int  # matrices to orthogonalize: E * split (3-D) or split (2-D)
    rows: int  # block shape
    cols: int
    pending: int  # blocks whose orthogonalized update has not arrived yet
    u: Tensor | None = None  # (blocks, rows, cols) bf16, full (not sharded) NS input
    out: Tensor | None = None  # (blocks, rows, cols) bf16, orthogonalized update


def _split(p: Tensor, group: dict) -> int:
    return getattr(p, "_muon_split", None) or group["split"]


def _partition(n_blocks: int, world: int, loads: list[int], cost: int) -> list[int]:
    """Blocks per rank for `n_blocks` equal blocks: balanced, remainder to the least loaded ranks."""
    base, extra = divmod(n_blocks, world)
    counts = [base] * world
    for k in sorted(range(world), key=lambda k: (loads[k], k))[:extra]:
        counts[k] += 1
    for k in range(world):
        loads[k] += counts[k] * cost
    return counts


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    gather(out, inp, group=group)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D and 3-D params; batched over equal block shapes; work split across ranks.

    Per-group options: lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps,
    adjust_lr_fn ("original" | "match_rms_adamw"), split (row-blocks per matrix, default 1; a
    param's `_muon_split` attribute wins), replicated (params identical on all ranks: split the
    work; False: every rank orthogonalizes its own params). `process_group` (default: the world)
    is where the work of replicated params is shared; `batch_numel` caps one NS batch per rank.
    See the module docstring for the algorithm.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 ns_steps: int = NS_STEPS, eps: float = EPS, adjust_lr_fn: str | None = "original",
                 split: int = 1, replicated: bool = True, *, process_group=None,
                 batch_numel: int = BATCH_NUMEL) -> None:
        if batch_numel < 1:
            raise ValueError(f"batch_numel = {batch_numel}: must be >= 1")
        self.process_group = process_group
        self.batch_numel = batch_numel
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, eps=eps,
                        adjust_lr_fn=adjust_lr_fn, split=split, replicated=replicated)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _world(self) -> tuple[int, int]:
        """(world size, rank) of the group that shares work; (1, 0) when not distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = self._world()
        loads = [0] * world  # NS FLOPs assigned to each rank so far this step
        for (rows, cols, steps, *_, shared), jobs in self._jobs_by_block_class(world > 1).items():
            w, r, w_loads = (world, rank, loads) if shared else (1, 0, [0])
            segments = [(job, 0, job.blocks) for job in jobs]
            per_round = w * max(1, self.batch_numel // (rows * cols))
            for round_segments in _rounds(segments, per_round):
                n_blocks = sum(b1 - b0 for _, b0, b1 in round_segments)
                counts = _partition(n_blocks, w, w_loads, ns_flops(rows, cols, steps))
                self._run_round(round_segments, counts, r, shared)
        return loss

    def _jobs_by_block_class(self, distributed: bool) -> dict[tuple, list[_Job]]:
        """Update momentum buffers; group this step's params by (block shape, NS settings, shared)."""
        classes: dict[tuple, list[_Job]] = {}
        for group in self.param_groups:
            shared = distributed and group["replicated"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update_momentum(p, group)
                elif not (shared or isinstance(p, DTensor)):
                    continue  # no collective depends on it: skip, like torch.optim.Muon
                n = _split(p, group)
                rows, cols = p.shape[-2] // n, p.shape[-1]
                blocks = (p.shape[0] if p.ndim == 3 else 1) * n
                key = (rows, cols, group["ns_steps"], group["ns_coefficients"], group["eps"],
                       _compute_device(p), shared)
                classes.setdefault(key, []).append(_Job(p, group, blocks, rows, cols, pending=blocks))
        return classes

    def _update_momentum(self, p: Tensor, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse or torch.is_complex(grad):
            raise RuntimeError("Muon supports only dense real gradients")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["momentum_buffer"].lerp_(grad, 1 - group["momentum"])

    def _ns_input(self, job: _Job) -> Tensor:
        """The full (blocks, rows, cols) bf16 update to orthogonalize (zeros when grad is None)."""
        if job.u is None:
            p, group = job.param, job.group
            if p.grad is None:
                u = torch.zeros_like(p, dtype=torch.bfloat16)
            else:
                buf = self.state[p]["momentum_buffer"]
                u = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                u = u.bfloat16()
            if isinstance(u, DTensor):
                u = u.full_tensor()  # collective on p's mesh
            job.u = u.reshape(job.blocks, job.rows, job.cols)  # (blocks, rows, cols)
        return job.u

    def _run_round(self, segments: list[tuple[_Job, int, int]], counts: list[int], rank: int,
                   shared: bool) -> None:
        """Orthogonalize this rank's share of the round's blocks, gather all shares, apply."""
        for job, _, _ in segments:  # DTensor inputs are collectives: every rank, same order
            if isinstance(job.param, DTensor):
                self._ns_input(job)
        start = sum(counts[:rank])
        mine = _slice(segments, start, start + counts[rank])
        job0 = segments[0][0]
        Y = None  # (counts[rank], rows, cols): this rank's orthogonalized blocks
        if mine:
            X = torch.cat([self._ns_input(job)[b0:b1] for job, b0, b1 in mine])  # (n, rows, cols)
            g = job0.group
            Y = newton_schulz(X, g["ns_steps"], g["ns_coefficients"], g["eps"])
        if shared:
            Y = self._gather_shares(Y, counts, job0)
        offset = 0
        for job, b0, b1 in segments:  # Y holds the round's blocks in segment order
            self._receive(job, b0, b1, Y[offset:offset + b1 - b0])
            offset += b1 - b0

    def _gather_shares(self, mine: Tensor | None, counts: list[int], job0: _Job) -> Tensor:
        """All-gather each rank's orthogonalized blocks; returns them in order (sum(counts), r, c)."""
        world, most = len(counts), max(counts)
        shape = (job0.rows, job0.cols)
        device = mine.device if mine is not None else _compute_device(job0.param)
        send = torch.zeros(most, *shape, dtype=torch.bfloat16, device=device)  # (most, rows, cols)
        if mine is not None:
            send[:len(mine)] = mine
        out = torch.empty(world * most, *shape, dtype=torch.bfloat16, device=device)
        _all_gather(out, send, self.process_group)
        out = out.view(world, most, *shape)  # (world, most, rows, cols)
        return torch.cat([out[k, :counts[k]] for k in range(world)])  # (sum(counts), rows, cols)

    def _receive(self, job: _Job, b0: int, b1: int, update: Tensor) -> None:
        """Store blocks [b0, b1) of job's orthogonalized update; apply it once complete."""
        if b0 == 0 and b1 == job.blocks:
            job.out = update
        else:
            if job.out is None:
                job.out = update.new_empty(job.blocks, job.rows, job.cols)  # (blocks, rows, cols)
            job.out[b0:b1] = update
        job.pending -= b1 - b0
        if job.pending == 0:
            self._apply(job)
            job.u = job.out = None

    def _apply(self, job: _Job) -> None:
        p, group = job.param, job.group
        if p.grad is None:
            return  # zero update
        update = job.out.reshape(p.shape)  # (rows, cols) or (E, rows, cols) of the full param
        if isinstance(p, DTensor):
            update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
        lr = float(group["lr"])
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-lr * lr_scale(group["adjust_lr_fn"], job.rows, job.cols))


def _compute_device(p: Tensor) -> torch.device:
    return p.to_local().device if isinstance(p, DTensor) else p.device


def _rounds(segments: list[tuple[_Job, int, int]], size: int):
    """Cut a list of (job, first block, end block) into consecutive rounds of `size` blocks."""
    current, room = [], size
    for job, b0, b1 in segments:
        while b0 < b1:
            take = min(room, b1 - b0)
            current.append((job, b0, b0 + take))
            b0, room = b0 + take, room - take
            if room == 0:
                yield current
                current, room = [], size
    if current:
        yield current


def _slice(segments: list[tuple[_Job, int, int]], start: int, end: int) -> list[tuple[_Job, int, int]]:
    """The blocks [start, end) of the concatenated segments, as segments."""
    out, offset = [], 0
    for job, b0, b1 in segments:
        lo, hi = max(start, offset), min(end, offset + b1 - b0)
        if lo < hi:
            out.append((job, b0 + lo - offset, b0 + hi - offset))
        offset += b1 - b0
    return out


def _check_group(group: dict) -> None:
    """Raise ValueError for a param group Muon cannot train."""
    for key in ("lr", "weight_decay", "momentum"):
        if not float(group[key]) >= 0:
            raise ValueError(f"Muon {key} = {group[key]}: must be >= 0")
    if group["adjust_lr_fn"] not in (None, *ADJUST_LR_FNS):
        raise ValueError(f"Muon adjust_lr_fn = {group['adjust_lr_fn']!r}: use one of {ADJUST_LR_FNS}")
    if not 0 < group["ns_steps"] < 100 or len(group["ns_coefficients"]) != 3:
        raise ValueError("Muon needs 0 < ns_steps < 100 and three ns_coefficients (a, b, c)")
    for p in group["params"]:
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon trains 2-D and 3-D params; got shape {tuple(p.shape)}: "
                             "give it to AdamW (see muon_eligible)")
        n = _split(p, group)
        if n < 1 or p.shape[-2] % n:
            raise ValueError(f"Muon split = {n} must divide the rows of shape {tuple(p.shape)}")
