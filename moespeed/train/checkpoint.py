"""Checkpoints: run_dir/step-N/ with model, optimizer, loader and RNG states, written atomically.

A checkpoint is written into a hidden temporary folder and renamed to `step-N` only when complete,
so a crash mid-save never leaves a half-written checkpoint; older ones beyond `keep_last` are removed
after the rename.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"{run_dir}: no checkpoint (step-N folder) in this run: train first, or give another --run")
    return ckpts[-1]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                    keep_last: int) -> Path:
    """Write step-N atomically; `state` is JSON-able (step, loader position, counters)."""
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step}"
    tmp = run_dir / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{ckpt}: state.json missing or corrupt: use another checkpoint") from None


def load_model_state(ckpt: Path, model: torch.nn.Module) -> None:
    try:
        state = torch.load(Path(ckpt) / "model.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{ckpt}: model.pt missing or corrupt ({type(e).__name__}): use another checkpoint") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)[:200]
        raise CheckpointError(f"{ckpt}: does not fit this model config ({first})") from None


def load_training_state(ckpt: Path, optimizer) -> None:
    try:
        optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=True))
        set_rng_state(torch.load(Path(ckpt) / "rng.pt", weights_only=False))
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{ckpt}: optimizer or RNG state missing or corrupt ({type(e).__name__})") from None
