"""The training loop: accumulation, clipping, schedule, eval, checkpoints, metrics, progress.

One `Trainer` owns a run directory. `Trainer(cfg).fit()` prepares data, builds (or resumes) the
model and optimizer, and trains to `train.steps`, evaluating at step 0, every `eval_every` steps and
at the end, checkpointing every `ckpt_every` steps and at the end.

Robustness: SIGINT (Ctrl-C) and SIGTERM stop the run at the next step boundary with a checkpoint
(`stopping.py`; the CLI then exits with 130 / 143). A non-finite loss (read where it already reaches
the host: every `log_every` steps, at evaluations and before each checkpoint, which also checks the
weights) stops it with `TrainingDivergedError` before any checkpoint with NaN weights is written.
A resumed run that already reached `train.steps` says so and returns.

Under torchrun (see `distributed.py`) every rank runs the same loop on its own micro-batches: the
config must agree on all ranks, rank 0 alone prepares the run directory and writes logs, metrics,
progress and plots; losses and MoE loads are averaged over the ranks before they are logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, to_toml
from ..data.loader import TokenLoader, val_loader
from ..data.prepare import prepare_data
from ..errors import CheckpointError, ConfigError, TrainingDivergedError
from ..kernels.linear_ce import check_backend as check_loss_backend
from ..model.attention import flash_kernels_available
from ..model.moe import update_biases
from ..model.transformer import Transformer
from ..optim.build import check_muon_device
from ..optim.schedule import lr_at, lr_factor
from ..run import new_run_dir, read_run_config, save_run_config
from .compiling import compile_for_training
from .checkpoint import (is_sharded, latest_checkpoint, list_checkpoints, load_model_state, load_rng_state,
                         load_training_state, read_state, save_checkpoint, save_sharded_checkpoint)
from .distributed import (Parallel, check_layout, check_peer_tables, check_same_config, init_distributed, parallelize,
                          write_parallel_info)
from .metrics import MetricsLogger, StepTimer, flops_per_token, moe_metrics, peak_flops, plot_expert_load, plot_loss_curve
from .profiling import StepProfiler
from .stopping import GracefulStop, TrainingStopped


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}: no CUDA GPU is available here: use auto or cpu")
    return torch.device(name)


def check_backends(model_cfg, device: torch.device) -> None:
    """Kernels the model config asks for that cannot train on this device: one line, before any file is written."""
    try:
        check_loss_backend(model_cfg.loss_backend, device)
    except ValueError as exc:
        raise ConfigError(f"model.loss_backend = {model_cfg.loss_backend}: {str(exc).split(': ', 1)[-1]}") from None
    if model_cfg.flex_kernel == "flash" and device.type == "cuda" and not flash_kernels_available():
        raise ConfigError("model.flex_kernel = flash needs FlashAttention-4's CuTe kernels: pip install flash-attn-4, "
                          "or use model.flex_kernel = triton")
    if model_cfg.attn_backend == "flex" and device.type != "cuda":
        raise ConfigError("model.attn_backend = flex trains on CUDA only (torch has no FlexAttention backward on "
                          f"{device.type}): use auto, which takes SDPA with dense masks there")


def uses_bf16(device: torch.device, dtype: str) -> bool:
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (dtype auto/bf16), fp32 elsewhere."""
    if uses_bf16(device, dtype):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def padded_vocab(vocab: int, multiple: int = 64) -> int:
    return math.ceil(vocab / multiple) * multiple


def check_resume_compatible(saved: Config, given: Config) -> None:
    """Model and data settings must match the run being resumed; train settings may change."""
    for section in ("model", "data"):
        old, new = getattr(saved, section).__dict__, getattr(given, section).__dict__
        for key, value in new.items():
            if key in ("cache_dir",) or (section == "model" and key == "vocab_size" and value == 0):
                continue
            if old.get(key) != value:
                raise CheckpointError(f"cannot resume: {section}.{key} is {old.get(key)!r} in the run but {value!r} now: "
                                      f"drop the override or start a new run")


