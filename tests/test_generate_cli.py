"""`moespeed generate` and `eval` on bad command lines: one line, exit status 2 (or a quiet stop), no traceback.

All tests share one tiny run trained once (`run`); a test that edits a run works on its own copy.
"""
import os
import re
import shutil
import sys

import pytest
import torch

from moespeed.cli import build_parser, main

from helpers import tiny_train_args, write_corpus

PROMPT = ["--prompt", "def function_1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step tiny run (64-token context) with one checkpoint, step-3."""
    root = tmp_path_factory.mktemp("gen")
    data = write_corpus(root / "src")
    assert main(["train"] + tiny_train_args(data, root / "run", root / "cache", steps=3)) == 0
    return root / "run"


def _copy_run(run, dest, **config_lines):
    """A copy of the run whose config.toml has `key = value` lines replaced (value as TOML text)."""
    shutil.copytree(run, dest)
    text = (dest / "config.toml").read_text()
    for key, value in config_lines.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    (dest / "config.toml").write_text(text)
    return dest


def _refused(capsys, args) -> str:
    """main(args) exits 2 with one line on stderr; return that line."""
    capsys.readouterr()
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("moespeed: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("batches", ["0", "-3"])
def test_eval_batches_below_one_is_refused(run, capsys, batches):
    assert f"--batches {batches}: must be >= 1" in _refused(capsys, ["eval", "--run", str(run), "--batches", batches])


def test_bad_device_names_the_option(run, capsys):
    cases = [(["generate", "--run", str(run), "--device", "tpu"] + PROMPT, "--device tpu: use cpu, cuda, cuda:N"),
             (["eval", "--run", str(run), "--device", "foo"], "--device foo: use cpu, cuda, cuda:N"),
             (["eval", "--run", str(run), "--device", "cuda:99"], "--device cuda:99: this machine has")]
    if not torch.cuda.is_available():
        cases.append((["generate", "--run", str(run), "--device", "cuda"] + PROMPT, "--device cuda: this machine has no"))
    for args, fragment in cases:
        err = _refused(capsys, args)
        assert fragment in err and "train.device" not in err, err


def test_non_finite_or_negative_sampling_options_are_refused(run, capsys):
    for option, value in [("--temperature", "nan"), ("--temperature", "inf"), ("--top-k", "-3"), ("--top-p", "nan")]:
        err = _refused(capsys, ["generate", "--run", str(run), option, value] + PROMPT)
        assert f"{option} {value}: must be" in err, err
    assert main(["generate", "--run", str(run), "--top-k", "0", "--max-new-tokens", "3"] + PROMPT) == 0  # 0 = off
    generate_help = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "0 = off" in " ".join(generate_help.split())


def test_a_tiny_temperature_samples_the_most_likely_token():
    from moespeed.generate import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    assert sample_next(logits, 1e-40, 50, None, torch.Generator().manual_seed(0)).tolist() == [1, 0]


def test_triton_decode_kernel_run_generates_on_cpu_with_the_torch_kernel(run, tmp_path, capsys):
    triton_run = _copy_run(run, tmp_path / "triton", decode_kernel='"triton"')
    args = ["--max-new-tokens", "6", "--seed", "1"] + PROMPT
    assert main(["generate", "--run", str(run)] + args) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "--run", str(triton_run)] + args) == 0
    out = capsys.readouterr()
    assert out.out == expected  # the same weights through the torch decode path
    assert out.err.count("decoding with the torch kernel on cpu") == 1, out.err


def test_closed_stdout_pipe_exits_quietly(run, capsys, monkeypatch):
    """`moespeed generate ... | head -c 5`: the reader leaves; no traceback, status 141 (SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["generate", "--run", str(run), "--max-new-tokens", "20"] + PROMPT) == 141
        closed_pipe.write("what interpreter exit would flush")
        closed_pipe.flush()  # stdout now leads to /dev/null: no second BrokenPipeError at exit
    assert capsys.readouterr().err == ""


def test_a_note_when_generation_stops_at_the_context(run, capsys):
    assert main(["generate", "--run", str(run), "--max-new-tokens", "100"] + PROMPT) == 0
    assert capsys.readouterr().err == "[stopped at the model's 64-token context]\n"
    assert main(["generate", "--run", str(run), "--max-new-tokens", "5"] + PROMPT) == 0
    assert capsys.readouterr().err == ""


def test_run_and_checkpoint_of_the_wrong_kind_are_refused(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(run.parent)
    other = _copy_run(run, tmp_path / "other")
    cases = [(["generate", "--checkpoint", "run"] + PROMPT, "run is a run directory: use --run run"),
             (["eval", "--run", "run/step-3"], "run/step-3 is a checkpoint: use --run run --checkpoint step-3"),
             (["generate", "--run", "run", "--checkpoint", str(other / "step-3")] + PROMPT,
              f"--checkpoint {other / 'step-3'} is not in --run run")]
    for args, fragment in cases:
        err = _refused(capsys, args)
        assert fragment in err, err
    for checkpoint in ("step-3", "run/step-3", str(run / "step-3")):  # a name, or a path inside --run
        assert main(["generate", "--run", "run", "--checkpoint", checkpoint, "--max-new-tokens", "2"] + PROMPT) == 0


def test_eval_names_the_run_config_when_its_data_is_gone(run, tmp_path, capsys, monkeypatch):
    relative = _copy_run(run, tmp_path / "relative", data='["src"]')  # relative to where it was trained
    monkeypatch.chdir(run.parent)
    assert main(["eval", "--run", str(relative), "--batches", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    err = _refused(capsys, ["eval", "--run", "relative", "--batches", "1"])
    assert (f"relative/config.toml: data.data = src: no such file or folder in {tmp_path} (eval reads the run's "
            "val split): restore the data or edit data.data there") in err, err
