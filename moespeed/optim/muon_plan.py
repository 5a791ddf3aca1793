"""Muon's plan of a step: which matrices are orthogonalized together, and where they sit.

Muon orthogonalizes *blocks*, the last two dims of a param, which are (rows, cols) as in an
`nn.Linear` weight (out_features, in_features):
  * 2-D `[rows, cols]`: one block.
  * 3-D `[E, rows, cols]` (stacked expert weights): E blocks, one per expert.
  * split: a param with attribute `p._muon_split = n` (or in a group with option `split=n`; the
    attribute wins) is cut into n row-blocks of `[rows / n, cols]`, e.g. a query projection
    `[n_heads * head_dim, d_model]` orthogonalized per head. Only row-blocks are supported.
All blocks of equal shape (and equal NS settings) across all params and groups form a *class*
(`BlockClass`); each param is a `Job` in it. In a step a class is one bf16 stack
(n_blocks, rows, cols), cut between params when bigger than `stack_batches` (default STACK_BATCHES)
* `batch_numel` elements; on one GPU the cut classes run concurrently on Muon's side streams.

Merging: NS of a tall block is NS of its transpose, transposed back, so a class of tall (r, c)
blocks with at most `merge_numel` elements joins the class of wide (c, r) blocks, if there is one,
stored transposed: one batched NS call instead of two (small classes are latency-bound: ~0.4 ms each
on an H100 whatever their size). Its params keep their own `scale` (of (r, c)); the fused kernels
write and read them through one transposing copy per run of params (4 extra bytes per element,
hence the bound).

Padding: zero rows change nothing in NS of the other rows (A = X X^T, b A + c A^2 and its product
with X get zero rows and columns; the norm is the same), so wide classes with equal cols are
zero-padded to one shape while that costs at most `pad_flops` extra NS FLOPs (`pad_classes`), e.g.
(144, 768) blocks join (256, 768) ones: again one call fewer, at a copy per run like a transposed one.

Also here: how a class's NS is cut into rounds of at most `batch_numel` elements (`round_sizes`),
split between ranks (`partition`) and scheduled on side streams (`class_cost`, `assign_lanes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

try:  # DTensor (FSDP2 params); absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

from .newton_schulz import ns_flops

STACK_BATCHES = 4  # a stack holds at most this many batch_numel elements (or one bigger param)
MERGE_NUMEL = 2**23  # a tall class of at most this many elements joins its transposed wide class:
# latency-bound ones (H100: (768, 384) x12, (768, 512) x11, (3072, 768) x1), not (3072, 768) x12 (28M)
PAD_FLOPS = 10**11  # zero-padding that adds at most this many NS FLOPs may merge two classes
CALL_FLOPS = 10**11  # scheduling cost of one NS call (~0.3 ms: small NS calls are latency-bound)


@dataclass(eq=False)
class Job:
    """One param: its group and where its blocks lie in its class's stack."""

    param: Tensor
    group: dict
    start: int  # first block in the stack
    blocks: int  # matrices to orthogonalize: E * split (3-D) or split (2-D)
    rows: int  # the param's block shape (its class may store it transposed or zero-padded)
    cols: int
    transposed: bool = False  # tall blocks stored transposed in a class of wide ones


@dataclass(eq=False)
class BlockClass:
    """All blocks of one shape and NS setting, stacked as (n_blocks, rows, cols) in a step."""

    rows: int
    cols: int
    steps: int
    coefficients: tuple  # (a, b, c), or one such triple per step
    eps: float
    device: torch.device
    shared: bool  # work split across the ranks of the process group
    jobs: list[Job] = field(default_factory=list)
    n_blocks: int = 0
    padded: bool = False  # some jobs' blocks are smaller: the rest of their slots is zeros


