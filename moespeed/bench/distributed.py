"""Benchmark distributed training: `small-moe` on 1 GPU vs DDP on 2 GPUs vs expert parallel (EP=2).

    python -m moespeed.bench.distributed --json benchmarks/results/distributed.json

1. EP layer (when an EP case runs), on 2 GPUs (NCCL, bf16 autocast), for each EP dispatcher (`train.ep_dispatch` alltoall
   and allgather, and allgather in 2 pieces, `train.ep_chunks 2`): an EP=2 MoE layer of small-moe's shape against the same layer on one GPU in fp32
   over the EP group's whole batch: relative errors of the output and of every gradient (NaN
   fails); then its forward+backward time (median of fixed iterations, CUDA events; the slowest
   rank) and peak memory, next to the one-GPU layer (all experts) on the same tokens per GPU.
2. Data: the tokenizer and shards are prepared once (this Python's stdlib; cache dir shared by the
   runs; a smaller tokenizer sample than the preset's, to stay fast; it does not change speed).
3. Runs, N steps each, the same micro-batch per GPU (the preset's 32 x 1024 tokens): "1gpu" with
   grad_accum 2 (the same global batch and data as the 2-GPU runs, so the loss curves must match),
   "ddp2" (`torchrun --nproc_per_node 2`, DDP), "fsdp2" (FSDP2 instead of DDP), "ep2_alltoall" and "ep2_allgather" (DDP with
   `--train.ep_size 2` and that `--train.ep_dispatch`). `--cases` picks a subset.
   Reported: tokens/s (median over the logged intervals after the first; goal: >= 1.8x one GPU),
   peak GPU memory of rank 0, routed-expert bytes per GPU (params + grads + optimizer state; EP=2
   halves them) and the largest train-loss difference to the 1-GPU run (above LOSS_MATCH the row
   is flagged: the runs do not train the same model, and the speedup means nothing).
A failing run is reported and the others continue. Prints a table last; `--json` writes the
results in the BENCHMARKING.md format. Needs 2 GPUs for the 2-GPU parts.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moespeed.bench.common import git_commit, package_version, save_json

PRESET = "small-moe"
TOKENIZER_CHARS = 10_000_000  # the tokenizer's training sample: smaller than the preset's, to prepare fast


# -- 1. correctness of the EP layer on GPUs (run under torchrun by --ep-check) ----------------------

class OneMoE(torch.nn.Module):
    """The smallest model `parallelize` accepts: one MoE layer (it has `moe_layers()`); tests use it too."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def moe_layers(self):
        return [(0, self.moe)]

    def forward(self, x):
        return self.moe(x)


EP_DISPATCHERS = ("alltoall", "allgather")
LAYER_VARIANTS = {"alltoall": ("alltoall", 1, False), "allgather": ("allgather", 1, False),  # layer check:
                  "allgather_chunks2": ("allgather", 2, False),  # (dispatch, ep_chunks, ep_masked_rows)
                  "allgather_masked": ("allgather", 1, True)}
