"""The train-step bench on an emulated slow host: `--spinners N` Python threads that only spin hold the
GIL in turn with the main thread (sys.getswitchinterval() each), so the thread that launches kernels
gets ~1/(N+1) of the CPU, as on a host whose launches are N+1 times slower. Everything after
`--spinners N` goes to `python -m moespeed.bench.train_step`. Session 14 met such hosts by chance
(small-moe's Muon step 10-17 ms instead of 6.9 ms on some H200 allocations); this makes them on demand.

    PYTHONPATH=$PWD python benchmarks/scripts/slow_host_train_step.py --spinners 1 --presets small-moe --optimizers muon
"""
import sys
import threading

from moespeed.bench.train_step import main


def _spin() -> None:
    while True:
        pass


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--spinners" or not sys.argv[2].isdigit():
        sys.exit("usage: slow_host_train_step.py --spinners N [train_step options]")
    for _ in range(int(sys.argv[2])):
        threading.Thread(target=_spin, daemon=True).start()
    main(sys.argv[3:])
