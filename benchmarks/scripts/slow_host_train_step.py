"""The train-step bench on an emulated slow host: from the third step on (after compilation), every
thread of the process is pinned to one CPU core that `--burners N` busy-looping processes share with
it, so kernel launches get ~1/(N+1) of a core, as on a host whose launches are N+1 times slower.
Everything after `--burners N` goes to `python -m moespeed.bench.train_step`; keep its --warmup >= 3.
Session 14 met such hosts by chance (small-moe's Muon step 10-17 ms instead of 6.9 ms on some H200
allocations); this makes one on demand. (Python threads spinning on the GIL do not emulate it: torch
releases the GIL at every op, and each handover waits a switch interval.)

    PYTHONPATH=$PWD python benchmarks/scripts/slow_host_train_step.py --burners 1 --presets small-moe --optimizers muon
    PYTHONPATH=$PWD python benchmarks/scripts/slow_host_train_step.py --burners 1 --calibrate   # any machine

`--calibrate` times 20,000 pairs of tiny CPU torch ops (dispatch cost, no GPU needed) before and
after `slow_down` and prints the ratio.
"""
import atexit
import os
import subprocess
import sys
import time

import torch

from moespeed.bench import train_step

START_AT = 3  # the step whose batch starts the burners (steps 0-1 compile)


def slow_down(burners: int) -> None:
    """Pin this process's threads to its first allowed core and start `burners` busy loops there."""
    core = min(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that has just exited
            pass
    loops = [subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
             for _ in range(burners)]
    atexit.register(lambda: [loop.kill() for loop in loops])


def calibrate(burners: int) -> None:
    """Print the slow-down `slow_down(burners)` gives torch's per-op dispatch."""
    torch.set_num_threads(1)
    x = torch.randn(64)

    def dispatch_s() -> float:
        start = time.perf_counter()
        for _ in range(20_000):
            x.add_(1.0)
            x.mul_(0.5)
        return time.perf_counter() - start

    dispatch_s()  # warm-up
    before = dispatch_s()
    slow_down(burners)
    time.sleep(0.3)  # the burners start
    after = dispatch_s()
    print(f"40,000 tiny torch ops: {before:.3f} s, with {burners} burner(s) {after:.3f} s: {after / before:.2f}x slower")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--burners" or not sys.argv[2].isdigit():
        sys.exit("usage: slow_host_train_step.py --burners N [--calibrate | train_step options]")
    if sys.argv[3:] == ["--calibrate"]:
        calibrate(int(sys.argv[2]))
        sys.exit(0)
    burners, batches = int(sys.argv[2]), [0]
    make_batch = train_step.synthetic_batch

    def batch_then_slow(*args, **kwargs):  # called once per micro-batch of each step
        batches[0] += 1
        if batches[0] == START_AT:
            slow_down(burners)
        return make_batch(*args, **kwargs)

    train_step.synthetic_batch = batch_then_slow
    train_step.main(sys.argv[3:], prog=f"python benchmarks/scripts/slow_host_train_step.py --burners {burners}")