CASES = {  # training run -> (GPUs, extra CLI args)
    "1gpu": (1, ["--train.grad_accum", "2"]),
    "ddp2": (2, []),
    "fsdp2": (2, ["--train.parallel", "fsdp"]),
    **{f"ep2_{d}": (2, ["--train.ep_size", "2", "--train.ep_dispatch", d]) for d in EP_DISPATCHERS},
}
LOSS_MATCH = 0.05  # largest train-loss difference to the 1-GPU run that still counts as the same training
LAYER_ITERS = 20  # timed iterations of the EP layer: a fixed count, the same on every rank


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((a.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()
    return err if err == err else float("inf")  # NaN fails


def _median_ms(fn, params: list[torch.Tensor], iters: int = LAYER_ITERS) -> float:
    """Median ms of fn() over a fixed number of calls (CUDA events). Not `do_bench`: its call count
    depends on a per-rank estimate, and ranks that disagree on it would deadlock in a collective."""
    times = []
    for i in range(iters + 3):  # 3 warm-up calls
        for t in params:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _layer_step(model, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """One bf16 forward+backward of a MoE layer with the LM-like objective; returns the output."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = model(x)
    ((y.float() * dy).sum() / dy[..., 0].numel() + aux).backward()
    return y.detach()


def ep_check(out_path: str, preset: str = PRESET, batch: int = 4, seq_len: int = 1024) -> None:
    """Per rank and dispatcher (LAYER_VARIANTS): EP=2 layer (bf16) vs the fp32 one-GPU layer over the whole batch,
    its time and peak memory; the one-GPU bf16 layer on this rank's tokens; rank 0 writes JSON."""
    import torch.distributed as dist

    from moespeed.bench.common import peak_mib
    from moespeed.config import TrainConfig, preset_config
    from moespeed.model.moe import MoE
    from moespeed.train.distributed import init_distributed, parallelize

    env = init_distributed(torch.device("cuda"))
    cfg = preset_config(preset).model
    torch.manual_seed(0)  # the same layer and batch on every rank
    layer = MoE(cfg.d_model, copy.deepcopy(cfg.moe)).cuda()
    x = torch.randn(batch * env.world_size, seq_len, cfg.d_model, device="cuda")  # (B, T, D)
    dy = torch.randn_like(x)
    mine = slice(env.rank * batch, (env.rank + 1) * batch)
    x_mine = x[mine].clone().requires_grad_()

    single = copy.deepcopy(layer)  # one GPU, all experts, this rank's tokens
    step, params = functools.partial(_layer_step, single, x_mine, dy[mine]), [x_mine, *single.parameters()]
    result = {"1gpu": {"layer_ms": _median_ms(step, params), "layer_peak_mib": peak_mib(step, params, x.device)}}

    ref = copy.deepcopy(layer)
    ref.cfg.dispatch = "padded_bmm"  # fp32 reference
    x_ref = x.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * dy).sum() / dy[..., 0].numel() + aux_ref).backward()

    for variant, (dispatch, chunks, masked) in LAYER_VARIANTS.items():
        model = OneMoE(copy.deepcopy(layer))
        par = parallelize(model, TrainConfig(ep_size=env.world_size, ep_dispatch=dispatch, ep_chunks=chunks,
                                             ep_masked_rows=masked), env)
        x_ep = x[mine].clone().requires_grad_()
        y_ep = _layer_step(par.train_model, x_ep, dy[mine])
        par.finish_grads()
        moe, shard = model.moe, model.moe.expert_parallel.expert_slice()
        errors = {"output": _rel_err(y_ep, y_ref[mine]),
                  "x_grad": _rel_err(x_ep.grad, x_ref.grad[mine] * env.world_size)}
        for name, p in moe.named_parameters():
            full = ref.get_parameter(name).grad
            errors[f"{name}_grad"] = _rel_err(p.grad, full[shard] if name in ("w1", "w2", "w3") else full)
        step, params = functools.partial(_layer_step, par.train_model, x_ep, dy[mine]), [x_ep, *model.parameters()]
        result[variant] = {"rel_err": errors, "layer_ms": _median_ms(step, params),
                            "layer_peak_mib": peak_mib(step, params, x.device)}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, result)
    if env.is_main:
        Path(out_path).write_text(json.dumps(_worst(gathered)))
    env.close()


def _worst(per_rank: list):
    """The worst rank's value of every leaf of nested dicts: largest error, time or peak (None: unknown)."""
    if isinstance(per_rank[0], dict):
        return {k: _worst([d[k] for d in per_rank]) for k in per_rank[0]}
    return None if None in per_rank else max(per_rank)


# -- 2./3. training runs ----------------------------------------------------------------------------

def prepare(preset: str, overrides: list[str]) -> None:
    """Tokenizer and shards into the shared cache (the runs then find them there)."""
    from moespeed.config import build_config
    from moespeed.data.prepare import prepare_data

    pairs = [(overrides[i][2:], overrides[i + 1]) for i in range(0, len(overrides), 2)]
    prepare_data(build_config(preset, None, pairs).data)


def train_args(preset: str, run_dir: Path, steps: int, log_every: int, compile_: bool,
               overrides: list[str]) -> list[str]:
    return ["train", "--preset", preset, *overrides,
            "--train.run_dir", str(run_dir), "--train.steps", str(steps), "--train.log_every", str(log_every),
            "--train.eval_every", str(10 * steps), "--train.eval_batches", "2", "--train.ckpt_every", str(10 * steps),
            "--train.warmup_steps", "5", "--train.compile", str(compile_).lower()]


def command(args: list[str], gpus: int, shown: bool = False) -> list[str]:
    """`python -m moespeed ARGS` on 1 GPU, `torchrun --standalone --nproc_per_node N -m moespeed ARGS` on
    more; shown=True spells it as a user would type it (`python`, `torchrun`), else as it is launched."""
    if gpus == 1:
        return ["python" if shown else sys.executable, "-m", "moespeed", *args]
    launcher = ["torchrun"] if shown else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(gpus), "-m", "moespeed", *args]


