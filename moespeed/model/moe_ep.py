"""Expert parallelism (EP) for the MoE layer: routed experts split over a group of P ranks.

Rank p of the EP group holds experts [p*E/P, (p+1)*E/P) (its `w1`, `w2`, `w3` are those slices);
router, expert_bias and shared experts stay replicated. `moespeed.train.distributed` installs an
`ExpertParallel` as `moe.expert_parallel`; `MoE` then calls `routed()` instead of its single-device
path. Every rank routes its own tokens; the flow of `routed()` for the N = S*k copies of one rank:

    1. sort     copies in expert order (MoE.route did it): grouped by destination rank too  (N, D)
    2. counts   all_to_all of the per-expert counts (P, E/P) -> what each source sends me  (P, E/P)
    3. send     all_to_all_single with uneven splits: copies go to the rank of their expert (M, D)
    4. experts  received rows re-sorted by local expert (src-major -> expert-major), then the
                same grouped-GEMM expert FFN as the single-device path                       (M, D)
    5. return   back to src-major order, all_to_all_single with the splits reversed           (N, D)
    6. combine  times the routing weights, un-permute and sum each token's k copies            (S, D)

Why all-to-all (and not all-gather + reduce-scatter): each copy travels once each way (N*D
elements per rank), whatever P; all-gathering every rank's tokens moves P times more and computes
the router's choices for all of them. The price is one host sync per layer (step 2's `.tolist()`:
`all_to_all_single` takes the split sizes as Python ints), and ranks that receive nothing
still take part in every collective, forward and backward.

Backward: `_AllToAll`'s gradient is the all-to-all with input and output splits swapped; the
re-sorts reuse MoE's `_Dispatch`/`_Combine` (gather <-> un-permute). A rank that receives no copy
keeps its (empty) expert output attached to the graph so that it still joins the backward
all-to-alls; its expert weights get no gradient there (the trainer fills in zeros).

Balance statistics: `group_counts` sums the per-expert counts over the EP group, so the expert-level
aux loss uses the load of the whole group (each rank multiplies it with its own mean probabilities;
the data-parallel mean of that is the aux loss of the group's batch).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .moe import (_Combine, _Dispatch, _compute_dtype, _position_in_group, _sort_by_expert, grouped_mm_experts,
                  padded_bmm_experts)


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; returns rows from every rank (sum(out_splits), ...)."""
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all of rows; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Differentiable `all_to_all_single` of the rows of x with uneven split sizes (Python ints)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _LocalOrder(NamedTuple):
    """Local-expert order of the M received rows."""

    perm: Tensor  # (M,) received row of the n-th row in local-expert order
    inv_perm: Tensor  # (M,) position in local-expert order of received row m
    sorted_ids: Tensor  # (M,) local expert of the n-th row in local-expert order
    counts: Tensor  # (E/P,) rows per local expert
    ends: Tensor  # (E/P,) end row of each local expert's group


class ExpertParallel:
    """Sends each token copy to the EP rank holding its expert and brings the result back."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} routed experts cannot be split over {self.size} EP ranks")
        self.n_local = n_experts // self.size
        self.first = self.rank * self.n_local  # global id of this rank's first expert

    def expert_slice(self) -> slice:
        """The rows of a full (E, ...) expert stack that this rank holds."""
        return slice(self.first, self.first + self.n_local)

    @torch.compiler.disable  # a graph break: collectives and their host sync run eagerly
    @torch.no_grad()
    def group_counts(self, counts: Tensor) -> Tensor:
        """(E,) copies per expert summed over the EP group."""
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)
        return counts

    @torch.compiler.disable  # the expert FFN's fused activation inside still compiles on CUDA
    def routed(self, moe, x2: Tensor, r, capacity: int) -> Tensor:
        """The routed experts' output (S, D) for this rank's tokens x2 (S, D) and routing r."""
        k, act = moe.cfg.num_experts_per_tok, moe.cfg.activation
        dtype = _compute_dtype(x2)
        w1, w2 = moe.w1.to(dtype), moe.w2.to(dtype)
        w3 = moe.w3.to(dtype) if moe.w3 is not None else None
        mode = moe.dispatch_mode(x2)
        with torch.autocast(x2.device.type, enabled=False):
            x2 = x2.to(dtype)
            scale = r.weights.reshape(-1)[r.perm]  # (N,) combine weight of each copy, expert order
            if capacity:  # dropped copies still travel; they are weighted 0 on return
                scale = scale * (_position_in_group(r.sorted_ids, r.counts, r.ends) < capacity)
            token_idx = r.perm // k  # (N,) token of each copy, expert order
            xs = _Dispatch.apply(x2, token_idx, r.inv_perm, k)  # (N, D), grouped by destination rank

            send_counts = r.counts.view(self.size, self.n_local)  # (P, E/P) copies for each rank's experts
            recv_counts = torch.empty_like(send_counts)  # (P, E/P) copies each source sends me
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            # one host sync: all_to_all_single takes the split sizes as Python ints
            send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()

            xr = all_to_all(xs, recv_splits, send_splits, self.group)  # (M, D) source-major
            order = self._local_order(recv_counts, sum(recv_splits))
            xe = _Dispatch.apply(xr, order.perm, order.inv_perm, 1)  # (M, D) grouped by local expert
            o = self._experts(mode, xe, order, w1, w2, w3, act)  # (M, D)
            o = _Combine.apply(o, order.inv_perm, order.perm, 1)  # (M, D) back to source-major
            ys = all_to_all(o, send_splits, recv_splits, self.group)  # (N, D) expert order, at home
            ys = ys * scale.unsqueeze(-1).to(dtype)
            return _Combine.apply(ys, r.inv_perm, token_idx, k)  # (S, D)

    def _local_order(self, recv_counts: Tensor, n_rows: int) -> _LocalOrder:
        """Sort of the received rows (source-major, then expert) into local-expert order."""
        local_ids = torch.arange(self.n_local, device=recv_counts.device).repeat(self.size)  # (P*E/P,)
        row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1), output_size=n_rows)  # (M,)
        perm, inv_perm, sorted_ids, counts, ends = _sort_by_expert(row_expert.view(-1, 1), self.n_local)
        return _LocalOrder(perm, inv_perm, sorted_ids, counts, ends)

    @staticmethod
    def _experts(mode: str, xe: Tensor, order: _LocalOrder, w1, w2, w3, act: str) -> Tensor:
        """Local expert FFNs (unweighted) over rows grouped by local expert: (M, D)."""
        if xe.shape[0] == 0:  # nothing routed here: an empty output that stays attached to the graph
            return xe * 0
        ones = xe.new_ones(xe.shape[0], dtype=torch.float32)  # (M,) routing weights are applied at home
        if mode == "grouped_mm":
            return grouped_mm_experts(xe, ones, order.ends, w1, w2, w3, act)
        return padded_bmm_experts(xe, ones, order.sorted_ids, order.counts, order.ends, w1, w2, w3, act)
