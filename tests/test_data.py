import json
import os

import numpy as np
import pytest
import torch

from moespeed.data.corpus import is_val, load_documents, split_documents, stdlib_documents
from moespeed.config import DataConfig
from moespeed.data.loader import TokenLoader
from moespeed.data.prepare import prepare_data
from moespeed.data.shards import HEADER_BYTES, read_shard, write_shard
from moespeed.data.tokenizer import BOS, bos_id, encode_prompt, load_tokenizer, train_tokenizer
from moespeed.errors import ConfigError, DataError, PromptError


def test_stdlib_corpus_is_real_python_and_split_is_deterministic():
    docs = []
    for doc in stdlib_documents():
        docs.append(doc)
        if len(docs) == 200:
            break
    assert all(name.endswith(".py") for name, _ in docs)
    train, val = split_documents(docs, 0.1)
    assert {n for n, _ in val} == {n for n, _ in docs if is_val(n, 0.1)}
    assert len(train) + len(val) == len(docs) and 0 < len(val) < 60


def test_tokenizer_round_trip_and_bos(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld ✓ 日本語", "class A:\n    pass\n"] * 20
    tok = train_tokenizer(texts, 300)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    tok = load_tokenizer(path)
    assert tok.id_to_token(bos_id(tok)) == BOS
    for text in texts[:3]:
        assert tok.decode(tok.encode(text).ids) == text
    ids = encode_prompt(tok, "def fibonacci(")
    assert ids[0] == bos_id(tok) and tok.decode(ids[1:]) == "def fibonacci("
    with pytest.raises(PromptError, match="empty"):
        encode_prompt(tok, "")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


@pytest.mark.parametrize("vocab, dtype", [(300, np.uint16), (70000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab, 1000)
    write_shard(tmp_path / "s.bin", tokens, vocab)
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype == dtype and np.array_equal(back, tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 1000 * np.dtype(dtype).itemsize
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left


def test_corrupt_shards_are_rejected(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100), 300)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_shard(path)
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(DataError, match="not a moespeed shard"):
        read_shard(path)
    path.write_bytes(b"abc")
    with pytest.raises(DataError, match="too short"):
        read_shard(path)


def _loader(tmp_path, **kw):
    tokens = np.arange(1, 2001) % 50
    tokens[::37] = 0  # BOS every 37 tokens
    write_shard(tmp_path / "t.bin", tokens, 300)
    return TokenLoader(tmp_path / "t.bin", batch_size=4, seq_len=16, bos_id=0, seed=7, **kw)


def test_loader_batches_targets_and_doc_ids(tmp_path):
    tokens, targets, doc_ids = _loader(tmp_path).next_batch()
    assert tokens.shape == targets.shape == doc_ids.shape == (4, 16)
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    assert torch.equal(doc_ids, torch.cumsum(tokens == 0, dim=1))


def test_loader_is_deterministic_resumable_and_rank_disjoint(tmp_path):
    a, b = _loader(tmp_path), _loader(tmp_path)
    first = [a.next_batch()[0] for _ in range(50)]  # crosses epochs (124 windows)
    assert all(torch.equal(x, b.next_batch()[0]) for x in first)
    resumed = _loader(tmp_path)
    replay = _loader(tmp_path)
    for _ in range(20):
        replay.next_batch()
    resumed.load_state_dict(replay.state_dict())
    assert torch.equal(resumed.next_batch()[0], replay.next_batch()[0])
    r0, r1 = _loader(tmp_path, rank=0, world_size=2), _loader(tmp_path, rank=1, world_size=2)
    single = _loader(tmp_path)
    for _ in range(3):
        both = torch.cat([r0.next_batch()[0], r1.next_batch()[0]])
        assert torch.equal(both, torch.cat([single.next_batch()[0], single.next_batch()[0]]))


def test_user_data_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2", None]}), tmp_path / "c.parquet")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "d.md").write_text("in a folder")
    (sub / "e.bin").write_bytes(b"\x00\x01binary")  # binary inside a folder: skipped
    docs = load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet"),
                           str(sub), str(tmp_path / "*.txt")])
    assert [t for _, t in docs] == ["plain text file", "first", "second", "p1", "p2", "in a folder", "plain text file"]


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: [str(p / "missing.txt")], "no such file or folder"),
    (lambda p: [str(p / "*.nothing")], "glob matches no files"),
    (lambda p: ((p / "empty.txt").write_text("  \n"), [str(p / "empty.txt")])[1], "no text documents found"),
    (lambda p: ((p / "x.bin").write_bytes(b"ab\x00cd"), [str(p / "x.bin")])[1], "looks binary"),
    (lambda p: ((p / "l.txt").write_bytes(b"caf\xe9"), [str(p / "l.txt")])[1], "not UTF-8"),
    (lambda p: ((p / "j.jsonl").write_text('{"txt": "x"}\n'), [str(p / "j.jsonl")])[1], "j.jsonl:1: no string field 'text'"),
    (lambda p: ((p / "k.jsonl").write_text('{"text": \n'), [str(p / "k.jsonl")])[1], "k.jsonl:1: invalid JSON"),
    (lambda p: ((p / "e").mkdir(), [str(p / "e")])[1], "folder has no files"),
    (lambda p: ((p / "u.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xff"}\n'), [str(p / "u.jsonl")])[1],
     "u.jsonl:2: not UTF-8 text"),
    (lambda p: ((p / "s.jsonl").write_text('{"text": "ok"}\n{"text": "a \\ud800 b"}\n'), [str(p / "s.jsonl")])[1],
     "s.jsonl:2: field 'text' has an unpaired surrogate escape"),
    (lambda p: ["/dev/null"], "/dev/null: not a regular file or folder"),
    (lambda p: (os.mkfifo(p / "fifo"), [str(p / "fifo")])[1], "fifo: not a regular file or folder"),
])
def test_bad_data_gives_clear_errors(tmp_path, setup, fragment):
    with pytest.raises(DataError) as err:
        load_documents(setup(tmp_path))
    assert fragment in str(err.value)


