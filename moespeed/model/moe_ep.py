"""Expert parallelism (EP) for the MoE layer: routed experts split over a group of P ranks.

Rank p of the EP group holds experts [p*E/P, (p+1)*E/P) (its `w1`, `w2`, `w3` are those slices);
router, expert_bias and shared experts stay replicated. `moespeed.train.distributed` installs an
`ExpertParallel` as `moe.expert_parallel`; `MoE` then calls `routed()` instead of its single-device
path. Every rank routes its own S tokens (N = S*k copies). Two dispatchers move the copies
(`train.ep_dispatch`):

"alltoall": each copy travels to the rank of its expert and back.

    1. sort     copies in expert order (MoE.route did it): grouped by destination rank too  (N, D)
    2. counts   all_to_all of the per-expert counts (P, E/P) -> what each source sends me  (P, E/P)
    3. send     all_to_all_single with uneven splits: copies go to the rank of their expert (M, D)
    4. experts  received rows re-sorted by local expert (src-major -> expert-major), then the
                same grouped-GEMM expert FFN as the single-device path                       (M, D)
    5. return   back to src-major order, all_to_all_single with the splits reversed           (N, D)
    6. combine  times the routing weights, un-permute and sum each token's k copies            (S, D)

"allgather": every rank sees every token of the group and keeps the copies of its own experts.

    1. gather   all-gather x (compute dtype; started before the router, `prefetch`; in `chunks`
                pieces, steps 1-5 per piece, when asked) and
                [weights | expert ids] (fp32) of the group                                  (P*S, .)
    2. sort     the P*S*k copies by local expert; copies of other ranks' experts go last
                (a sentinel id); offsets per local expert by searchsorted, on the device       (P*S*k,)
    3. experts  the same grouped-GEMM expert FFN over the sorted rows (weights applied inside) (P*S*k, D)
    4. combine  un-permute and sum each token's k copies (non-local rows are 0)               (P*S, D)
    5. scatter  reduce-scatter (sum) over the group: this rank's tokens                       (S, D)

Trade-offs. All-to-all moves each copy once each way: about S*k*D*(P-1)/P elements per rank and
direction, but its split sizes are Python ints: one host sync per layer (step 2's `.tolist()`)
that stalls the CPU's kernel queue, forward and backward. All-gather + reduce-scatter move
(P-1)*S*D elements per rank and direction, whatever the routing, with static shapes and no host
sync; fewer bytes than all-to-all when top_k >= P, so `choose_dispatch("auto", ...)` takes it then.
Its price is memory: each rank holds P*S*k rows in the expert FFN (P times the all-to-all path;
rows of other ranks' experts are allocated but, with `grouped_mm`, not computed) and the P*S
gathered tokens. Every rank of the group must pass the same number of tokens S (true in training
and eval: the batch shape is fixed); ranks that get no copy still join every collective.

`train.ep_masked_rows` (allgather): the dispatch and combine use `moespeed.kernels.masked_rows`,
which read and write only the live rows (the first ends[-1] of the sort, a count on the device) and
need no `torch.where` over all P*S*k rows; the unmasked kernels spend 2x their one-GPU time there
at EP = 2. Off by default until measured on two GPUs.

Garbage rows: `torch._grouped_mm` computes only rows up to offs[-1]; the rows after it (copies of
other ranks' experts) are uninitialized in the forward output and in the backward's input grads.
So `torch.where` zeroes them on the FFN's input, its routing weights and its output, which also
stops their gradients (a multiply by 0 would turn NaN garbage into NaN).

Backward: `_AllToAll`'s gradient is the all-to-all with input and output splits swapped;
all-gather's is reduce-scatter and vice versa (functional collectives, traced by torch.compile); the re-sorts reuse
MoE's `_Dispatch`/`_Combine` (gather <-> un-permute). A rank that receives no copy keeps its (empty)
expert output attached to the graph so that it still joins the backward collectives; its expert
weights then get zero or no gradient (the trainer fills in zeros).

Balance statistics: `group_counts` sums the per-expert counts over the EP group, so the expert-level
aux loss uses the load of the whole group (each rank multiplies it with its own mean probabilities;
the data-parallel mean of that is the aux loss of the group's batch). The same for both dispatchers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

from ..kernels.masked_rows import masked_combine, masked_dispatch
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


DISPATCHERS = ("auto", "alltoall", "allgather")


def choose_dispatch(mode: str, top_k: int, ep_size: int) -> str:
    """The concrete dispatcher: `auto` takes allgather when top_k >= ep_size (fewer bytes, no host
    sync: see the module doc), alltoall otherwise."""
    if mode not in DISPATCHERS:
        raise ValueError(f"EP dispatcher {mode!r}: allowed are {' | '.join(DISPATCHERS)}")
    if mode == "auto":
        return "allgather" if top_k >= ep_size else "alltoall"
    return mode


def _gather_rows(x: Tensor, group) -> Tensor:
    """All-gather of rows over the group: (S, ...) -> (P*S, ...), rank-major; backward reduce-scatters.

    A functional collective, so torch.compile traces it (no graph break) and can schedule it."""
    return fc.all_gather_tensor_autograd(x.contiguous(), 0, group)


def _scatter_rows(x: Tensor, group) -> Tensor:
    """Reduce-scatter (sum) of rows: (P*S, ...) -> (S, ...), this rank's block; backward all-gathers.

    `reduce_scatter_tensor` runs on NCCL and, since torch 2.3, on gloo (CPU tests)."""
    return fc.reduce_scatter_tensor_autograd(x.contiguous(), "sum", 0, group)


class _LocalOrder(NamedTuple):
    """Local-expert order of the M rows this rank computes (allgather: sentinel rows last)."""

    perm: Tensor  # (M,) source row of the n-th row in local-expert order
    inv_perm: Tensor  # (M,) position in local-expert order of source row m
    sorted_ids: Tensor  # (M,) local expert of the n-th row in local-expert order
    counts: Tensor  # (E/P,) rows per local expert
    ends: Tensor  # (E/P,) end row of each local expert's group


class ExpertParallel:
    """Moves each token copy to the EP rank holding its expert and brings the result back."""

    def __init__(self, group, n_experts: int, dispatch: str = "alltoall", chunks: int = 1,
                 masked_rows: bool = False):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} routed experts cannot be split over {self.size} EP ranks")
        if dispatch not in ("alltoall", "allgather"):
            raise ValueError(f"EP dispatcher {dispatch!r}: use choose_dispatch() to resolve 'auto'")
        if chunks < 1:
            raise ValueError(f"EP chunks = {chunks}: must be >= 1")
        self.dispatch, self.chunks = dispatch, chunks  # chunks: allgather only (see `_routed_allgather`)
        self.masked_rows = masked_rows  # allgather only: dispatch/combine skip other ranks' rows
        self.n_local = n_experts // self.size
        self.first = self.rank * self.n_local  # global id of this rank's first expert

    def expert_slice(self) -> slice:
        """The rows of a full (E, ...) expert stack that this rank holds."""
        return slice(self.first, self.first + self.n_local)

    @torch.no_grad()
    def group_counts(self, counts: Tensor) -> Tensor:
        """(E,) copies per expert summed over the EP group (a functional all-reduce: traceable)."""
        return fc.all_reduce(counts, "sum", self.group)

    def prefetch(self, x2: Tensor) -> tuple[Tensor, ...] | None:
        """allgather: start the all-gathers of the group's tokens, one per chunk ((P*S/chunks, D) each,
        compute dtype), before the router runs, so that routing overlaps the transfer (the wait comes
        at first use); else None."""
        if self.dispatch != "allgather":
            return None
        x2 = x2.to(_compute_dtype(x2))
        return tuple(_gather_rows(piece, self.group) for piece in x2.tensor_split(self.chunks))

    def routed(self, moe, x2: Tensor, r, capacity: int, gathered: tuple[Tensor, ...] | None = None) -> Tensor:
        """The routed experts' output (S, D) for this rank's tokens x2 (S, D) and routing r;
        gathered: `prefetch(x2)` where the caller started it."""
        dtype = _compute_dtype(x2)
        weights = (moe.w1.to(dtype), moe.w2.to(dtype), moe.w3.to(dtype) if moe.w3 is not None else None)
        mode, act = moe.dispatch_mode(x2), moe.cfg.activation
        with torch.autocast(x2.device.type, enabled=False):
            x2 = x2.to(dtype)
            keep = _position_in_group(r.sorted_ids, r.counts, r.ends) < capacity if capacity else None  # (N,)
            if self.dispatch == "allgather":
                return self._routed_allgather(x2, r, keep, mode, weights, act, gathered)
            return self._routed_alltoall(x2, r, keep, mode, weights, act)

    @torch.compiler.disable  # split sizes go to the host: a graph break (the allgather path compiles)
    def _routed_alltoall(self, x2: Tensor, r, keep: Tensor | None, mode: str, weights, act: str) -> Tensor:
        """Copies to their expert's rank and back with uneven all-to-alls (one host sync)."""
        k = r.ids.shape[1]
        scale = r.weights.reshape(-1)[r.perm]  # (N,) combine weight of each copy, expert order
        if keep is not None:  # dropped copies still travel; they are weighted 0 on return
            scale = scale * keep
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
        if xe.shape[0] == 0:  # nothing routed here: an empty output that stays attached to the graph
            o = xe * 0
        else:
            o = self._experts(mode, xe, xe.new_ones(xe.shape[0], dtype=torch.float32), order, weights, act)
        o = _Combine.apply(o, order.inv_perm, order.perm, 1)  # (M, D) back to source-major
        ys = all_to_all(o, send_splits, recv_splits, self.group)  # (N, D) expert order, at home
        ys = ys * scale.unsqueeze(-1).to(ys.dtype)
        return _Combine.apply(ys, r.inv_perm, token_idx, k)  # (S, D)

    def _routed_allgather(self, x2: Tensor, r, keep: Tensor | None, mode: str, weights, act: str,
                          gathered: tuple[Tensor, ...] | None = None) -> Tensor:
        """All-gather the group's tokens (or take `gathered`), run the local experts on their copies,
        reduce-scatter back. With chunks > 1 the tokens go in that many pieces, each gathered, computed
        and scattered on its own: a piece's exchange can overlap another piece's expert FFN."""
        s, k = r.ids.shape
        w = r.weights  # (S, k) fp32
        if keep is not None:  # capacity is per source rank: drop here, before gathering
            w = w * keep[r.inv_perm].view(s, k)
        gathered = self.prefetch(x2) if gathered is None else gathered
        pieces = zip(gathered, w.tensor_split(self.chunks), r.ids.tensor_split(self.chunks))
        out = [self._allgather_piece(xg, wp, ids, mode, weights, act) for xg, wp, ids in pieces]
        return out[0] if len(out) == 1 else torch.cat(out)  # (S, D)

    def _allgather_piece(self, xg: Tensor, w: Tensor, ids: Tensor, mode: str, weights, act: str) -> Tensor:
        """One piece of the allgather dispatch: gathered tokens xg (P*s, D), this rank's routing
        weights w and expert ids (s, k) -> this rank's tokens' routed output (s, D)."""
        k = ids.shape[1]
        # ids ride along with the weights as fp32 (exact below 2**24): one collective, not two
        meta = _gather_rows(torch.cat([w, ids.to(w.dtype)], 1), self.group)  # (P*s, 2k)
        wg, ids = meta[:, :k], meta[:, k:].detach().long() - self.first  # (P*s, k) each, local ids
        mine = (ids >= 0) & (ids < self.n_local)  # (P*s, k)
        order, live = self._sentinel_order(torch.where(mine, ids, self.n_local))
        token_idx = order.perm // k  # (P*s*k,) gathered token of each row
        scale = torch.where(live, wg.reshape(-1)[order.perm], 0)  # (P*s*k,) fp32
        column = live.unsqueeze(-1)  # (P*s*k, 1)
        # masked rows: kernels that touch only the live rows (grouped_mm never reads the others)
        n_live, zero_dead = order.ends[-1], mode != "grouped_mm"  # () live rows, on the device
        if self.masked_rows:
            xs = masked_dispatch(xg, token_idx, order.inv_perm, k, n_live, zero_dead)  # (P*s*k, D)
        else:  # rows past the last local expert zeroed: no grad flows back
            xs = torch.where(column, _Dispatch.apply(xg, token_idx, order.inv_perm, k), 0)  # (P*s*k, D)
        o = self._experts(mode, xs, scale, order, weights, act)  # (P*s*k, D), garbage past `live`
        if self.masked_rows:
            y = masked_combine(o, order.inv_perm, token_idx, k, n_live, zero_dead)  # (P*s, D)
        else:
            y = _Combine.apply(torch.where(column, o, 0), order.inv_perm, token_idx, k)  # (P*s, D)
        return _scatter_rows(y, self.group)  # (s, D) this rank's experts' share, summed over the group

    def _local_order(self, recv_counts: Tensor, n_rows: int) -> _LocalOrder:
        """Sort of the received rows (source-major, then expert) into local-expert order."""
        local_ids = torch.arange(self.n_local, device=recv_counts.device).repeat(self.size)  # (P*E/P,)
        row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1), output_size=n_rows)  # (M,)
        return _LocalOrder(*_sort_by_expert(row_expert.view(-1, 1), self.n_local))

    def _sentinel_order(self, key: Tensor) -> tuple[_LocalOrder, Tensor]:
        """Sort of copies by local expert id key in [0, E/P], where E/P (a sentinel) marks copies of
        other ranks' experts: they go last, after the local groups (static shapes, no sync).
        Returns the order and live (M,): True for the rows of this rank's experts."""
        perm, inv_perm, sorted_ids, counts, ends = _sort_by_expert(key, self.n_local + 1)  # sentinel group last
        live = sorted_ids < self.n_local  # (M,)
        return _LocalOrder(perm, inv_perm, sorted_ids.clamp(max=self.n_local - 1), counts[:-1], ends[:-1]), live

    @staticmethod
    def _experts(mode: str, xe: Tensor, scale: Tensor, order: _LocalOrder, weights, act: str) -> Tensor:
        """Local expert FFNs over rows grouped by local expert: (M, D). Rows past the last group
        (allgather: copies of other ranks' experts) come out as garbage (grouped_mm) or as the last
        expert's FFN of them (padded_bmm, which needs every row in a group)."""
        w1, w2, w3 = weights
        if mode == "grouped_mm":  # computes rows up to ends[-1] only
            return grouped_mm_experts(xe, scale, order.ends, w1, w2, w3, act)
        tail = xe.shape[0] - order.ends[-1:]  # (1,) rows past the last group
        counts = torch.cat([order.counts[:-1], order.counts[-1:] + tail])  # (E/P,)
        ends = torch.cat([order.ends[:-1], order.ends[-1:] + tail])  # (E/P,) the last group runs to M
        return padded_bmm_experts(xe, scale, order.sorted_ids, counts, ends, w1, w2, w3, act)
