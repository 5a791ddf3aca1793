"""Run directories: `runs/<name>/` holds config.toml, tokenizer.json, metrics.jsonl and step-N/ checkpoints.

Also `load(run_dir)`, the Python API's way to get a trained model and its tokenizer back.
"""
from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path

import torch

from .config import Config, config_from_dict, to_toml
from .errors import CheckpointError, MoespeedError
from .train.checkpoint import latest_checkpoint, list_checkpoints, load_model_state, read_state

RUNS_ROOT = Path("runs")


def new_run_dir(cfg: Config) -> Path:
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    return RUNS_ROOT / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(root: Path = RUNS_ROOT) -> Path:
    """The run whose newest checkpoint is the most recent."""
    runs = [p for p in root.glob("*") if p.is_dir() and list_checkpoints(p)] if root.is_dir() else []
    if not runs:
        raise CheckpointError(f"no trained run under {root}/: run `moespeed train` first, or pass --run DIR")
    return max(runs, key=lambda p: list_checkpoints(p)[-1].stat().st_mtime)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_run_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(run_dir / "config.toml", to_toml(cfg))


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no config.toml: not a moespeed run directory")
    try:
        return config_from_dict(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, MoespeedError) as e:
        raise CheckpointError(f"{path}: unreadable run config ({e})") from None


def _is_checkpoint(path: Path) -> bool:
    """A step-N folder (single-process or sharded), not a run directory."""
    return path.is_dir() and any((path / name).exists() for name in ("state.json", "model.pt", "dcp"))


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.toml").is_file() or bool(list_checkpoints(path)))


def _checkpoint_path(run: str | None, checkpoint: str) -> Path | None:
    """The checkpoint folder --checkpoint names (a step-N of --run, or a path), or None if there is none."""
    ckpt = Path(checkpoint)
    if _is_run_dir(ckpt) and not _is_checkpoint(ckpt):
        raise CheckpointError(f"{checkpoint} is a run directory: use --run {checkpoint}")
    if run and _is_checkpoint(Path(run) / checkpoint):
        ckpt = Path(run) / checkpoint  # `checkpoint` itself when it is an absolute path
    elif not _is_checkpoint(ckpt):
        return None
    if run and ckpt.resolve().parent != Path(run).resolve():
        raise CheckpointError(f"--checkpoint {checkpoint} is not in --run {run}: "
                              f"give a step-N of {run}, or leave out --run")
    return ckpt


def resolve_checkpoint(run: str | None, checkpoint: str | None) -> tuple[Path, Path]:
    """(run_dir, checkpoint dir) from --run and --checkpoint (a step-N folder or its name)."""
    if run and _is_checkpoint(Path(run)):
        raise CheckpointError(f"{run} is a checkpoint: use --run {Path(run).parent} --checkpoint {Path(run).name}")
    ckpt = _checkpoint_path(run, checkpoint) if checkpoint else None
    if ckpt:
        return ckpt.parent, ckpt
    run_dir = Path(run) if run else latest_run()
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory: pass an existing --run DIR")
    if checkpoint:
        ckpt = run_dir / checkpoint
        if not ckpt.is_dir():
            names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
            raise CheckpointError(f"{ckpt}: no such checkpoint: this run has {names}")
        return run_dir, ckpt
    return run_dir, latest_checkpoint(run_dir)


def decode_kernel_for(kernel: str, device: torch.device) -> str:
    """model.decode_kernel to decode with on `device`: the Triton kernel runs on CUDA only, and the torch
    path reads the same weights, so a run trained with `triton` falls back to `torch` elsewhere."""
    from .kernels.decode_attention import HAS_TRITON

    return "torch" if kernel == "triton" and (device.type != "cuda" or not HAS_TRITON) else kernel


def load(run_dir: str | Path | None = None, checkpoint: str | None = None, device: str | torch.device = "cpu",
         log=None):
    """(model, tokenizer) of a run's latest (or named) checkpoint, in eval mode on `device`.

    log: called with a note when the run's decode kernel cannot run on `device` (see decode_kernel_for)."""
    from .data.tokenizer import load_tokenizer
    from .model.transformer import Transformer

    run_dir, ckpt = resolve_checkpoint(str(run_dir) if run_dir else None, checkpoint)
    cfg = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    state = read_state(ckpt)
    vocab = tokenizer.get_vocab_size()
    if vocab != state.get("tokenizer_vocab_size", vocab) or vocab > cfg.model.vocab_size:
        raise CheckpointError(f"{run_dir}/tokenizer.json has {vocab} tokens but the checkpoint was trained with "
                              f"{state.get('tokenizer_vocab_size')}: restore the run's own tokenizer.json")
    device = torch.device(device)
    kernel = decode_kernel_for(cfg.model.decode_kernel, device)
    if kernel != cfg.model.decode_kernel and log:
        log(f"[model.decode_kernel = triton needs CUDA and triton: decoding with the torch kernel on {device}, "
            f"same weights]")
    cfg.model.decode_kernel = kernel
    model = Transformer(cfg.model)
    load_model_state(ckpt, model)
    return model.to(device).eval(), tokenizer