def _invalid_utf8_strings(pa, *values: bytes):
    """A pyarrow string array holding raw bytes (pyarrow does not check them when building from buffers)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


@pytest.mark.parametrize("columns, fragment", [
    (lambda pa: {"body": ["a", "b"]}, "no column 'text' (it has 'body'): the parquet file needs a string column named text"),
    (lambda pa: {"text": [1, 2]}, "column 'text' holds int64, not strings"),
    (lambda pa: {"text": _invalid_utf8_strings(pa, b"ok", b"caf\xff")}, "row 1 of column 'text' is not UTF-8 text"),
], ids=["no-text-column", "int-column", "not-utf8"])
def test_bad_parquet_gives_clear_errors(tmp_path, columns, fragment):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns(pa)), tmp_path / "x.parquet")
    with pytest.raises(DataError) as err:
        load_documents([str(tmp_path / "x.parquet")])
    assert fragment in str(err.value)


def test_corrupt_parquet_is_rejected(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        load_documents([str(tmp_path / "x.parquet")])


def test_unwritable_cache_dir_is_one_line_before_any_work(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "file").write_text("a file, not a folder")
    cache_dir = tmp_path / "file" / "cache"
    cfg = DataConfig(data=[str(tmp_path / "a.txt")], cache_dir=str(cache_dir))  # one document: would fail later
    with pytest.raises(ConfigError) as err:
        prepare_data(cfg, log=lambda message: None)
    assert str(err.value) == f"data.cache_dir = {cache_dir}: cannot create it (Not a directory): choose a writable folder"


@pytest.mark.parametrize("val_fraction, split, fix", [
    (1e-9, "val", "add data, raise data.val_fraction (now 1e-09) or lower data.seq_len"),  # val = the last document
    (1 - 1e-9, "train", "add data or lower data.seq_len"),  # train = the first document
], ids=["val", "train"])
def test_split_shorter_than_one_sequence_says_how_to_fix_it(tmp_path, val_fraction, split, fix):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    small, large = ("b.txt", "a.txt") if split == "val" else ("a.txt", "b.txt")
    (corpus / small).write_text("x")
    (corpus / large).write_text("def f(x):\n    return x + 1\n" * 50)
    cfg = DataConfig(data=[str(corpus)], vocab_size=300, seq_len=16, val_fraction=val_fraction,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        prepare_data(cfg, log=lambda message: None)
    assert str(err.value).startswith(f"the {split} split has 2 tokens, fewer than one sequence needs "
                                     "(data.seq_len + 1 = 17): ")
    assert str(err.value).endswith(fix)
