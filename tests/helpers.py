"""Small shared builders for the tests: a tiny config, a tiny corpus."""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moespeed.config import ModelConfig, build_config

try:  # a trivial kernel: can this machine compile for the GPU ahead of time? (compile_for_hopper)
    import triton
    import triton.language as tl

    @triton.jit
    def _hopper_probe(x_ptr, n):
        tl.store(x_ptr + n, 1.0)
except ImportError:  # pragma: no cover
    _hopper_probe = None


def free_port() -> int:
    """A TCP port free on this machine now (for a spawned gloo group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_worker(rank: int, world: int, port: int, timeout_s: int = 60):
    """The body of one spawned test worker in a gloo group of `world`; a hang fails after `timeout_s`.

    On success every rank meets at a barrier (no rank tears gloo down while another still talks),
    destroys the group, and the process ends at once with `os._exit(0)`, skipping the interpreter's
    teardown: a gloo thread that drops the last reference to a Python-owned tensor (an async
    collective's buffer) after finalization began aborts the process ("terminate called without an
    active exception", SIGABRT, seen twice in CI at the end of a passing two-rank Muon test). By then
    the results are written; nothing is left to run. On an error the exception propagates as usual.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, d_ff=64, max_seq_len=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def write_corpus(folder: Path, n_files: int = 24) -> Path:
    """A folder of small Python-like files (a stand-in for the stdlib corpus)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(f"def function_{i}_{j}(x, y):\n    return x * {j} + y - {i}\n" for j in range(30))
        (folder / f"module_{i}.py").write_text(f'"""Module {i}."""\nimport os\n\n{body}\n')
    return folder


def tiny_train_args(data_dir: Path, run_dir: Path, cache_dir: Path, steps: int = 6) -> list[str]:
    """CLI arguments for a few-second training run on the tiny corpus, on the CPU (also on a GPU
    machine: its head dims are below the GPU Flex kernel's least, and the tests compare CPU numbers)."""
    return ["--data.data", str(data_dir), "--data.cache_dir", str(cache_dir), "--data.vocab_size", "300",
            "--data.seq_len", "32", "--data.batch_size", "4", "--data.val_fraction", "0.2",
            "--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.kv_lora_rank", "16",
            "--model.qk_nope_head_dim", "8", "--model.qk_rope_head_dim", "4", "--model.v_head_dim", "8",
            "--model.d_ff", "64", "--model.max_seq_len", "64",
            "--train.steps", str(steps), "--train.eval_every", "3", "--train.eval_batches", "2",
            "--train.ckpt_every", "3", "--train.log_every", "1", "--train.warmup_steps", "2",
            "--train.device", "cpu", "--train.run_dir", str(run_dir)]


def tiny_config(data_dir: Path, run_dir: Path, cache_dir: Path, steps: int = 6):
    args = tiny_train_args(data_dir, run_dir, cache_dir, steps)
    pairs = [(args[i][2:], args[i + 1]) for i in range(0, len(args), 2)]
    pairs = [(k, [v] if k == "data.data" else v) for k, v in pairs]
    return build_config("quickstart", None, pairs)


_LOOP_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(x_ptr, n):
    for i in range(0, n):  # a loop bound that is a kernel argument, as every project kernel has
        tl.store(x_ptr + i, i)

x = torch.zeros(3, dtype=torch.int32)
count[(1,)](x, 3)
assert x.tolist() == [0, 1, 2], x
print("interpreter ok")
"""


def _interpreted(script: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)


@functools.cache
def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run this project's kernels here, or None. (Triton 3.6's interpreter
    with numpy >= 2 fails on any loop over a kernel argument: int() of a 1-element array.)"""
    proc = _interpreted(_LOOP_PROBE)
    if proc.returncode == 0 and "interpreter ok" in proc.stdout:
        return None
    import numpy
    import triton
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"Triton {triton.__version__}'s interpreter (numpy {numpy.__version__}) cannot run a loop kernel: {last}"


def run_interpreted(script: str, marker: str) -> str:
    """Run a Python script in a subprocess with TRITON_INTERPRET=1 (it must be set before Triton kernels
    are defined) from the repository root; assert it exits 0 and prints `marker`. Skipped, with the
    reason, where the interpreter itself cannot run a minimal loop kernel (the CPU CI's Triton can).
    Returns the script's stdout."""
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)
    proc = _interpreted(script)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout + proc.stderr[-3000:]
    return proc.stdout



def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict, **options):
    """Compile a Triton kernel (a @triton.jit function, or an autotune / heuristics wrapper of one) ahead
    of time for an H100 (sm_90) on this machine, GPU or not, so that CI catches kernels that would not
    compile on the GPU. types: Triton types of its pointer and float args ("*bf16", "fp32"); the other
    non-constexpr args are i32. Skips where this Triton cannot compile for CUDA at all."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        toolchain = _hopper_toolchain_problem(triton, GPUTarget, ASTSource)
    except ImportError as exc:
        toolchain = f"this Triton has no ahead-of-time API ({exc})"
    if toolchain:
        pytest.skip(toolchain)
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # Autotuner / Heuristics -> the JITFunction
        kernel = kernel.fn
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@functools.lru_cache(maxsize=None)
def _hopper_toolchain_problem(triton, GPUTarget, ASTSource) -> str | None:
    """Why this machine cannot compile even a trivial kernel for sm_90 (no CUDA backend, no ptxas), or None."""
    try:
        source = ASTSource(fn=_hopper_probe, signature={"x_ptr": "*fp32", "n": "i32"}, constexprs={})
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure here is the toolchain's, not a kernel's
        return f"Triton cannot compile for sm_90 here: {exc!r}"[:300]
