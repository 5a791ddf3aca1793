"""Muon's step as one CUDA graph (`train.muon_cuda_graph`): hundreds of kernel launches, one replay.

Why: Muon's step launches hundreds of kernels (momentum and update runs, ~12 per NS round), and each
costs the CPU tens of microseconds (Triton's launcher, the autotuner's lookup). On one GPU that CPU
time hides behind the backward's queued work only while it stays below the GPU time; on hosts with
slower launches it does not (H200 allocations of session 14: the small-moe step 10-17 ms where
another allocation took 6.9 ms; the expert NS alone 6.4 ms launched eagerly vs 4.3 ms replayed).
A replay costs the CPU a few microseconds whatever the number of kernels.

How: a replay reruns the captured kernels on the same addresses, so it is valid only while every
param, gradient and momentum buffer sits where it sat at capture. `StepGraph.step` computes that
*signature* each step: equal to the captured one -> replay; otherwise the step runs eagerly, and once
the same signature has held for WARMUP_STEPS eager steps (which also compile and autotune the
kernels, build the launch tables and the momentum buffers) the step is captured and replayed. The
learning rate changes every step: the update kernels read (decay, alpha) from a small GPU table
(`coef`) that is written before each step, eager or replayed. After MAX_CAPTURES captures (addresses
that keep moving, e.g. gradients allocated elsewhere each step) the step stays eager.
Where it applies: one process, every class on one CUDA device, no DTensor, the fused (Triton)
elementwise kernels, contiguous params and gradients; elsewhere Muon ignores it.
"""
from __future__ import annotations

import torch
from torch import Tensor

WARMUP_STEPS = 2  # eager steps with an unchanged signature before a capture
MAX_CAPTURES = 4  # captures before giving up on the graph (signatures that keep changing)


class StepGraph:
    """Captures and replays one Muon optimizer's step (see the module docstring)."""

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None  # the captured graph's
        self.captures = 0
        self.replays = 0
        self.live = False  # inside a step: the update kernels read their scalars from `table`
        self._last, self._repeats = None, 0  # the previous step's signature; how many steps it held
        self._rows: dict[tuple, int] = {}  # (id(group), rows, cols) -> row of table
        self.table: Tensor | None = None  # (keys, 2) fp32 on the GPU: (decay, alpha) per key
        self._staging: list[Tensor] = []  # two pinned host copies of the table, used in turn
        self._copied: list = [None, None]  # the event after each staging buffer's last copy
        self._turn = 0

    @staticmethod
    def applies(plan, world: int, fused_on) -> bool:
        """Whether this step (without DTensors: the caller checks) can be graphed: one process, one CUDA
        device, the fused kernels, contiguous params and gradients."""
        devices = {cls.device for cls in plan}
        if world != 1 or len(devices) != 1 or next(iter(devices)).type != "cuda" or not fused_on(next(iter(devices))):
            return False
        return all(job.param.is_contiguous() and job.param.grad is not None and job.param.grad.is_contiguous()
                   for cls in plan for job in cls.jobs)

    def coef(self, key: tuple) -> Tensor:
        """(2,) view of the table row of (id(group), rows, cols): this step's (decay, alpha)."""
        return self.table[self._rows[key]]

    def step(self, plan, state: dict, scalars, run) -> None:
        """One step: replay, or `run()` eagerly (capturing it once the signature is stable).

        state: the optimizer's state (momentum buffers); scalars(group, rows, cols) -> (decay, alpha)."""
        signature = self._signature(plan, state)
        self._write_table(plan, scalars)
        if self.graph is not None and signature == self.signature:
            self.graph.replay()
            self.replays += 1
            return
        self._repeats = self._repeats + 1 if signature == self._last else 0
        self._last = signature
        self.live = True
        try:
            if self._repeats < WARMUP_STEPS or self.captures >= MAX_CAPTURES:
                run()
                return
            self.graph, self.signature = None, None  # the old graph (and its memory) goes first
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                run()
            self.graph, self.signature = graph, signature
            self.captures += 1
            graph.replay()  # capturing ran nothing: this step's work
        finally:
            self.live = False

    def _signature(self, plan, state: dict) -> tuple:
        """Everything a replay depends on: the classes' layout and every tensor's address."""
        parts = [self.table.data_ptr() if self.table is not None else 0]
        for cls in plan:
            parts.append((cls.rows, cls.cols, cls.steps, cls.coefficients, cls.eps, cls.n_blocks, cls.padded))
            for job in cls.jobs:
                p, group = job.param, job.group
                buf = state.get(p, {}).get("momentum_buffer")
                parts.append((p.data_ptr(), p.grad.data_ptr(), buf.data_ptr() if buf is not None else 0,
                              job.start, job.blocks, job.transposed, id(group), group["momentum"], group["nesterov"]))
        return tuple(parts)

    def _write_table(self, plan, scalars) -> None:
        """This step's (decay, alpha) per key into `table` (a new table, hence a new signature, for new keys)."""
        values: dict[tuple, tuple[float, float]] = {}
        for cls in plan:
            for job in cls.jobs:
                key = (id(job.group), job.rows, job.cols)
                if key not in values:
                    values[key] = scalars(job.group, job.rows, job.cols)
        if self.table is None or any(key not in self._rows for key in values):
            keys = list(dict.fromkeys([*self._rows, *values]))
            self._rows = {key: i for i, key in enumerate(keys)}
            self.table = torch.zeros(len(keys), 2, dtype=torch.float32, device=plan[0].device)
            pinned = self.table.is_cuda  # (pinned memory needs CUDA; the tests fake the GPU on a CPU)
            self._staging = [torch.zeros(len(keys), 2, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]
            self._copied = [None, None]
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy from this buffer two steps ago is done (it always is)
        staging = self._staging[turn]
        rows = staging.tolist()  # keys absent this step keep their old values (nothing reads them)
        for key, pair in values.items():
            rows[self._rows[key]] = list(pair)
        staging.copy_(torch.tensor(rows, dtype=torch.float32))
        self.table.copy_(staging, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
