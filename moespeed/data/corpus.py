"""Documents to train on: this interpreter's standard library sources, or the user's files.

A document is `(name, text)`. The train/val split is by document and deterministic: a document is
in val when a hash of its name falls under `val_fraction`, so adding files never reshuffles others.
User data (`--data.data PATH ...`): text files, folders (recursive), globs, `.jsonl` (one JSON object
per line with a `text` field) and `.parquet` (a `text` column).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from ..errors import DataError

Document = tuple[str, str]
_BINARY_SNIFF_BYTES = 8192


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> Iterator[Document]:
    """Every `.py` file of the standard library (site-packages excluded), sorted by path."""
    root = stdlib_root()
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test files are deliberately not UTF-8
        if text.strip():
            yield str(path.relative_to(root)), text


def is_val(name: str, val_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of sha1(name) as a fraction in [0, 1)."""
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\x00" in f.read(_BINARY_SNIFF_BYTES)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text: convert it to UTF-8 or leave it out of --data.data") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}): check its permissions") from None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with path.open("rb") as f:  # bytes, decoded line by line, so that a bad byte is reported with its line
        for line_no, raw_line in enumerate(f, 1):
            if not raw_line.strip():
                continue
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not UTF-8 text: convert the file to UTF-8 or leave it out of --data.data") from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg}): each line must be one JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{line_no}: no string field 'text': each line must look like {{\"text\": \"...\"}}")
            try:
                record["text"].encode("utf-8")
            except UnicodeEncodeError:  # JSON can escape half of a surrogate pair ("\ud800"), which is no character
                raise DataError(f"{path}:{line_no}: field 'text' has an unpaired surrogate escape (\\ud800-\\udfff): "
                                "fix or drop that line") from None
            if record["text"].strip():
                yield f"{path}:{line_no}", record["text"]


def _parquet_documents(path: Path) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'moespeed[parquet]'") from None
    try:
        columns = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise _unreadable_parquet(path, e) from None
    if "text" not in columns:  # (read_table would raise ArrowInvalid, the same type as for a corrupt file)
        raise DataError(f"{path}: no column 'text' (it has {', '.join(map(repr, columns)) or 'no columns'}): "
                        "the parquet file needs a string column named text")
    try:
        column = pq.read_table(path, columns=["text"]).column("text")
    except Exception as e:
        raise _unreadable_parquet(path, e) from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise DataError(f"{path}: column 'text' holds {column.type}, not strings: store the text as UTF-8 strings")
    for row, text in enumerate(_parquet_strings(path, column)):
        if isinstance(text, str) and text.strip():
            yield f"{path}:{row}", text


def _unreadable_parquet(path: Path, error: Exception) -> DataError:
    return DataError(f"{path}: not a readable parquet file ({type(error).__name__}): check the file")


def _parquet_strings(path: Path, column) -> list[str | None]:
    """A parquet string column as Python strings; DataError naming the first row that is not UTF-8."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for row in range(len(column)):
            try:
                column[row].as_py()
            except UnicodeDecodeError:
                raise DataError(f"{path}: row {row} of column 'text' is not UTF-8 text: convert it to UTF-8 "
                                "or leave the file out of --data.data") from None
        raise


def _file_documents(path: Path, explicit: bool) -> Iterator[Document]:
    """Documents of one file; binary files are an error when named explicitly, skipped otherwise."""
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path)
    elif _looks_binary(path):
        if explicit:
            raise DataError(f"{path}: looks binary (contains NUL bytes): give text, .jsonl or .parquet files")
    else:
        text = _read_text_file(path) if explicit else _try_read_text(path)
        if text and text.strip():
            yield str(path), text


def _try_read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def expand_paths(specs: list[str]) -> list[tuple[Path, bool]]:
    """(file, named explicitly?) for every path, folder (recursive) and glob, in a stable order."""
    files: list[tuple[Path, bool]] = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_file():
            files.append((path, True))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{spec}: folder has no files: point --data.data at a folder with text files")
            files.extend((p, False) for p in found)
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{spec}: glob matches no files: check the pattern")
            files.extend((p, False) for p in found)
        elif path.exists():
            raise DataError(f"{spec}: not a regular file or folder (a device, fifo or socket): give text files or folders")
        else:
            raise DataError(f"{spec}: no such file or folder: check the path given to --data.data")
    return files


def user_documents(specs: list[str]) -> Iterator[Document]:
    for path, explicit in expand_paths(specs):
        yield from _file_documents(path, explicit)


def load_documents(specs: list[str]) -> list[Document]:
    """All documents of the configured corpus; raises DataError when there are none."""
    docs = list(user_documents(specs)) if specs else list(stdlib_documents())
    if not docs:
        where = ", ".join(specs) if specs else str(stdlib_root())
        raise DataError(f"no text documents found in {where}: give non-empty text, .jsonl or .parquet files")
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) split by document name; both sides get at least one document."""
    train = [d for d in docs if not is_val(d[0], val_fraction)]
    val = [d for d in docs if is_val(d[0], val_fraction)]
    if not val:  # tiny corpora: hold out the last document
        train, val = train[:-1], train[-1:]
    if not train:
        train, val = val[:-1], val[-1:]
    if not train or not val:
        raise DataError("the corpus has a single document: give at least two documents (files or lines) to split train/val")
    return train, val
