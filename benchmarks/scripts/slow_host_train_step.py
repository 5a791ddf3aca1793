"""The train-step bench on an emulated slow host: `--spinners N` Python threads that only spin hold the
GIL in turn with the main thread (sys.getswitchinterval() each), so the thread that launches kernels
gets ~1/(N+1) of the CPU, as on a host whose launches are N+1 times slower. They start at the third
step's batch, after compilation (which they would slow far more). Everything after `--spinners N`
goes to `python -m moespeed.bench.train_step`; keep its --warmup >= 3. Session 14 met such hosts by chance
(small-moe's Muon step 10-17 ms instead of 6.9 ms on some H200 allocations); this makes them on demand.

    PYTHONPATH=$PWD python benchmarks/scripts/slow_host_train_step.py --spinners 1 --presets small-moe --optimizers muon
"""
import sys
import threading

from moespeed.bench import train_step

START_AT = 3  # the step whose batch starts the spinners (steps 0-1 compile)


def _spin() -> None:
    while True:
        pass


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--spinners" or not sys.argv[2].isdigit():
        sys.exit("usage: slow_host_train_step.py --spinners N [train_step options]")
    spinners, batches = int(sys.argv[2]), [0]
    make_batch = train_step.synthetic_batch

    def batch_then_spin(*args, **kwargs):  # called once per micro-batch of each step
        batches[0] += 1
        if batches[0] == START_AT:
            for _ in range(spinners):
                threading.Thread(target=_spin, daemon=True).start()
        return make_batch(*args, **kwargs)

    train_step.synthetic_batch = batch_then_spin
    train_step.main(sys.argv[3:])
