"""Optional torch.profiler capture of a few training steps (`train.profile_steps = "A:B"`).

Steps A..B-1 (counted like the logged steps, from 0) run under torch.profiler on the main rank.
Written to the run directory: profile.txt (the top ops by GPU time and by CPU time, self times, so
launch-bound and GPU-bound costs both show) and profile_trace.json (open in chrome://tracing or
https://ui.perfetto.dev). Profiling slows the profiled steps; their tokens/s are not representative.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..config import parse_profile_steps


class StepProfiler:
    """Call `before_step(step)` at the start of every training step and `close()` at the end."""

    def __init__(self, spec: str, run_dir: Path, enabled: bool, device: torch.device):
        self.window = parse_profile_steps(spec) if enabled else None
        self.run_dir, self.device, self.prof = Path(run_dir), device, None

    def before_step(self, step: int) -> None:
        if self.window is None:
            return
        start, stop = self.window
        if step == start and self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        elif step == stop:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        averages = self.prof.key_averages()
        start, stop = self.window
        tables = [f"torch.profiler, training steps {start}..{stop - 1}\n"]
        if self.device.type == "cuda":
            tables += ["== by self GPU time ==", averages.table(sort_by="self_device_time_total", row_limit=30)]
        tables += ["== by self CPU time ==", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        (self.run_dir / "profile.txt").write_text("\n".join(tables))
        self.prof.export_chrome_trace(str(self.run_dir / "profile_trace.json"))
        self.prof, self.window = None, None
