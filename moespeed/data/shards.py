"""Token shards: a 32-byte header + tokens, memory-mapped for reading.

Header (little-endian): magic b"MOESHARD" (8 bytes), version u32, bytes per token u32 (2 = uint16,
4 = uint32), token count u64, reserved u64 (0). Tokens are uint16 when the vocabulary has fewer than
65536 tokens, else uint32. Files are written to a temporary name and renamed, so a shard on disk is
always complete; a truncated or foreign file is rejected with a DataError.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError

MAGIC = b"MOESHARD"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
HEADER_BYTES = _HEADER.size  # 32


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens atomically as a shard (temp file + fsync + rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size, 0))
            f.write(tokens.astype(dtype, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map a shard's tokens after checking its header and size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} not found: run `moespeed prepare` again")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: too short to be a moespeed shard: delete it and run `moespeed prepare` again")
    with path.open("rb") as f:
        magic, version, itemsize, count, _ = _HEADER.unpack(f.read(HEADER_BYTES))
    if magic != MAGIC:
        raise DataError(f"{path}: not a moespeed shard (bad magic): delete it and run `moespeed prepare` again")
    if version != VERSION:
        raise DataError(f"{path}: shard version {version}, this moespeed reads {VERSION}: prepare the data again")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: corrupt header (bytes per token {itemsize}): delete it and prepare again")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise DataError(f"{path}: truncated or corrupt ({size} bytes, header says {expected}): delete it and prepare again")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
