"""Muon's step as one CUDA graph (`train.muon_cuda_graph`): hundreds of kernel launches, one replay.

Why: Muon's step launches hundreds of kernels (momentum and update runs, ~12 per NS round), and each
costs the CPU tens of microseconds (Triton's launcher, the autotuner's lookup). On one GPU that CPU
time hides behind the backward's queued work only while it stays below the GPU time; on hosts with
slower launches it does not (H200 allocations of session 14: the small-moe step 10-17 ms where
another allocation took 6.9 ms; the expert NS alone 6.4 ms launched eagerly vs 4.3 ms replayed).
A replay costs the CPU a few microseconds whatever the number of kernels.

How: a replay reruns the captured kernels with the captured arguments. Params, momentum buffers and
the NS temporaries (in the graph's own memory pool) keep their addresses from step to step; the
gradients do not (`zero_grad(set_to_none=True)` frees them, the next backward allocates them
anywhere), and neither do the learning rate and with it each update's (decay, alpha). So the
captured kernels read both from small GPU tables that are rewritten before every step, eager or
replayed: the momentum kernels find grad i at `anchor + 16 * offsets[i]` elements (any address
16-element aligned to the anchor: the caching allocator's 512-byte blocks always are), the update
kernels read (decay, alpha) per (group, block shape). `StepGraph.step` computes the rest that a
replay depends on, the *signature* (the classes' layout, the params' and buffers' addresses), each
step: equal to the captured one -> replay; otherwise the step runs eagerly, and once the same
signature has held for WARMUP_STEPS eager steps (which also compile and autotune the kernels, build
the launch tables and the momentum buffers) the step is captured and replayed. After MAX_CAPTURES
captures (a layout that keeps changing) the step stays eager.
Where it applies: one process, every class on one CUDA device, no DTensor, the fused (Triton)
elementwise kernels, contiguous params and gradients of one dtype; elsewhere Muon ignores it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..kernels.muon_triton import holding_tables

WARMUP_STEPS = 2  # eager steps with an unchanged signature before a capture
MAX_CAPTURES = 4  # captures before giving up on the graph (signatures that keep changing)
GRAD_ALIGN = 16  # elements: the momentum kernels' grad offsets count in these units (vector loads)


class DeviceTable:
    """A small GPU tensor that captured kernels read, rewritten from the host before each step.

    The host values go through two pinned staging buffers used in turn: a non-blocking copy may run
    after the next step's `write` returns, so its source must not be overwritten until it has run."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
        self.gpu = torch.zeros(shape, dtype=dtype, device=device)
        pinned = self.gpu.is_cuda  # (pinned memory needs CUDA; the tests fake the GPU on a CPU)
        self._staging = [torch.zeros(shape, dtype=dtype, pin_memory=pinned) for _ in range(2)]
        self._copied: list = [None, None]  # the event after each staging buffer's last copy
        self._turn = 0

    def write(self, values: list) -> None:
        """`gpu` = values (nested lists of its shape), in stream order."""
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            # the copy from this buffer two writes ago must be done: the host may wait here when it runs
            # more than a step ahead of the GPU
            self._copied[turn].synchronize()
        staging = self._staging[turn]
        staging.copy_(torch.tensor(values, dtype=staging.dtype))
        self.gpu.copy_(staging, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()


class StepGraph:
    """Captures and replays one Muon optimizer's step (see the module docstring)."""

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None  # the captured graph's
        self.captures = 0
        self.replays = 0
        self.live = False  # inside a step: the kernels read grads and scalars from the tables
        self._last, self._repeats = None, 0  # the previous step's signature; how many steps it held
        self._coef_rows: dict[tuple, int] = {}  # (id(group), rows, cols) -> row of coefs
        self._coef_values: list[list[float]] = []  # coefs' rows on the host (absent keys keep theirs)
        self.coefs: DeviceTable | None = None  # (keys, 2) fp32: (decay, alpha) per key
        self._grad_rows: dict[int, int] = {}  # id(param) -> row of grads, in the plan's job order
        self.grads: DeviceTable | None = None  # (jobs,) int64: each grad's offset from anchor / GRAD_ALIGN
        self.anchor: Tensor | None = None  # (GRAD_ALIGN,) of the grads' dtype: the base of those offsets
        self._held: list[Tensor] = []  # the launch tables the graph reads, kept alive while it can replay

    @staticmethod
    def applies(plan, world: int, fused_on) -> bool:
        """Whether this step (without DTensors: the caller checks) can be graphed: one process, one CUDA
        device that is the current one (the capture stream, the tables and their events live there),
        the fused kernels, contiguous params and gradients."""
        devices = {cls.device for cls in plan}
        device = next(iter(devices))
        if world != 1 or len(devices) != 1 or device.type != "cuda":
            return False
        if device.index is not None and device.index != torch.cuda.current_device():
            return False
        if not fused_on(device):
            return False
        return all(job.param.is_contiguous() and job.param.grad is not None and job.param.grad.is_contiguous()
                   for cls in plan for job in cls.jobs)

    def coef(self, key: tuple) -> Tensor:
        """(2,) view of the coefs row of (id(group), rows, cols): this step's (decay, alpha)."""
        return self.coefs.gpu[self._coef_rows[key]]

    def grad_table(self, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(anchor, offsets) of the grads of `params`, neighbours in the plan: `_momentum_fused`'s grad_table."""
        first = self._grad_rows[id(params[0])]
        if any(self._grad_rows[id(p)] != first + i for i, p in enumerate(params)):
            raise RuntimeError("Muon's CUDA graph: a fused run's params are not neighbours in the plan")
        return self.anchor, self.grads.gpu[first:first + len(params)]

    def step(self, plan, state: dict, scalars, run) -> None:
        """One step: replay, or `run()` eagerly (capturing it once the signature is stable).

        state: the optimizer's state (momentum buffers); scalars(group, rows, cols) -> (decay, alpha)."""
        self._write_coefs(plan, scalars)
        if not self._write_grads(plan):
            run()  # grads of mixed dtypes or oddly placed: this step eagerly, grads and scalars as usual
            return
        signature = self._signature(plan, state)
        if self.graph is not None and signature == self.signature:
            self.graph.replay()
            self.replays += 1
            return
        self.graph, self.signature, self._held = None, None, []  # a stale graph: its memory goes now
        self._repeats = self._repeats + 1 if signature == self._last else 0
        self._last = signature
        self.live = True
        try:
            if self._repeats < WARMUP_STEPS or self.captures >= MAX_CAPTURES:
                run()
                return
            with holding_tables() as held:
                self.graph, self.signature = _capture(run), signature
            self._held = held  # the launch tables its kernels read
            self.captures += 1
            self.graph.replay()  # capturing ran nothing: this step's work
        finally:
            self.live = False

    def _signature(self, plan, state: dict) -> tuple:
        """Everything a replay depends on but the tables' contents: the classes' layout, the tables'
        and every param's and momentum buffer's address."""
        parts = [self.coefs.gpu.data_ptr(), self.grads.gpu.data_ptr(), self.anchor.data_ptr(), self.anchor.dtype]
        for cls in plan:
            parts.append((cls.rows, cls.cols, cls.steps, cls.coefficients, cls.eps, cls.n_blocks, cls.padded))
            for job in cls.jobs:
                p, group = job.param, job.group
                buf = state.get(p, {}).get("momentum_buffer")
                parts.append((p.data_ptr(), buf.data_ptr() if buf is not None else 0,
                              job.start, job.blocks, job.transposed, id(group), group["momentum"], group["nesterov"]))
        return tuple(parts)

    def _write_coefs(self, plan, scalars) -> None:
        """This step's (decay, alpha) per key into `coefs` (a new table, hence a new signature, for new keys)."""
        done = set()
        for cls in plan:
            for job in cls.jobs:
                key = (id(job.group), job.rows, job.cols)
                if key in done:
                    continue
                done.add(key)
                if key not in self._coef_rows:
                    self._coef_rows[key] = len(self._coef_values)
                    self._coef_values.append([0.0, 0.0])
                self._coef_values[self._coef_rows[key]] = list(scalars(job.group, job.rows, job.cols))
        if self.coefs is None or self.coefs.gpu.shape[0] != len(self._coef_values):
            self.coefs = DeviceTable((len(self._coef_values), 2), torch.float32, plan[0].device)
        self.coefs.write(self._coef_values)

    def _write_grads(self, plan) -> bool:
        """This step's grad offsets from `anchor` into `grads`; False (nothing written) if the grads
        differ in dtype or one is not GRAD_ALIGN elements aligned to the anchor."""
        jobs = [job for cls in plan for job in cls.jobs]
        dtype = jobs[0].param.grad.dtype
        if self.anchor is None or self.anchor.dtype != dtype:
            self.anchor = torch.empty(GRAD_ALIGN, dtype=dtype, device=plan[0].device)
        unit = GRAD_ALIGN * self.anchor.element_size()  # bytes
        gaps = [job.param.grad.data_ptr() - self.anchor.data_ptr() for job in jobs]
        if any(job.param.grad.dtype != dtype for job in jobs) or any(gap % unit for gap in gaps):
            return False
        self._grad_rows = {id(job.param): i for i, job in enumerate(jobs)}
        if self.grads is None or self.grads.gpu.shape[0] != len(jobs):
            self.grads = DeviceTable((len(jobs),), torch.int64, plan[0].device)
        self.grads.write([gap // unit for gap in gaps])
        return True


def _capture(run) -> torch.cuda.CUDAGraph:
    """`run()` captured into a new graph (nothing runs). Unlike `torch.cuda.graph`, no empty_cache
    first: it would hand the allocator's cached blocks back to the driver for the next backward to
    allocate them again."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()  # capture needs a stream other than the default one
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            run()
        except BaseException:
            with contextlib.suppress(Exception):  # ending a broken capture may fail too: keep run()'s error
                graph.capture_end()
            raise
        graph.capture_end()
    current.wait_stream(stream)
    return graph