def plan_classes(param_groups: list[dict], distributed: bool, merge_numel: int, pad_flops: int | None,
                 batch_numel: int, stack_batches: int = STACK_BATCHES) -> list[BlockClass]:
    """The params of `param_groups`, grouped into classes by (block shape, NS settings, device,
    shared): shared = split across ranks (`distributed` and the group is `replicated`). A param
    without a grad is left out unless a collective depends on it (shared or a DTensor). A class is
    cut between params where its stack would exceed stack_batches * batch_numel elements."""
    shapes: dict[tuple, list] = {}  # class key -> [(group index, numel, order, param, group)]
    for g, group in enumerate(param_groups):
        shared = distributed and group["replicated"]
        for p in group["params"]:
            if p.numel() == 0 or (p.grad is None and not (shared or isinstance(p, DTensor))):
                continue  # nothing to do, and no collective depends on it (like torch.optim.Muon)
            n = split_of(p, group)
            cls_key = (p.shape[-2] // n, p.shape[-1], group["ns_steps"], group["ns_coefficients"],
                       group["eps"], compute_device(p), shared)
            members = shapes.setdefault(cls_key, [])
            members.append((g, p.numel(), len(members), p, group))
    target = _class_targets(shapes, merge_numel, pad_flops)
    classes: dict[tuple, list] = {}  # class key -> [(group, transposed, rows, cols, numel, order, param, group)]
    for (rows, cols, *rest), members in shapes.items():
        cls_key, flip = target[(rows, cols, *rest)]
        classes.setdefault(cls_key, []).extend((g, flip, rows, cols, *m) for g, *m in members)
    plan = []
    for cls_key, members in classes.items():
        block_numel, cls = cls_key[0] * cls_key[1], None
        for _, flip, rows, cols, _, _, p, group in sorted(members, key=lambda m: m[:6]):  # equal shapes
            blocks = blocks_of(p, group)                                                  # side by side
            if cls is None or (cls.n_blocks + blocks) * block_numel > stack_batches * batch_numel:
                cls = BlockClass(*cls_key)  # a new stack: bounds the memory of one
                plan.append(cls)
            cls.jobs.append(Job(p, group, cls.n_blocks, blocks, rows, cols, flip))
            cls.n_blocks += blocks
            cls.padded |= ((cols, rows) if flip else (rows, cols)) != cls_key[:2]
    return plan


def _class_targets(shapes: dict[tuple, list], merge_numel: int, pad_flops: int | None
                   ) -> dict[tuple, tuple[tuple, bool]]:
    """Block shape key -> (key of its class, stored transposed). A tall shape of at most
    merge_numel elements joins its transposed wide shape; then wide shapes are padded into
    bigger ones (`pad_classes`; pad_flops None: PAD_FLOPS, CUDA classes only)."""
    target, blocks = {}, {}  # blocks: class key -> blocks in it
    for (rows, cols, *rest), members in shapes.items():
        flip = rows > cols and (cols, rows, *rest) in shapes \
            and sum(m[1] for m in members) <= merge_numel  # stored transposed, NS as wide blocks
        cls_key = (cols, rows, *rest) if flip else (rows, cols, *rest)
        target[(rows, cols, *rest)] = (cls_key, flip)
        blocks[cls_key] = blocks.get(cls_key, 0) + sum(blocks_of(p, group) for *_, p, group in members)
    if pad_flops is None:  # CUDA classes only: on a CPU, FLOPs cost more than calls
        blocks = {key: n for key, n in blocks.items() if key[-2].type == "cuda"}  # key[-2]: device
        pad_flops = PAD_FLOPS
    padded = pad_classes(blocks, pad_flops)
    return {raw: (padded.get(cls_key, cls_key), flip) for raw, (cls_key, flip) in target.items()}


def pad_classes(blocks: dict[tuple, int], pad_flops: int) -> dict[tuple, tuple]:
    """Wide class key -> key of the class it joins by zero-padding its blocks' rows (itself if none).

    Among wide classes (rows <= cols) with equal cols and NS settings, in ascending rows, a class
    joins the next bigger one while padding all the blocks gathered so far adds at most `pad_flops`
    NS FLOPs: one NS call fewer for a few cheap FLOPs. Zero rows leave NS of the other rows unchanged
    (A = X X^T, b A + c A^2 and its product with X get zero rows and columns), and stay zero.
    """
    sides: dict[tuple, list] = {}  # (cols, NS settings...) -> wide class keys
    for key in blocks:
        if key[0] <= key[1]:
            sides.setdefault(key[1:], []).append(key)
    target = {}
    for keys in sides.values():
        keys.sort(key=lambda k: k[0])
        runs, n = [[keys[0]]], blocks[keys[0]]  # runs of keys padded to the last one's rows; blocks in it
        for key in keys[1:]:
            rows, cols, steps = key[:3]
            if n * (ns_flops(rows, cols, steps) - ns_flops(runs[-1][-1][0], cols, steps)) <= pad_flops:
                runs[-1].append(key)
                n += blocks[key]
            else:
                runs.append([key])
                n = blocks[key]
        target.update((k, run[-1]) for run in runs for k in run)
    return target


