"""Stop training cleanly on SIGINT (Ctrl-C) or SIGTERM (cluster preemption, torchrun forwarding).

`GracefulStop` is installed around the step loop (`install()`, then `restore()`). While it is
active the first SIGINT or SIGTERM only records the request; the trainer asks `should_stop()` at each step boundary, saves a
checkpoint there and raises `TrainingStopped`, whose `exit_code` (130 for SIGINT, 143 for SIGTERM:
128 + the signal number, what a shell reports for a process the signal killed) the CLI exits with.
In a single process a second SIGINT raises KeyboardInterrupt at once (quit now, without saving) and a
second SIGTERM exits with 143 at once; under torchrun repeats are ignored (a Ctrl-C in the terminal
reaches every worker directly and again as torchrun forwards it; torchrun kills the workers after its
own grace period). `restore()` puts the previous handlers back.

Under torch.distributed the ranks may receive the signal at different steps (or only some of them),
so `should_stop()` all-reduces the flag (MAX) every step: one 4-byte all-reduce on a gloo (CPU) group,
so it never waits for the GPU. Every rank then stops at the same step and the collective save works.
"""
from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped at a step boundary on a signal, after saving a checkpoint (`message` says how to resume)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Record SIGINT/SIGTERM while active; `should_stop()` says (in agreement over all ranks) whether to stop now."""

    def __init__(self, distributed: bool = False, announce: bool = True):
        self.distributed = distributed
        self.announce = announce  # print one note when the first signal arrives (rank 0)
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._group = None
        self._flag_device = "cpu"

    # ------------------------------------------------------------------------------ handlers
    def install(self) -> "GracefulStop":
        """Take over SIGINT and SIGTERM (main thread only); under torch.distributed, set up the flag's group."""
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if self.distributed:
            self._group = _cpu_group()
            if self._group is None and dist.get_backend() == "nccl":  # no gloo: the flag goes through NCCL
                self._flag_device = f"cuda:{torch.cuda.current_device()}"
        return self

    def restore(self) -> None:
        """Put the handlers back that were there before `install()` (safe to call twice)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum and self.distributed:  # torchrun forwards the terminal's Ctrl-C, which also reached us:
            return                            # a repeat is no request to quit now (torchrun kills later anyway)
        if self.signum:  # asked twice: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os._exit(128 + signum)
        self.signum = signum
        if self.announce:
            again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
            note = (f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                    f"({again} again quits at once, without saving)\n")
            os.write(2, note.encode())

    # ------------------------------------------------------------------------------- decision
    def should_stop(self) -> int:
        """The signal to stop on (0 = go on), the same on every rank: call it at every step boundary on all ranks."""
        if not self.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self._flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())


def _cpu_group():
    """A gloo group over the world (CPU tensors: the stop flag never waits for the GPU); the default group if gloo is missing."""
    if dist.get_backend() == "gloo":
        return None
    try:
        return dist.new_group(backend="gloo")
    except (RuntimeError, ValueError):  # pragma: no cover - torch built without gloo
        return None
