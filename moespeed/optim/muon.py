"""Muon: momentum + Newton–Schulz orthogonalization for hidden matrices (2-D) and expert stacks (3-D).

How a step works, per parameter `p` with gradient `g` (the math of `torch.optim.Muon`):

    buf = momentum * buf + (1 - momentum) * g                 # buf.lerp_(g, 1 - momentum)
    u   = (1 - momentum) * g + momentum * buf  if nesterov else buf
    O   = NS(u)                                               # bf16, ~ U V^T of u = U S V^T
    p  *= 1 - lr * weight_decay                               # decoupled weight decay
    p  -= lr * scale(rows, cols) * O

NS (moespeed/optim/newton_schulz.py) is the quintic Newton–Schulz iteration X <- a X + (b A + c A^2) X
with A = X X^T, run in bf16 on X = u / ||u||_F (so every singular value starts in (0, 1]); this class's
default coefficients (3.4445, -4.7750, 2.0315, torch.optim.Muon's) with 5 steps push singular values
into roughly [0.7, 1.2], not exactly 1, which works as well in practice. `ns_coefficients` may also
give one (a, b, c) per step: the `small` presets run 4 steps of the minimax schedule of
moespeed/optim/polar_express.py (band ~[0.79, 1.21]; same loss per step as 5 standard steps on `small`,
20% fewer NS FLOPs; 0.01 worse on `quickstart`). A tall block (rows > cols) runs the transposed
iteration X <- a X + X (b A + c A^2) with A = X^T X, so the Gram matrix is always the smaller side and
the result needs no transpose. `scale` makes updates of rectangular matrices comparable: "original" =
sqrt(max(1, rows / cols)) (Keller Jordan), "match_rms_adamw" = 0.2 * sqrt(max(rows, cols)) (Moonshot;
update RMS ~0.2 like AdamW's, so AdamW learning rate and weight decay carry over).

Shapes. Muon orthogonalizes *blocks*, the last two dims of a param ((rows, cols) as in an
`nn.Linear` weight; a 3-D expert stack [E, rows, cols] has E of them; `split` cuts a param into
row-blocks, e.g. per head). `scale` uses the block shape. All blocks of equal shape and NS settings
form a *class*, one batched NS call per round; small tall classes are merged into their transposed
wide class and small wide classes zero-padded into bigger ones (moespeed/optim/muon_plan.py says how
and why; the plan is cached until params or their grads' presence change). A step handles one class
after another:
  1. momentum: every param writes its NS input `u` (bf16) straight into its slot of one
     `(blocks, rows, cols)` stack (no torch.cat, no per-param copies);
  2. NS runs in place on slices of the stack, batched, at most `batch_numel` elements per rank and
     call to bound memory; the last iteration writes into the stack (`out=`);
  3. every param reads its update from its slot: decay and update in one pass.
With several ranks and share="rounds" the broadcasts of step 2 are asynchronous, and a class's
step 3 waits for them only after the next class's steps 1-2 are queued: each rank orthogonalizes
its own rounds while the others' results arrive (two classes' stacks live at once).
Streams: with one process on CUDA, the classes run concurrently on `streams` side streams (largest
first, each on the least loaded stream; a small class overlaps a big one instead of waiting for
it). The side streams wait for the current stream first, and the current stream waits for them at
the end, so to the caller the step is ordered like any op on the current stream. Memory: up to
`streams` classes' stacks and NS temporaries live at once. DEFAULT_STREAMS = 3: in the compiled
train step on an H100 they cut the step from 4.15 to 3.77 ms (small) and 11.80 to 10.71 ms (small-moe).
(A compiled one-GPU run that once diverged with them was the compiled Flex gradient defect, not the
streams; a GPU test trains with them compiled.)
On CUDA, steps 1 and 3 are Triton kernels (`fused`, moespeed/kernels/muon_triton.py; checked once
against the foreach path), one launch per run of equal-size params (a table of their addresses):
14 + 10 bytes per element;
elsewhere (and for DTensors or non-contiguous tensors) they are torch foreach ops with exactly
torch.optim.Muon's arithmetic (~48 bytes per element). NS's "a D + L R" products are torch.baddbmm (cuBLAS), or with
`ns_gemm="triton"` a Triton GEMM that reads D in its epilogue (baddbmm first copies D into its
output). Nothing syncs with the host; while the GPU orthogonalizes one class the CPU launches the next.

Exactness. The reference path (CPU, `fused=False`) does torch.optim.Muon's elementwise ops; the
Triton kernels compute the same formulas in fp32 (torch's lerp branches, the fused multiply-adds nvcc
makes of them, round-to-nearest-even to bf16), so they agree to fp32 rounding at most. The tall-block
iteration multiplies the same numbers as torch's transposed one; cuBLAS (or the Triton GEMM) may sum
them in another order. Both stay within one bf16 rounding of the update (what the tests allow).
A merged (transposed) tall block runs torch's own transposed iteration: bitwise equal to the tall
iteration on CPU (observed), within the same bf16 rounding on CUDA; a padded block's NS sums the same
products plus exact zeros (GEMM kernels of another shape may sum in another order: within the same
rounding). Streams change no arithmetic.

Performance: floors on one H100 (computed; `python -m moespeed.bench.muon` measures them), for 5 NS
steps (the small presets' 4 steps do 4/5 of the NS work).
  * NS matmul FLOPs (5 steps; per block 5 (4 m^2 n + 2 m^3), m <= n its sides): preset `small`
    1.27 TFLOP (80M params in 84 matrices, 7 block shapes) -> 2.1-3.2 ms at 600-400 TFLOP/s;
    `small-moe` 2.14 TFLOP (313M params; 1.65 TFLOP are the 1408 expert blocks of 768 x 256)
    -> 3.6-5.4 ms.
  * Memory outside NS with fp32 params, grads and momentum: at least 20 B per element (read g,
    read + write buf, read + write p): small 1.60 GB = 0.53 ms, small-moe 6.27 GB = 2.09 ms at
    3.0 TB/s. This module moves 24 B (plus the bf16 NS input written and the bf16 update read):
    0.64 ms and 2.51 ms; 20 B with bf16 momentum buffers (`momentum_dtype`, the small presets').
    Measured on an H200 (session 10): the momentum and update kernels run at the 4.3 TB/s copy
    ceiling, and NS (5.5 of small-moe's 7.5 ms of GPU work) at ~310 TFLOP/s. Session 11: 7.1 ms, the
    Triton NS normalizing through its first Gram matrix instead of a pass over X (newton_schulz.py).
  * Sum: ~2.7-3.8 ms (small) and ~5.7-7.9 ms (small-moe). The goal "optimizer <= 5% of the train
    step" (~4.4 / ~5.2 ms at the measured fwd+bwd) fits `small`, but not `small-moe` as long as NS
    is 5 bf16 steps on fp32 state on one GPU.
  * NS memory traffic: each step reads an X-sized batch twice (X X^T, the update GEMM) and writes it
    once (6 B per element); baddbmm adds a copy of X into its output and reads it back (+6 B). The
    expert blocks (m = 256) are memory-bound: ~12 B x 5 steps x 277M elements = 16.6 GB (~5.5 ms)
    with baddbmm, about half that with `ns_gemm="triton"`; `ns_gemm="poly"` reads and writes X once
    per step with a plain bmm (H200 small-moe step: Muon 7.17 vs 7.41 ms). Further levers: Gram Newton–Schulz
    (iterates on the m x m Gram matrix; other numerics), symmetric GEMMs, NS sharded over ranks.

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
Side streams are used only with one rank and no DTensors: with collectives, the step stays on the
current stream, one class after another, so every rank issues them in the same order. Merging is
the same on every rank (it depends only on the param list), so it applies there too.
"""
from __future__ import annotations

