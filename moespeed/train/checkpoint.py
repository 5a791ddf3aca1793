"""Checkpoints: run_dir/step-N/ with model, optimizer, loader and RNG states, written atomically.

Two formats, told apart by their files:
- single process: model.pt, optimizer.pt (torch.save of the state dicts), rng.pt, state.json;
- several processes: dcp/ (torch.distributed.checkpoint: every rank writes its own shards once, the
  metadata records the full shapes), rng-<rank>.pt, state.json. `moespeed.train.distributed` loads
  either format at any world size (DCP reshards); `load_model_state` reads both into one process.
A checkpoint is written into a hidden temporary folder and renamed to `step-N` only when complete
(under torch.distributed: by rank 0 after every rank has written its part), so a crash mid-save
never leaves a half-written checkpoint; older ones beyond `keep_last` are removed after the rename.
state.json holds the step, the loader position (one global count of windows: it fits any world
size) and the counters.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
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
        _publish(tmp, final, run_dir, keep_last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path, run_dir: Path, keep_last: int) -> None:
    """Rename a complete temporary checkpoint folder to step-N, then drop the oldest beyond keep_last."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{ckpt}: state.json missing or corrupt: use another checkpoint") from None


def load_model_state(ckpt: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights (either format) into a single-process model."""
    if is_sharded(ckpt):
        load_sharded(ckpt, {"model": model.state_dict()}, distributed=False)
        return
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


# ------------------------------------------------------------------------- several processes (DCP)
def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint was written by several processes (DCP format)."""
    return (Path(ckpt) / "dcp" / ".metadata").is_file()


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def save_sharded_checkpoint(run_dir: str | Path, step: int, state_dict: dict, state: dict, keep_last: int) -> Path:
    """Write step-N with torch.distributed.checkpoint; every rank calls this with its own shards.

    All ranks write into run_dir/.tmp-step-N (a shared filesystem on several nodes); rank 0 renames
    it to step-N once every rank is done, then prunes old checkpoints; a barrier ends the call.
    """
    import torch.distributed.checkpoint as dcp

    run_dir, rank = Path(run_dir), dist.get_rank()
    final, tmp = run_dir / f"step-{step}", run_dir / f".tmp-step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    _fsync(tmp / f"rng-{rank}.pt")
    dcp.save(state_dict, checkpoint_id=tmp / "dcp")
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        try:
            (tmp / "state.json").write_text(json.dumps({**state, "world_size": dist.get_world_size()}, indent=1))
            _fsync(tmp / "state.json")
            _publish(tmp, final, Path(run_dir), keep_last)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(ckpt: Path, state_dict: dict, distributed: bool) -> None:
    """Fill the tensors of state_dict in place from a DCP checkpoint (resharding as needed)."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process reading is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, checkpoint_id=Path(ckpt) / "dcp", no_dist=not distributed)
    except Exception as e:  # noqa: BLE001 - DCP wraps file and key errors in several exception types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: cannot load the sharded checkpoint into this model and optimizer "
                              f"({first})") from None


def read_single_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) of a single-process checkpoint, on the CPU."""
    try:
        model = torch.load(Path(ckpt) / "model.pt", map_location="cpu", weights_only=True)
        optimizer = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{ckpt}: model.pt or optimizer.pt missing or corrupt ({type(e).__name__})") from None
    return model, optimizer


def load_rng_state(ckpt: Path, rank: int) -> None:
    """Restore this rank's RNG state (rng-<rank>.pt, else the single-process rng.pt) when saved."""
    for name in (f"rng-{rank}.pt", "rng.pt"):
        if (Path(ckpt) / name).is_file():
            set_rng_state(torch.load(Path(ckpt) / name, weights_only=False))
            return