def launch(args: list[str], gpus: int, timeout: int, log: Path | None = None,
           cpu: bool = False) -> tuple[bool, str, float]:
    """Run `moespeed ARGS` on 1 GPU (python) or several (torchrun); (ok, output tail, seconds).
    The whole output goes to `log` when given. `cpu`: the processes see no GPU (gloo)."""
    cmd = command(args, gpus)
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        output = proc.stdout + proc.stderr
        ok, tail = proc.returncode == 0, output[-3000:]
    except subprocess.TimeoutExpired as e:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x)
        ok, tail = False, f"timed out after {timeout}s: {str(e.stderr)[-2000:]}"
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    return ok, tail, time.time() - start


def summarize(run_dir: Path) -> dict:
    """tokens/s, peak memory, losses and routed-expert bytes of a finished run."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in records if "train_loss" in r]
    info = json.loads((run_dir / "parallel.json").read_text())
    expert_bytes = 2 * info["routed_expert_param_bytes"] + info["routed_expert_optimizer_bytes"]  # + grads
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:]) if len(train) > 1 else None,
            "peak_mem_gib": max((r["peak_mem_gib"] for r in train if "peak_mem_gib" in r), default=None),
            "losses": {r["step"]: r["train_loss"] for r in train},
            "routed_expert_mib_per_gpu": expert_bytes / 2**20, "layout": info}


def environment(cpu: bool = False) -> dict:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not cpu else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": package_version("triton"), "commit": git_commit(),
            "date": datetime.date.today().isoformat(),
            "command": "python -m moespeed.bench.distributed " + " ".join(sys.argv[1:])}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(check: dict | None, rows: list[dict]) -> None:
    if check is not None:
        print_layer_check(check)
    for r in rows:
        if r["notes"]:
            print(f"notes {r['bench']}: {r['notes']}")
    head = f"{'run':>13} {'GPUs':>4} {'tok/s':>9} {'x1gpu':>6} {'peak GiB':>8} {'experts MiB/GPU':>15} " \
           f"{'final loss':>10} {'max dloss':>9} {'wall s':>6}"
    print(head)
    for r in rows:
        print(f"{r['bench'].split('.')[-1]:>13} {r['gpus']:>4} {_fmt(r['tokens_per_s'], ',.0f'):>9} "
              f"{_fmt(r['speedup'], '.2f'):>6} {_fmt(r['peak_mem_gib'], '.1f'):>8} "
              f"{_fmt(r['routed_expert_mib_per_gpu'], '.0f'):>15} {_fmt(r['final_loss'], '.4f'):>10} "
              f"{_fmt(r['max_abs_loss_diff_vs_1gpu'], '.4f'):>9} {r['wall_s']:>6.0f}"
              + ("  LOSSES DIFFER from the 1-GPU run: one of them trains wrongly" if r.get("losses_match") is False
                 else ""))


def print_layer_check(check: dict) -> None:
    """Step 1: per dispatcher variant the worst relative error (bf16 EP=2 vs fp32 one GPU), then layer times."""
    if not check:
        print("EP=2 layer check: FAILED (see its output above)")
        return
    for dispatch in LAYER_VARIANTS:
        errors = check.get(dispatch, {}).get("rel_err", {})
        worst = max(errors.values(), default=None)
        print(f"EP=2 layer check, {dispatch} (bf16 vs fp32 one GPU): worst relative error {_fmt(worst, '.1e')} "
              f"({'ok' if worst is not None and worst <= 1e-2 else 'FAIL'}): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print(f"{'MoE layer fwd+bwd':>21} {'ms':>7} {'peak MiB':>9}  (same tokens per GPU; the slowest rank)")
    for case in ("1gpu", *LAYER_VARIANTS):
        values = check.get(case, {})
        name = case if case == "1gpu" else f"ep2_{case}"
        print(f"{name:>21} {_fmt(values.get('layer_ms'), '.2f'):>7} {_fmt(values.get('layer_peak_mib'), '.0f'):>9}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here (BENCHMARKING.md format)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--log-every", type=int, default=5, help="tokens/s interval in steps (default 5)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the model eagerly (the preset, like every GPU preset, uses torch.compile)")
    p.add_argument("--timeout", type=int, default=300,
                   help="seconds per run before it is reported as failed (a cold compile of small-moe takes ~2 min)")
    p.add_argument("--work-dir", help="where runs and the data cache go (default: a temporary folder)")
    p.add_argument("--preset", default=PRESET, help=f"model preset (default {PRESET})")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra config key for every run, e.g. --set data.batch_size 16")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated training runs (default all: {','.join(CASES)}); 1gpu is the speedup base")
    p.add_argument("--cpu", action="store_true",
                   help="smoke-test the script on the CPU (gloo; 2 processes stand in for 2 GPUs), "
                        "even where GPUs exist")
    p.add_argument("--ep-check", metavar="OUT", help=argparse.SUPPRESS)  # internal: the torchrun worker of step 1
    args = p.parse_args(argv)
    if args.ep_check:
        return ep_check(args.ep_check, args.preset)
    cases = args.cases.split(",")
    if any(name not in CASES for name in cases):
        p.error(f"--cases {args.cases}: choose from {', '.join(CASES)}")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="moespeed-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    devices = 2 if args.cpu else torch.cuda.device_count()
    overrides = ["--data.cache_dir", str(work / "cache"), "--data.tokenizer_train_chars", str(TOKENIZER_CHARS)]
    overrides += ["--train.device", "cpu"] if args.cpu else []
    overrides += [x for key, value in args.set for x in (f"--{key}", value)]

    ep_cases = any(name.startswith("ep") for name in cases)  # the EP layer check serves only them
    check = run_ep_check(work, args) if not args.cpu and torch.cuda.device_count() >= 2 and ep_cases else None
    t0 = time.time()
    prepare(args.preset, overrides)
    print(f"data prepared in {time.time() - t0:.0f}s ({work / 'cache'})", flush=True)

    rows, base = [], None
    for name in cases:
        n_gpus, extra = CASES[name]
        row = run_case(name, n_gpus, devices, train_args(args.preset, work / name, args.steps, args.log_every,
                                                          not args.no_compile, overrides) + extra, args)
        if name == "1gpu":
            base = row
        elif base is not None and base["tokens_per_s"] and row["tokens_per_s"]:
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            common = set(base["losses"]) & set(row["losses"])
            row["max_abs_loss_diff_vs_1gpu"] = max(abs(base["losses"][k] - row["losses"][k]) for k in common)
            row["losses_match"] = row["max_abs_loss_diff_vs_1gpu"] <= LOSS_MATCH
        rows.append(row)

    if args.json:
        save_json(args.json, {**environment(args.cpu), "ep_layer": check, "results": rows})
    print_table(check, rows)


def run_ep_check(work: Path, args) -> dict:
    """Step 1 on GPUs 0 and 1 (within twice --timeout); {} when it fails."""
    out = work / "ep_check.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moespeed.bench.distributed", "--ep-check", str(out), "--preset", args.preset]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * args.timeout,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"})
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        tail = "timed out"
    if out.is_file():
        return json.loads(out.read_text())
    print(f"EP layer check failed:\n{tail}", flush=True)
    return {}


def run_case(name: str, n_gpus: int, devices: int, cmd_args: list[str], args) -> dict:
    """One training run and its summary row (notes say why fields are null)."""
    row = {"bench": f"distributed.{name}", "gpus": n_gpus,
           "shape": {"preset": args.preset, "steps": args.steps, "set": dict(args.set)},
           "tokens_per_s": None, "speedup": None, "peak_mem_gib": None, "routed_expert_mib_per_gpu": None,
           "final_loss": None, "max_abs_loss_diff_vs_1gpu": None, "losses": {}, "wall_s": 0.0, "notes": ""}
    if n_gpus > devices:
        row["notes"] = f"needs {n_gpus} GPUs, {devices} visible"
        return row
    run_dir = Path(cmd_args[cmd_args.index("--train.run_dir") + 1])
    row["run_command"] = shlex.join(command(cmd_args, n_gpus, shown=True))
    ok, tail, row["wall_s"] = launch(cmd_args, n_gpus, args.timeout, log=run_dir.with_suffix(".log"), cpu=args.cpu)
    if not ok:
        lines = tail.strip().splitlines()
        row["notes"] = "failed: " + (lines[-1][:300] if lines else "")
        print(f"{name} failed:\n{tail}", flush=True)
        return row
    s = summarize(run_dir)
    for ckpt in run_dir.glob("step-*"):  # gigabytes each: not needed any more
        shutil.rmtree(ckpt, ignore_errors=True)
    row.update(tokens_per_s=s["tokens_per_s"], peak_mem_gib=s["peak_mem_gib"], layout=s["layout"],
               routed_expert_mib_per_gpu=s["routed_expert_mib_per_gpu"], losses=s["losses"],
               final_loss=s["losses"][max(s["losses"])] if s["losses"] else None)
    print(f"{name}: {_fmt(row['tokens_per_s'], ',.0f')} tok/s, {row['wall_s']:.0f}s", flush=True)
    return row


if __name__ == "__main__":
    main()
