"""The training lifecycle under stress: signals, divergence, resuming, broken checkpoints.

Signal tests run `python -m moespeed train` in a subprocess and send it a real SIGINT / SIGTERM.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moespeed.cli import main
from moespeed.train.checkpoint import list_checkpoints
from moespeed.train.stopping import GracefulStop, TrainingStopped
from moespeed.train.trainer import Trainer

from helpers import tiny_config, tiny_train_args, write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "src"), root / "cache"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run) if "train_loss" in r]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("moespeed: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_a_step_boundary_saves_and_resumes(corpus, tmp_path, capsys, sig):
    data, cache = corpus
    run = tmp_path / "run"
    args = tiny_train_args(data, run, cache, steps=100000)
    args += ["--train.ckpt_every", "100000", "--train.eval_every", "100000", "--train.threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moespeed", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    for line in proc.stdout:  # plain progress lines (not a terminal), one per step
        if line.startswith("step 3/") or time.time() > deadline:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moespeed: stopped by {signal.Signals(sig).name} at step ") and "Traceback" not in err, err
    assert f"moespeed train --resume --train.run_dir {run}" in last
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1 and not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    step = json.loads((ckpts[-1] / "state.json").read_text())["step"]
    assert step >= 3 and last.split(" at step ")[1].startswith(f"{step}/100000:")
    assert _train_steps(run) == list(range(1, step + 1))
    # the resume command of the message, with only a new step count: the run's config.toml supplies the rest
    assert main(["train", "--resume", "--train.run_dir", str(run), "--train.steps", str(step + 2)]) == 0
    assert _train_steps(run) == list(range(1, step + 3))
    assert [p.name for p in list_checkpoints(run)][-1] == f"step-{step + 2}"


def test_graceful_stop_restores_handlers_and_a_second_sigint_quits_at_once():
    previous_int, previous_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopper = GracefulStop(announce=False).install()
    try:
        assert stopper.should_stop() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.should_stop() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # asked again: no waiting for the step boundary
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stopper.restore()
    assert signal.getsignal(signal.SIGINT) is previous_int and signal.getsignal(signal.SIGTERM) is previous_term
    assert TrainingStopped(signal.SIGINT).exit_code == 130 and TrainingStopped(signal.SIGTERM).exit_code == 143


def test_keyboard_interrupt_inside_a_step_saves_nothing(corpus, tmp_path, monkeypatch):
    """A KeyboardInterrupt that lands inside a step (a second Ctrl-C) leaves a half-updated state: never saved."""
    from moespeed.data.loader import TokenLoader
    data, cache = corpus
    real_next, calls = TokenLoader.next_batch, {"n": 0}

    def next_batch(self, device=None):
        if Path(self.shard_path).name == "train.bin":
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
        return real_next(self, device)

    monkeypatch.setattr(TokenLoader, "next_batch", next_batch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(data, tmp_path / "run", cache, steps=8)).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-3"]


@pytest.mark.parametrize("ckpt_every, fragment", [
    ("1", "the weights hold NaN or inf values"),  # caught before a checkpoint, between logged steps
    ("100", "the training loss is nan (mean of steps 3-4)"),  # caught at the logging interval
])
def test_divergence_stops_with_one_line_and_no_nan_checkpoint(corpus, tmp_path, capsys, ckpt_every, fragment):
    data, cache = corpus
    run = tmp_path / "run"
    args = tiny_train_args(data, run, cache, steps=8) + [
        "--train.lr", "1e30", "--train.optimizer", "adamw", "--train.log_every", "2", "--train.eval_every", "100",
        "--train.ckpt_every", ckpt_every]
    assert main(["train"] + args) == 2
    err = _one_line_error(capsys)
    assert "training diverged at step " in err and fragment in err and "Lower train.lr (now 1e+30" in err, err
    for ckpt in list_checkpoints(run):  # every checkpoint written holds finite weights
        state = torch.load(ckpt / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt
    if list_checkpoints(run):
        assert f"continue from {list_checkpoints(run)[-1].name} with: moespeed train --resume" in err
    else:
        assert "this run has no checkpoint yet" in err
    records = _records(run)  # still valid JSON, no NaN written
    assert all(math.isfinite(r.get("train_loss", 0.0)) and math.isfinite(r.get("val_loss", 0.0)) for r in records)


def test_resume_takes_the_runs_config_and_a_finished_run_exits_0(corpus, tmp_path, capsys, monkeypatch):
    data, cache = corpus
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train"] + tiny_train_args(data, run, cache, steps=3)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    # finished: says so, exits 0, touches nothing
    assert main(["train", "--resume", "--train.run_dir", str(run)]) == 0
    assert "is finished: its latest checkpoint is step 3 and train.steps = 3" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # train.resume = true in a config file behaves as --resume, on top of the run's config.toml
    (tmp_path / "more.toml").write_text(f'[train]\nresume = true\nrun_dir = "{run}"\nsteps = 5\n')
    assert main(["train", "--config", str(tmp_path / "more.toml")]) == 0
    assert _train_steps(run) == [1, 2, 3, 4, 5]
    assert "steps = 5\n" in (run / "config.toml").read_text()  # the raised step count is the run's now
    capsys.readouterr()
    assert main(["train", "--resume"]) == 2  # no runs/ here: the latest run cannot be found
    assert "--resume: no run with a checkpoint under runs/: give --train.run_dir DIR" in _one_line_error(capsys)


def test_resume_refusals_are_one_line_and_write_nothing(corpus, tmp_path, capsys, monkeypatch):
    data, cache = corpus
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r"
    assert main(["train"] + tiny_train_args(data, run, cache, steps=4) + ["--train.ckpt_every", "2"]) == 0
    capsys.readouterr()
    config_before = (run / "config.toml").read_text()
    cases = [
        (["--model.d_model", "64"], "cannot resume: model.d_model is 32 in the run but 64 now"),
        (["--data.seq_len", "16"], "cannot resume: data.seq_len is 32 in the run but 16 now"),
        (["--preset", "small"], "--preset small: the run being resumed was trained with preset 'quickstart'"),
    ]
    for extra, fragment in cases:
        assert main(["train", "--resume", "--train.run_dir", str(run), "--train.steps", "6"] + extra) == 2
        assert fragment in _one_line_error(capsys)
    assert main(["train", "--resume", "--train.run_dir", str(tmp_path / "nope")]) == 2
    assert "no such run directory to resume" in _one_line_error(capsys)
    # a truncated latest checkpoint: named, with the way out (the checkpoint before it)
    model_pt = run / "step-4" / "model.pt"
    intact = model_pt.read_bytes()
    model_pt.write_bytes(intact[:200])
    assert main(["train", "--resume", "--train.steps", "6"]) == 2  # the latest run under runs/
    err = _one_line_error(capsys)
    assert "cannot resume: runs/r/step-4: model.pt missing or corrupt" in err and "to resume from step-2" in err, err
    model_pt.write_bytes(intact)
    (run / "step-4" / "state.json").write_text('{"step": 4, "loa')
    assert main(["train", "--resume", "--train.run_dir", str(run), "--train.steps", "6"]) == 2
    assert "step-4: state.json missing or corrupt; move step-4 out of" in _one_line_error(capsys)
    assert (run / "config.toml").read_text() == config_before and _train_steps(run) == [1, 2, 3, 4]
    # the advice works: without step-4 the run resumes from step-2
    (run / "step-4").rename(tmp_path / "step-4-broken")
    assert main(["train", "--resume", "--train.run_dir", str(run), "--train.steps", "6"]) == 0
    assert _train_steps(run) == [1, 2, 3, 4, 5, 6]
