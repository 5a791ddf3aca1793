"""`option()`: a dataclass field with a one-line doc and optional allowed choices.

Every config dataclass in moespeed declares its fields with `option`, so that `--help` can list
each key with its doc and the config loader can reject values outside `choices` with one line.
Components own their config dataclass (e.g. `MoEConfig` next to the MoE layer); a dataclass may
define `validate(self)` that raises `ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence


def option(default: Any, doc: str, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with a `doc` string (shown by --help) and optional `choices`."""
    meta = {"doc": doc, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_doc(f: dataclasses.Field) -> str:
    """The one-line doc of a field declared with `option` ('' if none)."""
    return f.metadata.get("doc", "")


def field_choices(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a field declared with `option(..., choices=...)`, or None."""
    return f.metadata.get("choices")
