"""Measuring helpers shared by the benchmarks: median time and peak memory of a callable."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor], device: torch.device) -> float:
    """Median ms of fn(): triton's do_bench on CUDA (grads reset between calls), a wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], grad_to_none: list[torch.Tensor], device: torch.device) -> float | None:
    """Peak MiB allocated during one fn() call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    for t in grad_to_none:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in grad_to_none:
        t.grad = None
    return peak
