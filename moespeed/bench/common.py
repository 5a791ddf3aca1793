"""Helpers shared by the benchmarks: median time and peak memory of a callable, relative error,
freeing memory, and what a result file records (package versions, the git commit)."""
from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from ..run import write_atomic


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(short: bool = False) -> str | None:
    """The checkout's HEAD commit (None outside a git checkout); $MOESPEED_COMMIT instead when set (a copied
    working tree whose .git is stale or absent, e.g. on a lent GPU machine)."""
    if os.environ.get("MOESPEED_COMMIT"):
        return os.environ["MOESPEED_COMMIT"]
    args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return None


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp32 (NaN stays NaN, so a NaN fails every tolerance)."""
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm())


def free_memory(device: torch.device | None = None) -> None:
    """Collect garbage and give cached CUDA memory back (synchronizing first)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


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


def save_json(path, doc: dict) -> None:
    """Write a result file whole or not at all (a temporary file, then a rename), making its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1))
