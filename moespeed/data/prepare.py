"""Corpus -> tokenizer -> train/val shards, prepared once and cached by content hash.

The cache key hashes every document (name and text), the split and the tokenizer, so a changed file
or setting prepares anew while an unchanged corpus is read back in a moment.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import ConfigError, DataError
from .corpus import Document, load_documents, split_documents
from .shards import read_shard, write_shard
from .tokenizer import bos_id, load_tokenizer, train_tokenizer


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    bos_id: int
    vocab_size: int


def _hash_documents(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode("utf-8", "surrogatepass") + b"\0" + text.encode("utf-8", "surrogatepass") + b"\1")
    return h.hexdigest()


def _sample_texts(docs: list[Document], max_chars: int):
    """Documents spread evenly over the corpus until max_chars characters."""
    total = sum(len(t) for _, t in docs)
    stride = max(1, round(total / max_chars)) if total > max_chars else 1
    seen = 0
    for _, text in docs[::stride]:
        yield text
        seen += len(text)
        if seen >= max_chars:
            return


def tokenize_documents(tok: Tokenizer, docs: list[Document], bos: int) -> np.ndarray:
    """One token stream: BOS doc1 BOS doc2 ..."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pieces: list[np.ndarray] = []
    batch = 256
    for start in range(0, len(docs), batch):
        for enc in encode([t for _, t in docs[start:start + batch]], add_special_tokens=False):
            pieces.append(np.array([bos], dtype=np.int64))
            pieces.append(np.asarray(enc.ids, dtype=np.int64))
    return np.concatenate(pieces)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _make_cache_dir(cache_dir: str) -> Path:
    """Create data.cache_dir (and check it takes files) before any slow work; ConfigError if it cannot."""
    root = Path(os.path.expanduser(cache_dir))
    failed_to = "write in it" if root.is_dir() else "create it"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise ConfigError(f"data.cache_dir = {cache_dir}: cannot {failed_to} ({e.strerror or e}): "
                          "choose a writable folder") from None
    return root


def _check_split_sizes(n_train: int, n_val: int, data_cfg) -> None:
    """Each split must fill at least one sequence of seq_len + 1 tokens (inputs and shifted targets)."""
    needed = data_cfg.seq_len + 1
    if n_train < needed:
        raise DataError(f"the train split has {n_train} tokens, fewer than one sequence needs (data.seq_len + 1 = "
                        f"{needed}): add data or lower data.seq_len")
    if n_val < needed:
        raise DataError(f"the val split has {n_val} tokens, fewer than one sequence needs (data.seq_len + 1 = "
                        f"{needed}): add data, raise data.val_fraction (now {data_cfg.val_fraction}) or lower data.seq_len")


def prepare_data(data_cfg, log=print) -> PreparedData:
    """Build (or load from the cache) the tokenizer and the train/val shards for a DataConfig."""
    t0 = time.time()
    cache_root = _make_cache_dir(data_cfg.cache_dir)
    docs = load_documents(list(data_cfg.data))
    train_docs, val_docs = split_documents(docs, data_cfg.val_fraction)
    corpus_hash = _hash_documents(docs)

    if data_cfg.tokenizer:
        tok_path = Path(data_cfg.tokenizer)
        tok = load_tokenizer(tok_path)
        tok_hash = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    else:
        tok_key = hashlib.sha256(f"{corpus_hash}|{data_cfg.val_fraction}|{data_cfg.vocab_size}|"
                                 f"{data_cfg.tokenizer_train_chars}".encode()).hexdigest()[:16]
        tok_path = cache_root / "tokenizers" / tok_key / "tokenizer.json"
        if tok_path.is_file():
            tok = load_tokenizer(tok_path)
        else:
            log(f"training a {data_cfg.vocab_size}-token BPE tokenizer on {len(train_docs)} documents ...")
            tok = train_tokenizer(_sample_texts(train_docs, data_cfg.tokenizer_train_chars), data_cfg.vocab_size)
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tok_path.with_name(f".tokenizer.json.tmp-{os.getpid()}")
            tok.save(str(tmp))
            os.replace(tmp, tok_path)
        tok_hash = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    bos = bos_id(tok, tok_path)
    vocab_size = tok.get_vocab_size()

    shard_key = hashlib.sha256(f"{corpus_hash}|{data_cfg.val_fraction}|{tok_hash}".encode()).hexdigest()[:16]
    shard_dir = cache_root / "shards" / shard_key
    train_path, val_path = shard_dir / "train.bin", shard_dir / "val.bin"
    if not (train_path.is_file() and val_path.is_file()):
        shard_dir.mkdir(parents=True, exist_ok=True)
        for name, split_docs, path in (("train", train_docs, train_path), ("val", val_docs, val_path)):
            log(f"tokenizing the {name} split: {len(split_docs)} documents, "
                f"{sum(len(t) for _, t in split_docs) / 1e6:.1f}M characters ...")
            write_shard(path, tokenize_documents(tok, split_docs, bos), vocab_size)
        (shard_dir / "info.json").write_text(json.dumps({
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokens": {"train": int(read_shard(train_path).size), "val": int(read_shard(val_path).size)},
            "vocab_size": vocab_size, "tokenizer": str(tok_path)}, indent=1))
    n_train, n_val = read_shard(train_path).size, read_shard(val_path).size
    _check_split_sizes(n_train, n_val, data_cfg)
    log(f"data: {n_train / 1e6:.2f}M train / {n_val / 1e6:.2f}M val tokens, vocab {vocab_size} "
        f"({time.time() - t0:.1f}s)")
    return PreparedData(tok, tok_path, train_path, val_path, bos, vocab_size)