def blocks_of(p: Tensor, group: dict) -> int:
    """Matrices NS orthogonalizes in param p: E * split (3-D) or split (2-D)."""
    return (p.shape[0] if p.ndim == 3 else 1) * split_of(p, group)


def split_of(p: Tensor, group: dict) -> int:
    """Row-blocks per matrix of param p: its `_muon_split` attribute, else its group's `split`."""
    return getattr(p, "_muon_split", None) or group["split"]


def compute_device(p: Tensor) -> torch.device:
    """Where p's NS runs: its local shard's device for a DTensor."""
    return p.to_local().device if isinstance(p, DTensor) else p.device


def stack_slot(stack: Tensor, first: Job, last: Job | None = None) -> Tensor:
    """The blocks of jobs first..last (one shape) in the stack, oriented like their params:
    (blocks, block rows, block cols); a view, not contiguous if transposed or padded."""
    last = last or first
    rows, cols = (first.cols, first.rows) if first.transposed else (first.rows, first.cols)  # as stored
    blocks = stack[first.start:last.start + last.blocks, :rows, :cols]  # (blocks, rows, cols) in the class
    return blocks.mT if first.transposed else blocks


def zero_padding(stack: Tensor, jobs: list[Job]) -> None:
    """Zero the rows below smaller (padded) blocks in the stack, one fill per span of equal blocks."""
    spans: list[list[int]] = []  # [first block, end block, stored rows]
    for job in jobs:
        rows = job.cols if job.transposed else job.rows  # as stored; only rows are padded
        if rows == stack.shape[1]:
            continue
        if spans and spans[-1][1] == job.start and spans[-1][2] == rows:
            spans[-1][1] = job.start + job.blocks
        else:
            spans.append([job.start, job.start + job.blocks, rows])
    for first, end, rows in spans:
        stack[first:end, rows:].zero_()


def job_runs(jobs: list[Job], indices: list[int]) -> list[list[Job]]:
    """Split jobs[i] for sorted `indices` into runs of neighbours (adjacent rows of the stack) with
    the same group, size and orientation: each run is one fused launch (or a few: see
    `_launch_runs` in moespeed/kernels/muon_triton.py)."""
    runs: list[list[Job]] = []
    for k, i in enumerate(indices):
        job = jobs[i]
        prev = jobs[indices[k - 1]] if k else None
        if prev is not None and indices[k - 1] == i - 1 and prev.group is job.group \
                and prev.param.numel() == job.param.numel() \
                and (prev.rows, prev.cols, prev.transposed) == (job.rows, job.cols, job.transposed):
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def round_sizes(n_blocks: int, most: int) -> list[int]:
    """The fewest rounds of at most `most` blocks, as equal as possible (e.g. 10, 4 -> 4, 3, 3)."""
    rounds = -(-n_blocks // most)
    base, extra = divmod(n_blocks, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def partition(n_blocks: int, world: int, loads: list[int], cost: int) -> list[int]:
    """Blocks per rank for `n_blocks` equal blocks: balanced, remainder to the least loaded ranks."""
    base, extra = divmod(n_blocks, world)
    counts = [base] * world
    for k in sorted(range(world), key=lambda k: (loads[k], k))[:extra]:
        counts[k] += 1
    for k in range(world):
        loads[k] += counts[k] * cost
    return counts


def class_cost(cls: BlockClass, batch_numel: int) -> int:
    """Scheduling cost of a class's NS: its FLOPs plus a latency per batched call."""
    calls = len(round_sizes(cls.n_blocks, max(1, batch_numel // (cls.rows * cls.cols))))
    return ns_flops(cls.rows, cls.cols, cls.steps) * cls.n_blocks + CALL_FLOPS * calls


def assign_lanes(costs: list[int], lanes: int) -> list[tuple[int, int]]:
    """(task, lane) pairs, largest cost first, each task on the lane with the least load so far."""
    load = [0] * lanes
    out = []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        lane = min(range(lanes), key=lambda k: (load[k], k))
        load[lane] += costs[i]
        out.append((i, lane))
    return out