import contextlib
import math
import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor (FSDP2 params); absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor, distribute_tensor = (), None

from ..kernels.muon_triton import (_fused_works, _momentum_fused, _momentum_reference, _update_fused,
                                   _update_reference, tma_supported, triton)
from .newton_schulz import (EPS, GRAM_RESTART, NS_COEFFICIENTS, NS_GEMMS, NS_METHODS, NS_STEPS,  # noqa: F401
                            TRITON_GEMMS, TUNE_REPEATS, _faster_gemm, _gram_orthogonalize_, _hashable, _orthogonalize_,
                            gram_pays, newton_schulz, ns_flops, step_coefficients)  # re-exported: Muon's API
from .muon_graph import StepGraph
from .muon_plan import (MERGE_NUMEL, STACK_BATCHES, BlockClass, Job, assign_lanes, class_cost, job_runs,
                        partition, plan_classes, round_sizes, split_of, stack_slot, zero_padding)

SHARES = ("blocks", "rounds")  # how ranks split the NS work of replicated params (see Muon's docstring)
ADJUST_LR_FNS = ("original", "match_rms_adamw")
BATCH_NUMEL = 2**26  # elements per batched NS call per rank (128 MiB of bf16 input)
DEFAULT_STREAMS = 3  # CUDA side streams that run shape classes concurrently (streams=None); see below
MOMENTUM_DTYPES = (None, torch.float32, torch.bfloat16)  # None: the grads' dtype

