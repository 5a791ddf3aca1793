"""`moespeed` command line: prepare | train | generate | eval.

Config keys are dotted options (`--model.n_layers 4`); `moespeed train --help` lists them all.
Errors caused by input (config, data, checkpoint, prompt) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import typing
from pathlib import Path

from . import config as config_mod
from .errors import CheckpointError, ConfigError, MoespeedError
from .train.stopping import TrainingStopped


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting.

    An unrecognized option (e.g. a misspelled config key, `--model.d_mode`) is reported with the
    closest options of the command it was given to, and that command's `--help`.
    """

    def error(self, message: str):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        import difflib  # here, not at the top of the file: this class is all of cli.py that config work touches

        namespace, unrecognized = self.parse_known_args(args, namespace)
        if unrecognized:
            command = self._subcommand_parser(getattr(namespace, "command", None)) or self
            known = [name for action in command._actions for name in action.option_strings]
            options = [arg.split("=", 1)[0] for arg in unrecognized if arg.startswith("--")]
            close = [match for option in options for match in difflib.get_close_matches(option, known, n=3, cutoff=0.8)]
            hint = f": did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""
            raise ConfigError(f"unrecognized arguments: {' '.join(unrecognized)}{hint} "
                              f"(see `{command.prog} --help` for every option)")
        return namespace

    def _subcommand_parser(self, name: str | None) -> argparse.ArgumentParser | None:
        """The parser of subcommand `name` (None if this parser has no such subcommand)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(config_mod.PRESETS), help="named preset (default: quickstart)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of config keys, applied over the preset")
    groups = {name: parser.add_argument_group(f"{name} options") for name in ("model", "data", "train")}
    for key, type_name, default, doc, choices in config_mod.iter_options():
        section = key.split(".")[0]
        is_list = isinstance(default, list)
        hint = f" [{'|'.join(map(str, choices))}]" if choices else ""
        groups[section].add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, nargs="+" if is_list else None,
                                     metavar=type_name.upper(), help=f"{doc}{hint} (default: {default!r})")


def _overrides(args: argparse.Namespace) -> list[tuple[str, typing.Any]]:
    return [(k, v) for k, v in vars(args).items() if "." in k]


def _build_config(args: argparse.Namespace, base=None):
    overrides = _overrides(args)
    if getattr(args, "resume", False):
        overrides.append(("train.resume", True))
    return config_mod.build_config(args.preset, args.config, overrides, base=base)


def _resume_target(args: argparse.Namespace) -> tuple[bool, str]:
    """(resume?, train.run_dir) from --resume, the config file and the overrides, before any config is resolved
    (a resumed run's config.toml is the base the others apply to)."""
    probe = config_mod.Config()
    train = config_mod.load_toml(args.config).get("train", {}) if args.config else {}
    for key in ("resume", "run_dir"):
        if isinstance(train, dict) and key in train:
            config_mod.set_key(probe, f"train.{key}", train[key])
    for key, value in _overrides(args):
        if key in ("train.resume", "train.run_dir"):
            config_mod.set_key(probe, key, value)
    return bool(args.resume or probe.train.resume), probe.train.run_dir


# ------------------------------------------------------------------------------------ commands
def cmd_prepare(args) -> None:
    from .data.prepare import prepare_data

    cfg = _build_config(args)
    data = prepare_data(cfg.data)
    print(f"tokenizer: {data.tokenizer_path}\ntrain shard: {data.train_path}\nval shard: {data.val_path}")


def cmd_train(args) -> None:
    from .run import latest_run
    from .train.trainer import Trainer

    resume, run_dir = _resume_target(args)
    base = None
    if resume:  # --resume or train.resume = true: the run's own config.toml, then --config, then the overrides
        from .run import read_run_config
        if run_dir and not Path(run_dir).is_dir():
            raise CheckpointError(f"--train.run_dir {run_dir}: no such run directory to resume: check the path, "
                                  "or train without --resume to start the run")
        try:
            run_dir = run_dir or str(latest_run())
        except CheckpointError:
            raise CheckpointError("--resume: no run with a checkpoint under runs/: give --train.run_dir DIR, "
                                  "or train without --resume first") from None
        base = read_run_config(run_dir)
        setattr(args, "train.run_dir", run_dir)
        setattr(args, "train.resume", True)
    Trainer(_build_config(args, base)).fit()


def _stream_text(tokenizer, prompt_ids: list[int], new_ids: list[int], printed: int) -> int:
    """Print the decoded continuation beyond `printed` characters; return the new count."""
    text = tokenizer.decode(new_ids)
    safe = len(text.rstrip("\ufffd"))  # a split multi-byte character waits for its next byte
    if safe > printed:
        sys.stdout.write(text[printed:safe])
        sys.stdout.flush()
    return max(printed, safe)


def cmd_generate(args) -> None:
    import torch

    from .data.tokenizer import encode_prompt
    from .errors import PromptError
    from .run import load

    _check_sampling(args)
    device = _device(args.device)
    model, tokenizer = load(args.run, args.checkpoint, device, log=lambda m: print(m, file=sys.stderr))
    prompt_ids = encode_prompt(tokenizer, args.prompt)
    if len(prompt_ids) >= model.cfg.max_seq_len:
        raise PromptError(f"the prompt is {len(prompt_ids)} tokens, the model's context is {model.cfg.max_seq_len}: shorten it")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = torch.tensor([prompt_ids], device=device)
    sys.stdout.write(args.prompt)
    new_ids: list[int] = []
    printed, stamps = 0, [time.time()]
    for next_token in model.generate(tokens, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator,
                                     compile=args.compile):
        new_ids.append(int(next_token[0]))
        printed = _stream_text(tokenizer, prompt_ids, new_ids, printed)
        stamps.append(time.time())
    sys.stdout.write("\n")
    if len(new_ids) < args.max_new_tokens:  # Transformer.generate stops where the context is full
        print(f"[stopped at the model's {model.cfg.max_seq_len}-token context]", file=sys.stderr)
    if args.verbose:
        elapsed = stamps[-1] - stamps[0]
        # from the third token on: the prefill (first token) and the step's compilation (second) are done
        steady = f", then {(len(stamps) - 3) / (stamps[-1] - stamps[2]):.1f} tok/s" if len(stamps) > 4 else ""
        cache = model.kv_cache_bytes_per_token(next(model.parameters()).dtype)
        print(f"[{len(new_ids)} tokens in {elapsed:.2f}s{steady}; KV cache "
              f"{cache['per_layer']} B/token/layer, {cache['total']} B/token total "
              f"(MHA equivalent {cache['mha_total']} B/token, {cache['mha_total'] / cache['total']:.1f}x larger)]",
              file=sys.stderr)


def cmd_eval(args) -> None:
    import torch

    from .data.loader import val_loader
    from .data.prepare import prepare_data
    from .run import load, read_run_config, resolve_checkpoint

    if args.batches < 1:
        raise ConfigError(f"--batches {args.batches}: must be >= 1")
    device = _device(args.device)
    run_dir, ckpt = resolve_checkpoint(args.run, args.checkpoint)
    model, tokenizer = load(run_dir, ckpt.name, device)
    cfg = read_run_config(run_dir)
    _check_run_data(run_dir, cfg.data.data)
    cfg.data.tokenizer = str(run_dir / "tokenizer.json")
    data = prepare_data(cfg.data, log=lambda m: print(m, file=sys.stderr))
    loader = val_loader(data.val_path, cfg.data.batch_size, cfg.data.seq_len, data.bos_id)
    n_batches = min(args.batches, max(1, loader.n_windows // cfg.data.batch_size))
    total = 0.0
    with torch.no_grad():
        for _ in range(n_batches):
            tokens, targets, doc_ids = loader.next_batch(device)
            total += model(tokens, targets, doc_ids).item()
    loss = total / n_batches
    cache = model.kv_cache_bytes_per_token(torch.bfloat16)
    print(f"{ckpt}: val loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f} "
          f"({n_batches} batches x {cfg.data.batch_size} x {cfg.data.seq_len} tokens)")
    print(f"KV cache (bf16): {cache['per_layer']} B/token/layer, {cache['total']} B/token; "
          f"MHA equivalent {cache['mha_total']} B/token ({cache['mha_total'] / cache['total']:.1f}x)")


def _device(name: str):
    """The torch device that --device names: cpu (also when left out), cuda, cuda:N or auto."""
    import re

    import torch

    if name in ("", "cpu"):
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device {name}: use cpu, cuda, cuda:N or auto (or leave it out for cpu)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(name.partition(":")[2] or 0) >= count:
        have = f"has {count} CUDA GPU(s): use cuda:0..cuda:{count - 1}, cpu" if count else "has no CUDA GPU: use cpu"
        raise ConfigError(f"--device {name}: this machine {have} or auto")
    return torch.device(name)


def _check_run_data(run_dir, specs: list[str]) -> None:
    """eval reads the val split of the data the run's config.toml names: one line there if a path is gone.

    Relative paths are read from the working directory (as train read them)."""
    import glob
    import os

    from .errors import DataError
    for spec in specs:
        path = os.path.expanduser(spec)
        if os.path.exists(path) or glob.glob(path, recursive=True):
            continue
        where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
        raise DataError(f"{run_dir}/config.toml: data.data = {spec}: no such file or folder{where} (eval reads the "
                        f"run's val split): restore the data or edit data.data there")


def _check_sampling(args) -> None:
    """One line for a sampling option generate cannot use (nan, inf, a negative count)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0 (0 = off: sample among all tokens)")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1] (1 = off)")


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moespeed", description="Pre-train and run efficient sparse language models.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, **kw):
        return sub.add_parser(name, allow_abbrev=False, **kw)

    p = add("prepare", help="build the tokenizer and token shards (cached)")
    _add_config_options(p)
    p.set_defaults(func=cmd_prepare)

    p = add("train", help="train a model (default: the quickstart preset on the stdlib sources)")
    p.add_argument("--resume", action="store_true",
                   help="continue --train.run_dir (default: the latest run) from its latest checkpoint, with its "
                        "config.toml as the base for --config and overrides (same as --train.resume true)")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = add("generate", help="sample text from a trained run")
    p.add_argument("--run", help="run directory (default: the latest run under runs/)")
    p.add_argument("--checkpoint", help="checkpoint folder name (step-N) or path (default: the latest)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = off (default: 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--verbose", action="store_true", help="print speed and KV-cache size to stderr")
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled static step (CUDA graph on GPU): slower start, faster tokens")
    p.set_defaults(func=cmd_generate)

    p = add("eval", help="val loss and perplexity of a run or checkpoint")
    p.add_argument("--run", help="run directory (default: the latest run under runs/)")
    p.add_argument("--checkpoint", help="checkpoint folder name (step-N) or path (default: the latest)")
    p.add_argument("--batches", type=int, default=50, help="val batches to average (default: 50)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except MoespeedError as e:
        print(f"moespeed: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # SIGINT / SIGTERM: a checkpoint was saved at a step boundary
        if e.message:
            print(f"moespeed: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("moespeed: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as `cat` would
        _discard_stdout()
        return 141  # 128 + SIGPIPE, the status of a command that a closed pipe stopped
    return 0


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing its buffer at exit raises no second BrokenPipeError.

    The recipe of https://docs.python.org/3/library/signal.html#note-on-sigpipe."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