class Trainer:
    def __init__(self, cfg: Config, log=None):
        self.cfg = cfg
        self.env = init_distributed(resolve_device(cfg.train.device))
        self.device = self.env.device
        check_same_config(to_toml(cfg), self.env)
        n_experts = cfg.model.moe.n_routed_experts if "moe" in cfg.model.ffn_kinds() else None
        check_layout(self.env.world_size, cfg.train.ep_size, n_experts)
        check_peer_tables(self.env.world_size, cfg.model)
        check_muon_device(cfg.train, self.device)
        check_backends(cfg.model, self.device)
        self.log = (log or (lambda msg: tqdm.write(msg))) if self.env.is_main else (lambda msg: None)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = Path(self.env.broadcast(str(new_run_dir(cfg))))  # rank 0's timestamp

    # ----------------------------------------------------------------------------------- setup
    def _prepare_data(self):
        """Tokenizer and shards: the first rank of each node prepares (or finds) them, then the others."""
        env = self.env
        if env.local_rank == 0:
            data = prepare_data(self.cfg.data, log=self.log)
        env.barrier()
        if env.local_rank != 0:
            data = prepare_data(self.cfg.data, log=lambda msg: None)
        return data

    def _resume_step(self) -> int:
        """Resuming: check the run (before any data is prepared) and return the latest checkpoint's step."""
        cfg, run_dir = self.cfg, self.run_dir
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: no such run directory to resume: check --train.run_dir, "
                                  "or train without --resume to start it")
        if not list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir}: no checkpoint to resume from: train without --resume first")
        saved = read_run_config(run_dir)
        check_resume_compatible(saved, cfg)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = saved.model.vocab_size
        ckpt = latest_checkpoint(run_dir)
        try:
            step = read_state(ckpt).get("step")
        except CheckpointError as e:
            raise _resume_error(str(e), run_dir, ckpt) from None
        if not isinstance(step, int) or step < 1:
            raise _resume_error(f"{ckpt}/state.json has no valid step", run_dir, ckpt)
        return step

    def _setup_run_dir(self, data) -> None:
        """Check (every rank) and create (rank 0) the directory of a new run."""
        cfg, run_dir = self.cfg, self.run_dir
        if list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                                  "or choose another --train.run_dir")
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = padded_vocab(data.vocab_size)
        elif cfg.model.vocab_size < data.vocab_size:
            raise CheckpointError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                                  f"{data.vocab_size} tokens: set it to 0 (automatic) or >= {data.vocab_size}")
        if self.env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data.tokenizer_path, run_dir / ".tokenizer.json.tmp")
            (run_dir / ".tokenizer.json.tmp").replace(run_dir / "tokenizer.json")
            save_run_config(run_dir, cfg)
        self.env.barrier()

    def _resume(self, par: Parallel, optimizer, loader: TokenLoader, counters: dict) -> None:
        """Load the latest checkpoint (written at any world size) into model, optimizer, loader, counters."""
        ckpt = latest_checkpoint(self.run_dir)
        try:
            if not self.env.distributed and not is_sharded(ckpt):
                load_model_state(ckpt, par.model)
                load_training_state(ckpt, optimizer)
            else:
                par.load_checkpoint(ckpt, optimizer)
                load_rng_state(ckpt, self.env.rank)
            state = read_state(ckpt)
            loader.load_state_dict(state["loader"])
            counters.update(state["counters"])
        except CheckpointError as e:
            raise _resume_error(str(e), self.run_dir, ckpt) from None
        except (KeyError, TypeError, ValueError) as e:
            raise _resume_error(f"{ckpt}/state.json is incomplete ({type(e).__name__}: {e})", self.run_dir, ckpt) from None
        if self.env.is_main:  # the train settings of this leg (e.g. a raised train.steps) are the run's now
            cfg = self.cfg
            save_run_config(self.run_dir, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False)))
        self.log(f"resumed {ckpt} at step {state['step']}")

    def _save(self, step: int, par: Parallel, optimizer, state: dict) -> Path:
        tc = self.cfg.train
        if self.env.distributed:
            return save_sharded_checkpoint(self.run_dir, step, par.state_dict(optimizer), state, tc.keep_last)
        return save_checkpoint(self.run_dir, step, par.model, optimizer, state, tc.keep_last)

    # -------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, model, val_path, bos_id) -> float:
        """Mean val loss over eval_batches val batches: a fixed random sample of windows from the whole
        val split (`val_loader`), the same batches every time.

        Under torch.distributed the ranks share the batches (ceil(eval_batches / world) each, the
        same batches as one process when the world size divides eval_batches) and average.
        """
        model.eval()
        env = self.env
        n_batches = math.ceil(self.cfg.train.eval_batches / env.world_size)
        loader = val_loader(val_path, self.cfg.data.batch_size, self.cfg.data.seq_len, bos_id,
                            rank=env.rank, world_size=env.world_size)
        total = torch.zeros((), device=self.device)
        for _ in range(n_batches):
            tokens, targets, doc_ids = loader.next_batch(self.device)
            with autocast_for(self.device, self.cfg.train.dtype):
                total += model(tokens, targets, doc_ids).float()
        model.train()
        return env.all_reduce_mean(total / n_batches).item()

    # ------------------------------------------------------------------------------------- fit
    def fit(self) -> Path:
        run_dir = self._fit()
        self.env.close()
        return run_dir

    def _fit(self) -> Path:
        cfg, tc, env = self.cfg, self.cfg.train, self.env
        start_step = self._resume_step() if tc.resume else 0
        if tc.resume and start_step >= tc.steps:
            self.log(f"{self.run_dir} is finished: its latest checkpoint is step {start_step} and train.steps = "
                     f"{tc.steps}: nothing to train (raise --train.steps to train further)")
            return self.run_dir
        data = self._prepare_data()
        if not tc.resume:
            self._setup_run_dir(data)
        torch.manual_seed(tc.seed)
        model = Transformer(cfg.model).to(self.device)
        n_params = sum(p.numel() for p in model.parameters())
        flops_tok, peak = flops_per_token(model, cfg.data.seq_len), peak_flops(self.device)
        par = parallelize(model, tc, env, bf16=uses_bf16(self.device, tc.dtype))
        optimizer, summary = par.build_optimizer(tc)
        loader = TokenLoader(data.train_path, cfg.data.batch_size, cfg.data.seq_len, data.bos_id, seed=tc.seed,
                             rank=env.rank, world_size=env.world_size)
        counters = {"tokens": 0, "elapsed_s": 0.0, "interval_loss_sum": 0.0, "interval_steps": 0}
        if start_step:
            self._resume(par, optimizer, loader, counters)
        self.log(f"run {self.run_dir}: {n_params / 1e6:.2f}M parameters, {par.describe()}\n{summary}")
        metrics = MetricsLogger(self.run_dir, enabled=env.is_main)
        metrics.truncate_after(start_step)
        train_model = compile_for_training(par.train_model, model, tc.compile_scope, tc.compile_overlap) if tc.compile else par.train_model
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * tc.grad_accum * env.world_size

        if start_step == 0:
            metrics.log({"step": 0, "val_loss": self.evaluate(model, data.val_path, data.bos_id), "lr": lr_at(0, tc),
                         "tokens": 0, "tokens_per_s": 0.0, "elapsed_s": 0.0})
        step = start_step
        interval_loss = torch.tensor(counters["interval_loss_sum"], device=self.device)
        interval_start, interval_tokens = time.time(), 0
        expert_loads: list = []
        # a live bar on a terminal; in a log file (cluster jobs, nohup, pipes) one plain line per log_every
        interactive = env.is_main and sys.stderr.isatty()
        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not interactive)
        profiler = StepProfiler(tc.profile_steps, self.run_dir, env.is_main, self.device)
        timer = StepTimer(self.device)  # the optimizer's share of the step, logged with the loss

        def checkpoint_state() -> dict:
            # one host read, as before, now with a check: never write a checkpoint with a NaN loss or NaN weights
            reduced = env.all_reduce_mean(torch.stack([interval_loss, _nonfinite_params(model)])).tolist()
            interval_loss.fill_(reduced[0])
            if not math.isfinite(reduced[0]):
                raise self._diverged(f"the training loss is {reduced[0]} (steps {step - counters['interval_steps'] + 1}-{step})",
                                     step, lr)
            if reduced[1]:
                raise self._diverged("the weights hold NaN or inf values", step, lr)
            counters["interval_loss_sum"] = reduced[0]
            return {"step": step, "loader": loader.state_dict(), "counters": counters,
                    "tokenizer_vocab_size": data.vocab_size}

        stopper = GracefulStop(env.distributed, announce=env.is_main).install()
        saved_step = start_step
        try:
            while step < tc.steps:
                profiler.before_step(step)
                timer.start()
                lr, factor = lr_at(step, tc), lr_factor(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                model.set_train_step(step)  # sliding-window growth schedule (no-op without one)
                for micro in range(tc.grad_accum):
                    tokens, targets, doc_ids = loader.next_batch(self.device)
                    with par.micro_step(last=micro == tc.grad_accum - 1):
                        with autocast_for(self.device, tc.dtype):
                            loss = train_model(tokens, targets, doc_ids)
                        (loss / tc.grad_accum).backward()
                    interval_loss += loss.detach().float() / tc.grad_accum
                par.finish_grads()
                if tc.grad_clip > 0:
                    par.clip_grad_norm(tc.grad_clip)
                timer.optimizer()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update_biases([moe for _, moe in model.moe_layers()])
                timer.stop()
                step += 1
                counters["interval_steps"] += 1
                counters["tokens"] += tokens_per_step
                interval_tokens += tokens_per_step
                bar.update(1)

                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.time()
                    counters["elapsed_s"] += now - interval_start
                    train_loss = env.all_reduce_mean(interval_loss).item() / counters["interval_steps"]
                    if not math.isfinite(train_loss):
                        first = step - counters["interval_steps"] + 1
                        raise self._diverged(f"the training loss is {train_loss} (mean of steps {first}-{step})", step, lr)
                    tok_s = interval_tokens / max(now - interval_start, 1e-9)
                    record = {"step": step, "train_loss": train_loss, "lr": lr, "tokens": counters["tokens"],
                              "tokens_per_s": tok_s, "elapsed_s": counters["elapsed_s"], **timer.read()}
                    if peak:
                        record["mfu"] = flops_tok * tok_s / (peak * env.world_size)
                    if self.device.type == "cuda":
                        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    par.reduce_moe_counts()
                    moe_record, expert_loads = moe_metrics(model)
                    record.update(moe_record)
                    metrics.log(record)
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    if not interactive:
                        self.log(progress_line(record, tc.steps))
                    interval_loss.zero_()
                    counters["interval_steps"] = 0
                    interval_start, interval_tokens = time.time(), 0
                if step % tc.eval_every == 0 or step == tc.steps:
                    val_loss = self.evaluate(model, data.val_path, data.bos_id)
                    if not math.isfinite(val_loss):
                        raise self._diverged(f"the val loss is {val_loss}", step, lr)
                    metrics.log({"step": step, "val_loss": val_loss, "lr": lr, "tokens": counters["tokens"],
                                 "tokens_per_s": 0.0, "elapsed_s": counters["elapsed_s"]})
                    self.log(f"step {step}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.1f})")
                    if env.is_main:
                        plot_expert_load(self.run_dir, expert_loads, step)
                    interval_start = time.time()
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    self._save(step, par, optimizer, checkpoint_state())
                    saved_step, interval_start = step, time.time()
                if (signum := stopper.should_stop()) and step < tc.steps:  # the same answer on every rank
                    if saved_step != step:
                        self._save(step, par, optimizer, checkpoint_state())
                    bar.close()
                    message = (f"stopped by {signal.Signals(signum).name} at step {step}/{tc.steps}: saved "
                               f"{self.run_dir / f'step-{step}'}; continue with: {self._resume_command()}")
                    raise TrainingStopped(signum, message if env.is_main else "")
        except KeyboardInterrupt:  # raised inside a step (a second Ctrl-C): the state is half-updated, not saved
            bar.close()
            last = list_checkpoints(self.run_dir)
            where = f"the last checkpoint is {last[-1].name}: continue with: {self._resume_command()}" if last else \
                "no checkpoint was written yet"
            self.log(f"interrupted during step {step + 1}: nothing saved; {where}")
            raise
        finally:
            stopper.restore()
            bar.close()
            metrics.close()
        profiler.close()
        write_parallel_info(self.run_dir, par, optimizer)
        if env.is_main:
            png = plot_loss_curve(self.run_dir)
            self.log(f"done: {self.run_dir} (loss curve: {png})")
        return self.run_dir

    def _resume_command(self) -> str:
        launch = "torchrun ... -m moespeed train" if self.env.distributed else "moespeed train"
        return f"{launch} --resume --train.run_dir {shlex.quote(str(self.run_dir))}"

    def _diverged(self, what: str, step: int, lr: float) -> TrainingDivergedError:
        """One line: what went non-finite at which step, and how to go on (a lower lr, from the last checkpoint)."""
        last = list_checkpoints(self.run_dir)
        go_on = (f"then continue from {last[-1].name} with: {self._resume_command()} --train.lr {self.cfg.train.lr / 2:g}"
                 if last else "then train again (this run has no checkpoint yet)")
        return TrainingDivergedError(f"training diverged at step {step}: {what}; no checkpoint was written for it. "
                                     f"Lower train.lr (now {self.cfg.train.lr:g}, {lr:.3g} at this step) or raise "
                                     f"train.warmup_steps, {go_on}")


def _nonfinite_params(model: torch.nn.Module) -> torch.Tensor:
    """1.0 if any (local shard of a) parameter holds NaN or inf, else 0.0: a device tensor, no host sync."""
    flags = [(~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).any() for p in model.parameters()]
    return torch.stack(flags).any().float() if flags else torch.zeros(())


def _resume_error(what: str, run_dir: Path, ckpt: Path) -> CheckpointError:
    """One line when the latest checkpoint cannot be read: what is wrong, then resume from the one before it, or anew."""
    what = what.removesuffix(": use another checkpoint")
    earlier = [p for p in list_checkpoints(run_dir) if p != ckpt]
    if earlier:
        fix = f"move {ckpt.name} out of {run_dir} to resume from {earlier[-1].name}"
    else:
        fix = "it is the run's only checkpoint: start a new run (another --train.run_dir, without --resume)"
    return CheckpointError(f"cannot resume: {what}; {fix}")


def progress_line(record: dict, total_steps: int) -> str:
    """One plain progress line from a train metrics record (for logs that are not a terminal)."""
    line = (f"step {record['step']}/{total_steps}: loss {record['train_loss']:.4f}, "
            f"{record['tokens_per_s']:,.0f} tok/s, lr {record['lr']:.3g}, {record['elapsed_s']:.0f} s")
    if "mfu" in record:
        line += f", MFU {record['mfu']:.3f}"
    if "optimizer_share" in record:
        line += f", optimizer {100 * record['optimizer_share']:.1f}% of the step"
    if "peak_mem_gib" in record:
        line += f", peak {record['peak_mem_gib']:.1f} GiB"
    return line

