"""The training loop: accumulation, clipping, schedule, eval, checkpoints, metrics, progress.

One `Trainer` owns a run directory. `Trainer(cfg).fit()` prepares data, builds (or resumes) the
model and optimizer, and trains to `train.steps`, evaluating at step 0, every `eval_every` steps and
at the end, checkpointing every `ckpt_every` steps, at the end, and on Ctrl-C.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config
from ..data.loader import TokenLoader
from ..data.prepare import prepare_data
from ..errors import CheckpointError, ConfigError
from ..model.transformer import Transformer
from ..optim.build import build_optimizer
from ..optim.schedule import lr_at, lr_factor
from ..run import new_run_dir, read_run_config, save_run_config
from .checkpoint import latest_checkpoint, list_checkpoints, load_model_state, load_training_state, read_state, save_checkpoint
from .metrics import MetricsLogger, flops_per_token, moe_metrics, peak_flops, plot_expert_load, plot_loss_curve


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}: no CUDA GPU is available here: use auto or cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (dtype auto/bf16), fp32 elsewhere."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
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
        self.log = log or (lambda msg: tqdm.write(msg))
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = new_run_dir(cfg)

    # ----------------------------------------------------------------------------------- setup
    def _setup_run_dir(self, data) -> int:
        """Create or check the run directory; returns the step to start from."""
        cfg, run_dir = self.cfg, self.run_dir
        if cfg.train.resume:
            if not list_checkpoints(run_dir):
                raise CheckpointError(f"{run_dir}: no checkpoint to resume from: train without --resume first")
            check_resume_compatible(read_run_config(run_dir), cfg)
            if cfg.model.vocab_size == 0:
                cfg.model.vocab_size = read_run_config(run_dir).model.vocab_size
            return read_state(latest_checkpoint(run_dir))["step"]
        if list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                                  "or choose another --train.run_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = padded_vocab(data.vocab_size)
        elif cfg.model.vocab_size < data.vocab_size:
            raise CheckpointError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                                  f"{data.vocab_size} tokens: set it to 0 (automatic) or >= {data.vocab_size}")
        shutil.copyfile(data.tokenizer_path, run_dir / ".tokenizer.json.tmp")
        (run_dir / ".tokenizer.json.tmp").replace(run_dir / "tokenizer.json")
        save_run_config(run_dir, cfg)
        return 0

    # -------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, model, val_path, bos_id) -> float:
        """Mean val loss over the first eval_batches val batches (the same batches every time)."""
        model.eval()
        loader = TokenLoader(val_path, self.cfg.data.batch_size, self.cfg.data.seq_len, bos_id, shuffle=False)
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.train.eval_batches):
            tokens, targets, doc_ids = (t.to(self.device) for t in loader.next_batch())
            with autocast_for(self.device, self.cfg.train.dtype):
                total += model(tokens, targets, doc_ids).float()
        model.train()
        return (total / self.cfg.train.eval_batches).item()

    # ------------------------------------------------------------------------------------- fit
    def fit(self) -> Path:
        cfg, tc = self.cfg, self.cfg.train
        data = prepare_data(cfg.data, log=self.log)
        start_step = self._setup_run_dir(data)
        torch.manual_seed(tc.seed)
        model = Transformer(cfg.model).to(self.device)
        optimizer, summary = build_optimizer(model, tc)
        loader = TokenLoader(data.train_path, cfg.data.batch_size, cfg.data.seq_len, data.bos_id, seed=tc.seed)
        counters = {"tokens": 0, "elapsed_s": 0.0, "interval_loss_sum": 0.0, "interval_steps": 0}
        if start_step:
            ckpt = latest_checkpoint(self.run_dir)
            load_model_state(ckpt, model)
            load_training_state(ckpt, optimizer)
            state = read_state(ckpt)
            loader.load_state_dict(state["loader"])
            counters.update(state["counters"])
            self.log(f"resumed {ckpt} at step {start_step}")
        n_params = sum(p.numel() for p in model.parameters())
        self.log(f"run {self.run_dir}: {n_params / 1e6:.2f}M parameters on {self.device}\n{summary}")
        metrics = MetricsLogger(self.run_dir)
        metrics.truncate_after(start_step)
        train_model = torch.compile(model) if tc.compile else model
        flops_tok, peak = flops_per_token(model, cfg.data.seq_len), peak_flops(self.device)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * tc.grad_accum

        if start_step == 0:
            metrics.log({"step": 0, "val_loss": self.evaluate(model, data.val_path, data.bos_id), "lr": lr_at(0, tc),
                         "tokens": 0, "tokens_per_s": 0.0, "elapsed_s": 0.0})
        step = start_step
        interval_loss = torch.tensor(counters["interval_loss_sum"], device=self.device)
        interval_start, interval_tokens = time.time(), 0
        expert_loads: list = []
        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

        def checkpoint_state() -> dict:
            counters["interval_loss_sum"] = interval_loss.item()
            return {"step": step, "loader": loader.state_dict(), "counters": counters,
                    "tokenizer_vocab_size": data.vocab_size}

        try:
            while step < tc.steps:
                lr, factor = lr_at(step, tc), lr_factor(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                for _ in range(tc.grad_accum):
                    tokens, targets, doc_ids = (t.to(self.device, non_blocking=True) for t in loader.next_batch())
                    with autocast_for(self.device, tc.dtype):
                        loss = train_model(tokens, targets, doc_ids)
                    (loss / tc.grad_accum).backward()
                    interval_loss += loss.detach().float() / tc.grad_accum
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for _, moe in model.moe_layers():
                    moe.update_bias()
                step += 1
                counters["interval_steps"] += 1
                counters["tokens"] += tokens_per_step
                interval_tokens += tokens_per_step
                bar.update(1)

                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.time()
                    counters["elapsed_s"] += now - interval_start
                    train_loss = interval_loss.item() / counters["interval_steps"]
                    tok_s = interval_tokens / max(now - interval_start, 1e-9)
                    record = {"step": step, "train_loss": train_loss, "lr": lr, "tokens": counters["tokens"],
                              "tokens_per_s": tok_s, "elapsed_s": counters["elapsed_s"]}
                    if peak:
                        record["mfu"] = flops_tok * tok_s / peak
                    if self.device.type == "cuda":
                        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    moe_record, expert_loads = moe_metrics(model)
                    record.update(moe_record)
                    metrics.log(record)
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    interval_loss.zero_()
                    counters["interval_steps"] = 0
                    interval_start, interval_tokens = time.time(), 0
                if step % tc.eval_every == 0 or step == tc.steps:
                    val_loss = self.evaluate(model, data.val_path, data.bos_id)
                    metrics.log({"step": step, "val_loss": val_loss, "lr": lr, "tokens": counters["tokens"],
                                 "tokens_per_s": 0.0, "elapsed_s": counters["elapsed_s"]})
                    self.log(f"step {step}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.1f})")
                    plot_expert_load(self.run_dir, expert_loads, step)
                    interval_start = time.time()
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    save_checkpoint(self.run_dir, step, model, optimizer, checkpoint_state(), tc.keep_last)
                    interval_start = time.time()
        except KeyboardInterrupt:
            bar.close()
            if step > start_step:
                path = save_checkpoint(self.run_dir, step, model, optimizer, checkpoint_state(), tc.keep_last)
                self.log(f"interrupted: saved {path}; continue with --resume --train.run_dir {self.run_dir}")
            metrics.close()
            raise
        bar.close()
        metrics.close()
        png = plot_loss_curve(self.run_dir)
        self.log(f"done: {self.run_dir} (loss curve: {png})")
        return self.run_dir
