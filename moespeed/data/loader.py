"""Packed batches from a token shard: tokens, next-token targets and document ids, all (B, T).

The shard is cut into windows of T + 1 tokens at stride T. Each epoch visits the windows in an
order drawn from (seed, epoch), so batches are deterministic for a seed. The state is one integer,
the number of windows consumed by all ranks; rank r of w takes windows [pos + r*B, pos + (r+1)*B),
so ranks read disjoint data and a checkpoint's state resumes every rank exactly.
Document ids count the BOS tokens up to and including each position: a BOS starts a new document.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .shards import read_shard


class TokenLoader:
    def __init__(self, shard_path, batch_size: int, seq_len: int, bos_id: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.shard_path, self.tokens = shard_path, read_shard(shard_path)
        self.batch_size, self.seq_len, self.bos_id = batch_size, seq_len, bos_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.n_windows = (self.tokens.size - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"{shard_path}: {self.tokens.size} tokens, fewer than data.seq_len + 1 = {seq_len + 1}: "
                            "give more data or lower data.seq_len")
        self.position = 0
        self._order_epoch, self._order = -1, None

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def _window_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def _window_ids(self, start: int, count: int) -> list[int]:
        ids = []
        for g in range(start, start + count):
            epoch, offset = divmod(g, self.n_windows)
            ids.append(int(self._window_order(epoch)[offset]))
        return ids

    def next_batch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, targets, doc_ids), each (B, T) int64, on `device` (default: CPU).

        On CUDA the batch travels as one (B, T + 1) copy from pinned memory, asynchronous, so the host
        does not wait for the GPU to finish queued work (a copy from pageable memory would), and the
        slicing and document ids are computed on the GPU.
        """
        B, T = self.batch_size, self.seq_len
        first = self.position + self.rank * B
        windows = np.stack([self.tokens[w * T: w * T + T + 1] for w in self._window_ids(first, B)])
        self.position += B * self.world_size
        windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
        if device is not None and torch.device(device).type == "cuda":
            windows = windows.pin_memory().to(device, non_blocking=True)
        elif device is not None:
            windows = windows.to(device)
        tokens, targets = windows[:, :-1], windows[:, 1:]
        doc_ids = torch.cumsum(tokens == self.bos_id, dim=1)  # (B, T)
        return tokens, targets, doc_ids

    def __iter__(self):
        while True:
            yield self.next_batch()


VAL_SAMPLE_SEED = 0  # the val windows' order: one fixed permutation, so every evaluation sees the same batches


def val_loader(shard_path, batch_size: int, seq_len: int, bos_id: int, rank: int = 0,
               world_size: int = 1) -> TokenLoader:
    """The loader evaluations read: its first N batches are a fixed random sample of windows from
    the whole val split (the first windows in file order would all come from its first documents)."""
    return TokenLoader(shard_path, batch_size, seq_len, bos_id, seed=VAL_SAMPLE_SEED, shuffle=True,
                       rank=rank, world_size=world_size)
