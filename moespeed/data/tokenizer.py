"""Byte-level BPE tokenizer (HF `tokenizers`), with a BOS token that also separates documents."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import DataError, PromptError

BOS = "<|bos|>"
_BOS_CANDIDATES = (BOS, "<|endoftext|>", "<s>", "<bos>", "[BOS]")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (BOS included) on an iterator of texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {str(path)!r} not found: give the path of a tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a generic Exception for malformed files
        raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    bos_id(tok, path)
    return tok


def bos_id(tok: Tokenizer, source: str | Path = "tokenizer") -> int:
    """Id of the BOS/document-separator token (<|bos|>, <|endoftext|>, <s>, ...)."""
    for name in _BOS_CANDIDATES:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    raise DataError(f"{source}: has no BOS/document separator token: add one of {', '.join(_BOS_CANDIDATES)}")


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's tokens; PromptError if it is empty or has characters the tokenizer lacks."""
    if not prompt:
        raise PromptError("the prompt is empty: pass --prompt with some text")
    enc = tok.encode(prompt, add_special_tokens=False)
    unk = tok.model.unk_token if hasattr(tok.model, "unk_token") else None
    if unk is not None and unk in enc.tokens:
        bad = sorted({prompt[s:e] for (s, e), t in zip(enc.offsets, enc.tokens) if t == unk})
        raise PromptError(f"the prompt has characters the tokenizer cannot encode: {''.join(bad)!r}: remove them")
    if not enc.ids:
        raise PromptError("the prompt encodes to no tokens: pass --prompt with some text")
    return [bos_id(tok)] + enc.ids