# Name components (split on ".") that keep a 2-D/3-D param out of Muon; see `muon_eligible`.
_EXCLUDED_SUBSTRINGS = ("embed", "norm", "bias")
_EXCLUDED_COMPONENTS = ("lm_head", "head", "router", "gate")


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


# ---------------------------------------------------------------- the optimizer

class Muon(torch.optim.Optimizer):
    """Muon for 2-D and 3-D params; batched over equal block shapes; work split across ranks.

    Per-group options: lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps,
    adjust_lr_fn ("original" | "match_rms_adamw"), split (row-blocks per matrix, default 1; a
    param's `_muon_split` attribute wins), replicated (params identical on all ranks: split the
    work; False: every rank orthogonalizes its own params). `process_group` (default: the world)
    is where the work of replicated params is shared; `batch_numel` caps one NS batch per rank;
    `fused` picks the elementwise kernels: None = Triton on CUDA when it passes a one-time check
    against the foreach path (else a warning and foreach), True = Triton (CUDA, or CPU under
    TRITON_INTERPRET=1), False = torch foreach ops. `ns_gemm` computes NS's two "a D + L R"
    products: "torch" (baddbmm, cuBLAS), "triton" (`_addmm_kernel`, no copy of D), "poly" (P = a I
    + b A + c A^2 first, then X <- P X as one plain bmm), "tma" (`_addmm_tma_kernel`, persistent, TMA
    loads), "auto" (tma on Hopper or newer, triton on older CUDA GPUs) or "tune" (on
    CUDA, the fastest of them for each round shape, timed once when first seen; ranks may
    choose differently, but every round's result comes from one rank).
    `merge_numel`: a class of tall (rows, cols) blocks with at most this many elements is stored
    transposed in the class of (cols, rows) blocks, one NS call for both (0: never). `pad_flops`:
    wide classes with equal cols are zero-padded into one while that adds at most this many NS
    FLOPs (see `muon_plan.pad_classes`; None = muon_plan.PAD_FLOPS on CUDA and no padding elsewhere, 0: never).
    `streams`: CUDA side streams that run shape classes concurrently (None = DEFAULT_STREAMS,
    0 = all on the current stream; ignored on CPU, with DTensors and with more than one rank).
    `ns_method`: "standard" Newton–Schulz, or "gram" (`_gram_orthogonalize_`: iterates on the m x m
    Gram matrix for blocks whose long side is >= 2x the short one; other blocks run the standard one).
    `stack_batches`: a class's stack holds at most this many times `batch_numel` elements (or one
    bigger param); a bigger class is cut between params into several, which side streams run
    concurrently (one class's memory-bound momentum and update beside another's NS GEMMs).
    `ns_fp8_steps`: 1 runs the first NS step's GEMMs on fp8 e4m3 operands (Triton on CUDA; the
    reference elsewhere; moespeed/optim/ns_fp8.py), 0 none.
    `cuda_graph`: run the step as one CUDA graph, replayed while every param and momentum buffer
    keeps its address; grads and lr are read from GPU tables (one process on CUDA; muon_graph.py).
    `momentum_dtype`: the momentum buffers' dtype (None = the grads'; torch.bfloat16 halves their
    memory and traffic, the lerps still run in fp32, as DeepSeek-V3 keeps AdamW's moments in bf16).
    `share` (several ranks, replicated params): "blocks" splits every NS round into one share per
    rank and all-gathers them (balanced GPU work, but every rank launches every class's kernels);
    "rounds" gives each round of at most `batch_numel` elements whole to the least loaded rank, which
    broadcasts it (each rank launches ~1/W of the NS kernels, bigger batches: for CPU-bound steps).
    See the module docstring for the algorithm.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS,
                 ns_steps: int = NS_STEPS, eps: float = EPS, adjust_lr_fn: str | None = "original",
                 split: int = 1, replicated: bool = True, *, process_group=None,
                 batch_numel: int = BATCH_NUMEL, fused: bool | None = None, ns_gemm: str = "torch",
                 merge_numel: int = MERGE_NUMEL, pad_flops: int | None = None, streams: int | None = None,
                 ns_method: str = "standard", share: str = "blocks",
                 momentum_dtype: torch.dtype | None = None, cuda_graph: bool = False,
                 stack_batches: int = STACK_BATCHES, ns_fp8_steps: int = 0) -> None:
        if batch_numel < 1 or stack_batches < 1:
            raise ValueError(f"batch_numel = {batch_numel}, stack_batches = {stack_batches}: must be >= 1")
        if ns_fp8_steps not in (0, 1):
            raise ValueError(f"Muon ns_fp8_steps = {ns_fp8_steps}: 0 or 1 (fp8 in a later step can push singular "
                             "values out of the schedule's band: benchmarks/scripts/ns_fp8_emulation.py)")
        if min(merge_numel, pad_flops or 0, streams or 0) < 0:
            raise ValueError(f"Muon merge_numel = {merge_numel}, pad_flops = {pad_flops}, streams = {streams}: "
                             "must be >= 0")
        if ns_gemm not in NS_GEMMS:
            raise ValueError(f"Muon ns_gemm = {ns_gemm!r}: use one of {NS_GEMMS}")
        if ns_method not in NS_METHODS:
            raise ValueError(f"Muon ns_method = {ns_method!r}: use one of {NS_METHODS}")
        if share not in SHARES:
            raise ValueError(f"Muon share = {share!r}: use one of {SHARES}")
        if momentum_dtype not in MOMENTUM_DTYPES:
            raise ValueError(f"Muon momentum_dtype = {momentum_dtype}: use one of {MOMENTUM_DTYPES}")
        if triton is None and (fused or ns_gemm in TRITON_GEMMS):  # "auto" and "tune" fall back to torch
            raise ValueError(f"Muon fused = True and ns_gemm = {ns_gemm!r} need triton")
        self.process_group = process_group
        self.batch_numel = batch_numel
        self.fused = fused
        self.ns_gemm = ns_gemm
        self.ns_method = ns_method
        self.share = share
        self.momentum_dtype = momentum_dtype
        self.merge_numel = merge_numel
        self.pad_flops = pad_flops
        self.stack_batches = stack_batches
        self.ns_fp8_steps = ns_fp8_steps
        self.streams = DEFAULT_STREAMS if streams is None else streams
        self._side_streams: dict[torch.device, list] = {}  # device -> CUDA streams, made on first use
        self._plan_key, self._plan = None, []  # block classes, rebuilt when params or grads change
        self._plan_has_dtensor = False
        self._tuned_gemm: dict[tuple, str] = {}  # ns_gemm="tune": round shape -> the faster GEMM
        self._graph = StepGraph() if cuda_graph else None  # the step as one CUDA graph (muon_graph.py)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps,
                        adjust_lr_fn=adjust_lr_fn, split=split, replicated=replicated)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        group["ns_coefficients"] = _hashable(group["ns_coefficients"])  # part of a class key

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # (casts the momentum buffers to their params' dtype)
        for group in self.param_groups:  # a saved state may hold the coefficients as lists
            group["ns_coefficients"] = _hashable(group["ns_coefficients"])
        if self.momentum_dtype is not None:
            for state in self.state.values():
                if "momentum_buffer" in state:
                    state["momentum_buffer"] = state["momentum_buffer"].to(self.momentum_dtype)

    def _world(self) -> tuple[int, int]:
        """(world size, rank) of the group that shares work; (1, 0) when not distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _fused_on(self, device: torch.device) -> bool:
        if self.fused is None:
            return device.type == "cuda" and _fused_works(device)
        return self.fused

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = self._world()
        plan = self._block_classes(world > 1)
        if plan and self._graph is not None and not self._plan_has_dtensor \
                and self._graph.applies(plan, world, self._fused_on):
            self._graph.step(plan, self.state, _scalars, lambda: self._run_plan(plan, world, rank))
        else:
            self._run_plan(plan, world, rank)
        return loss

    def _run_plan(self, plan: list[BlockClass], world: int, rank: int) -> None:
        """The step's kernels: the classes on side streams (one process on CUDA) or one after another."""
        streams = self._streams_for(plan, world)
        if streams:
            self._step_on_streams(plan, streams)
            return
        loads = [0] * world  # NS FLOPs assigned to each rank so far this step
        pending = None  # a class whose NS results may still be arriving: updated after the next one starts
        for cls in plan:
            with _on_device(cls.device):
                started = self._start_class(cls, world, rank, loads)
            if pending is not None:
                with _on_device(pending[0].device):
                    self._finish_class(*pending)
            pending = started
        if pending is not None:
            with _on_device(pending[0].device):
                self._finish_class(*pending)

    def _streams_for(self, plan: list[BlockClass], world: int) -> list:
        """This step's CUDA side streams; none off CUDA, for params on several devices, with DTensors
        or with more than one rank (their collectives stay in one order on the current stream)."""
        devices = {cls.device for cls in plan}
        if self.streams == 0 or world > 1 or len(devices) != 1 or self._plan_has_dtensor:
            return []
        device = devices.pop()
        if device.type != "cuda":
            return []
        if device not in self._side_streams:
            self._side_streams[device] = [torch.cuda.Stream(device) for _ in range(self.streams)]
        return self._side_streams[device]

    def _step_on_streams(self, plan: list[BlockClass], streams: list) -> None:
        """One process: classes on side streams, largest first, each on the least loaded stream.

        The side streams wait for the current stream, which waits for all of them at the end, so the
        step is ordered like one on the current stream. Params, grads and momentum buffers belong to
        the current stream and outlive the step; stacks and NS temporaries are allocated on the side
        stream that uses them, so the caching allocator reuses their memory on that stream only.
        """
        device = plan[0].device
        with _on_device(device):
            self._fused_on(device)  # the one-time check of the fused kernels, on the current stream
            for cls in plan:
                for job in cls.jobs:
                    if job.param.grad is not None:
                        self._buffer(job.param)  # new momentum buffers: on the current stream
            current = torch.cuda.current_stream(device)
            for stream in streams:
                stream.wait_stream(current)
            costs = [class_cost(cls, self.batch_numel) for cls in plan]
            for i, lane in assign_lanes(costs, len(streams)):
                with torch.cuda.stream(streams[lane]):
                    self._step_class(plan[i], 1, 0, [0])
            for stream in streams:
                current.wait_stream(stream)

    def _block_classes(self, distributed: bool) -> list[BlockClass]:
        """This step's classes (`plan_classes`), cached: rebuilt only when the params, their NS options
        or which grads exist change."""
        key = (distributed, self.merge_numel, self.pad_flops, self.stack_batches,
               tuple((id(g), g["ns_steps"], g["ns_coefficients"], g["eps"], g["split"], g["replicated"],
                      tuple((id(p), p.grad is None) for p in g["params"])) for g in self.param_groups))
        if key != self._plan_key:
            self._plan = plan_classes(self.param_groups, distributed, self.merge_numel, self.pad_flops,
                                      self.batch_numel, self.stack_batches)
            self._plan_has_dtensor = any(isinstance(job.param, DTensor) for cls in self._plan for job in cls.jobs)
            self._plan_key = key
        return self._plan

    def _step_class(self, cls: BlockClass, world: int, rank: int, loads: list[int]) -> None:
        """Momentum into the stack, NS in place (this rank's shares, then the others'), updates."""
        self._finish_class(*self._start_class(cls, world, rank, loads))

    def _start_class(self, cls: BlockClass, world: int, rank: int,
                     loads: list[int]) -> tuple[BlockClass, Tensor, list]:
        """Momentum into a new stack and NS in place; (cls, stack, pending collectives)."""
        stack = torch.empty(cls.n_blocks, cls.rows, cls.cols, dtype=torch.bfloat16,
                            device=cls.device)  # (n_blocks, rows, cols)
        if cls.padded:
            zero_padding(stack, cls.jobs)
        self._momentum(cls.jobs, stack, self._fused_on(cls.device))
        w, r, w_loads = (world, rank, loads) if cls.shared else (1, 0, [0])
        cost = ns_flops(cls.rows, cls.cols, cls.steps)
        if cls.shared and self.share == "rounds":
            return cls, stack, self._rounds_by_owner(cls, stack, w, r, w_loads, cost)
        self._rounds_split(cls, stack, w, r, w_loads, cost)
        return cls, stack, []

    def _finish_class(self, cls: BlockClass, stack: Tensor, pending: list) -> None:
        """Wait for the class's collectives (the current stream waits, not the host), then update."""
        for work in pending:
            work.wait()
        self._update(cls, stack, self._fused_on(cls.device))

    def _rounds_split(self, cls: BlockClass, stack: Tensor, world: int, rank: int, loads: list[int],
                      cost: int) -> None:
        """share="blocks" (and one rank): every NS round split into one share per rank, all-gathered."""
        start = 0
        for size in round_sizes(cls.n_blocks, world * max(1, self.batch_numel // (cls.rows * cls.cols))):
            blocks = stack[start:start + size]  # (size, rows, cols): this round
            start += size
            counts = partition(len(blocks), world, loads, cost)
            first = sum(counts[:rank])
            if counts[rank]:
                mine = blocks[first:first + counts[rank]]  # (counts[rank], rows, cols)
                _orthogonalize_(mine, cls.steps, cls.coefficients, cls.eps, self._gemm_for(cls, mine), self.ns_method,
                                self.ns_fp8_steps)
            if cls.shared:
                self._gather_shares(blocks, counts, rank)

    def _rounds_by_owner(self, cls: BlockClass, stack: Tensor, world: int, rank: int, loads: list[int],
                         cost: int) -> list:
        """share="rounds": each NS round goes whole to the least loaded rank, which broadcasts it.

        The broadcasts are asynchronous (returned, to wait for before the update): a rank goes on
        with its next round while another rank's result arrives, so the ranks' rounds overlap.
        """
        start, pending = 0, []
        for size in round_sizes(cls.n_blocks, max(1, self.batch_numel // (cls.rows * cls.cols))):
            blocks = stack[start:start + size]  # (size, rows, cols): this round
            start += size
            owner = min(range(world), key=lambda k: (loads[k], k))
            loads[owner] += size * cost
            if owner == rank:
                _orthogonalize_(blocks, cls.steps, cls.coefficients, cls.eps, self._gemm_for(cls, blocks),
                                self.ns_method, self.ns_fp8_steps)
            src = owner if self.process_group is None else dist.get_global_rank(self.process_group, owner)
            pending.append(dist.broadcast(blocks, src=src, group=self.process_group, async_op=True))
        return pending

    def _gemm_for(self, cls, blocks: Tensor | None = None) -> str:
        """The NS GEMM for one round `blocks` (n, rows, cols) of a class: `ns_gemm`, where "auto" picks
        tma on Hopper or newer and triton on older CUDA GPUs, and "tune" the faster on CUDA, timed on the
        first round of each shape ("tune" while undecided: no blocks given)."""
        if self.ns_gemm in ("torch", *TRITON_GEMMS):
            return self.ns_gemm
        if triton is None or cls.device.type != "cuda":
            return "torch"
        if self.ns_gemm == "auto":  # H200 small-moe train step: tma 6.59 / 6.59 ms, triton 6.85 / 6.83 (session 18)
            return "tma" if tma_supported(cls.device) else "triton"
        if blocks is None:
            return "tune"
        key = (tuple(blocks.shape), cls.steps, cls.coefficients, cls.eps, self.ns_method, cls.device)
        if key not in self._tuned_gemm:
            self._tuned_gemm[key] = _faster_gemm(blocks, cls.steps, cls.coefficients, cls.eps, self.ns_method,
                                                 self.ns_fp8_steps)
        return self._tuned_gemm[key]

    def _momentum(self, jobs: list[Job], stack: Tensor, fused: bool) -> None:
        """Update the momentum buffers; write every param's bf16 NS input into its rows of stack."""
        reference: dict[int, tuple[dict, list, list, list]] = {}  # id(group) -> group, foreach lists
        triton_jobs = []  # indices into jobs
        for i, job in enumerate(jobs):
            p, group, grad = job.param, job.group, job.param.grad
            slot = stack_slot(stack, job)  # (blocks, block rows, block cols) of p, maybe a transposed view
            if grad is not None and (grad.is_sparse or torch.is_complex(grad)):
                raise RuntimeError("Muon supports only dense real gradients")
            if isinstance(p, DTensor):
                slot.copy_(self._dtensor_input(p, group).view(slot.shape))
            elif grad is None:
                slot.zero_()  # its owner orthogonalizes zeros; no update follows
            elif fused and grad.is_contiguous() and self._buffer(p).is_contiguous():
                triton_jobs.append(i)
            else:
                lists = reference.setdefault(id(group), (group, [], [], []))
                lists[1].append(grad)
                lists[2].append(self._buffer(p))
                lists[3].append(slot)
        graphed = self._graph is not None and self._graph.live  # grads found through its table
        for run in job_runs(jobs, triton_jobs):
            group, params = run[0].group, [job.param for job in run]
            slots = stack_slot(stack, run[0], run[-1])  # (run blocks, block rows, block cols)
            out = slots if slots.is_contiguous() else torch.empty(slots.shape, dtype=torch.bfloat16,
                                                                  device=slots.device)
            _momentum_fused([p.grad for p in params], [self._buffer(p) for p in params], out,
                            group["momentum"], group["nesterov"],
                            grad_table=self._graph.grad_table(params) if graphed else None)
            if out is not slots:
                slots.copy_(out)  # transposed or padded: one copy per run
        for group, grads, bufs, views in reference.values():
            _momentum_reference(grads, bufs, views, group["momentum"], group["nesterov"])

    def _buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, dtype=self.momentum_dtype,
                                                        memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _dtensor_input(self, p: Tensor, group: dict) -> Tensor:
        """The full bf16 NS input of a DTensor param (a collective on p's mesh; zeros without grad)."""
        if p.grad is None:
            u = torch.zeros_like(p, dtype=torch.bfloat16)
        else:
            buf, grad = self._buffer(p), p.grad.float()
            wide = buf.float()  # buf itself when fp32
            wide.lerp_(grad, 1 - group["momentum"])
            if wide is not buf:  # a bf16 buffer stores the fp32 result rounded
                buf.copy_(wide)
            u = (grad.lerp(buf.float(), group["momentum"]) if group["nesterov"] else buf).bfloat16()
        return u.full_tensor()

    def _gather_shares(self, blocks: Tensor, counts: list[int], rank: int) -> None:
        """All-gather each rank's orthogonalized share of `blocks` (n, rows, cols), in place."""
        world, most = len(counts), max(counts)
        first = sum(counts[:rank])
        send = blocks.new_zeros(most, *blocks.shape[1:])  # (most, rows, cols)
        send[:counts[rank]] = blocks[first:first + counts[rank]]
        out = blocks.new_empty(world * most, *blocks.shape[1:])  # (world * most, rows, cols)
        _all_gather(out, send, self.process_group)
        out = out.view(world, most, *blocks.shape[1:])  # (world, most, rows, cols)
        offset = 0
        for k, count in enumerate(counts):
            if k != rank and count:
                blocks[offset:offset + count] = out[k, :count]
            offset += count

    def _update(self, cls: BlockClass, stack: Tensor, fused: bool) -> None:
        """Decay and update every param that has a grad from its orthogonalized rows of stack."""
        scalars: dict[tuple, tuple[float, float]] = {}  # (id(group), rows, cols) -> (decay, alpha)
        reference: dict[tuple, tuple[float, float, list, list]] = {}  # same key -> scalars, lists
        triton_jobs = []  # indices into cls.jobs
        for i, job in enumerate(cls.jobs):
            p, group, key = job.param, job.group, (id(job.group), job.rows, job.cols)
            if p.grad is None:
                continue  # zero update: no decay either
            decay, alpha = scalars.get(key) or scalars.setdefault(key, _scalars(group, job.rows, job.cols))
            if fused and p.is_contiguous() and not isinstance(p, DTensor):
                triton_jobs.append(i)
                continue
            update = stack_slot(stack, job).reshape(p.shape)  # a copy if transposed or padded
            if isinstance(p, DTensor):
                update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(decay)
                p.add_(update, alpha=alpha)
            else:
                lists = reference.setdefault(key, (decay, alpha, [], []))
                lists[2].append(p)
                lists[3].append(update)
        graphed = self._graph is not None and self._graph.live  # scalars from its table: a replay's lr is new
        for run in job_runs(cls.jobs, triton_jobs):
            updates = stack_slot(stack, run[0], run[-1]).contiguous()  # a copy if transposed or padded
            key = (id(run[0].group), run[0].rows, run[0].cols)
            _update_fused([job.param for job in run], updates, *scalars[key],
                          coef=self._graph.coef(key) if graphed else None)
        for decay, alpha, params, updates in reference.values():
            _update_reference(params, updates, decay, alpha)


def _scalars(group: dict, rows: int, cols: int) -> tuple[float, float]:
    """(decay, alpha) of a group's params with (rows, cols) blocks: p <- decay * p + alpha * update."""
    lr = float(group["lr"])
    return 1 - lr * group["weight_decay"], -lr * lr_scale(group["adjust_lr_fn"], rows, cols)


def _on_device(device: torch.device):
    """Make `device` current for Triton launches (a no-op for the current device and CPU)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    gather(out, inp, group=group)


def _check_group(group: dict) -> None:
    """Raise ValueError for a param group Muon cannot train."""
    for key in ("lr", "weight_decay", "momentum"):
        if not float(group[key]) >= 0:
            raise ValueError(f"Muon {key} = {group[key]}: must be >= 0")
    if group["adjust_lr_fn"] not in (None, *ADJUST_LR_FNS):
        raise ValueError(f"Muon adjust_lr_fn = {group['adjust_lr_fn']!r}: use one of {ADJUST_LR_FNS}")
    if not 0 < group["ns_steps"] < 100:
        raise ValueError(f"Muon ns_steps = {group['ns_steps']}: must be in 1..99")
    step_coefficients(group["ns_coefficients"], group["ns_steps"])  # raises ValueError if malformed
    for p in group["params"]:
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon trains 2-D and 3-D params; got shape {tuple(p.shape)}: "
                             "give it to AdamW (see muon_eligible)")
        n = split_of(p, group)
        if n < 1 or p.shape[-2] % n:
            raise ValueError(f"Muon split = {n} must divide the rows of shape {tuple(p.shape)}")
