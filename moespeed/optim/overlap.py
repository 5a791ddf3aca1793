"""Muon under the backward pass (`train.muon_overlap`): a block's Muon step starts as soon as the last
micro-batch's backward has produced all of that block's gradients.

Why: on one GPU, Muon's Newton–Schulz work is a fixed cost per optimizer step (H200, `small-moe`:
~6.9 ms after a 74.5 ms forward+backward). The backward pass runs the blocks last to first, so
once block i's gradients exist, block i's momentum, NS and update can run on Muon's side streams
while the current stream goes on with the backward of blocks i-1 .. 0. Only the first block's
step (the last gradients to arrive), the params outside blocks, and the GPU time the two streams
take from each other stay exposed.

How: a post-accumulate-grad hook on every Muon param ticks off, per bucket (the Muon params of one
transformer block), the params whose gradient has arrived since `arm()`. When a bucket is complete
its step is launched with `Muon.step(params=bucket, join=False)`: side streams wait for the
current stream (the gradients are final there), and the current stream does not wait for them.
`step()`, called where `Muon.step()` would be, steps what did not complete (params outside the
buckets, buckets with a param that got no gradient) and then makes the current stream wait for the
side streams: from there on, everything is ordered as after a plain `Muon.step()`.

Same update as `Muon.step()` after the backward, with two conditions:
  * Gradient clipping: the global norm is only known after the whole backward, when Muon has
    already consumed its gradients, so Muon's params are not clipped (their orthogonalized update
    depends on the gradient's scale only through the momentum mix; modded-nanogpt's Muon runs
    unclipped). The AdamW params are clipped with the global norm of all gradients, as before.
  * Each Muon param gets one gradient per backward (true of transformer blocks, compiled or not).
    A second one after its bucket was launched raises, rather than being silently lost.
One process only: under DDP/FSDP the hooks fire before the gradients are reduced.
On CPU (no side streams) a bucket's step runs inside the hook: the same numbers, no overlap.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .muon import Muon


class MuonOverlap:
    """Steps `muon`'s params bucket by bucket during the last micro-batch's backward.

    buckets: lists of `muon`'s params, one per transformer block (a param in no bucket is stepped by
    `step()`). Call `arm()` before the backward of the last micro-batch, `step()` instead of
    `muon.step()` after it. Without `arm()` (earlier micro-batches, eval) the hooks do nothing.
    """

    def __init__(self, muon: Muon, buckets: list[list[Tensor]]) -> None:
        self.muon = muon
        owned = {id(p) for group in muon.param_groups for p in group["params"]}
        self.buckets = [[p for p in bucket if id(p) in owned] for bucket in buckets]
        self.buckets = [bucket for bucket in self.buckets if bucket]
        self._bucket_of = {id(p): k for k, bucket in enumerate(self.buckets) for p in bucket}
        self.params = [p for group in muon.param_groups for p in group["params"]]
        self.armed = False
        self._waiting: list[set[int]] = []  # per bucket: ids of params whose gradient has not arrived
        self._launched: list[bool] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for p in self.params if id(p) in self._bucket_of]

    def arm(self) -> None:
        """The next backward is the step's last: launch each bucket once its gradients are final."""
        self._waiting = [{id(p) for p in bucket} for bucket in self.buckets]
        self._launched = [False] * len(self.buckets)
        self.armed = True

    def _on_grad(self, p: Tensor) -> None:
        if not self.armed:
            return
        k = self._bucket_of[id(p)]
        if self._launched[k]:
            raise RuntimeError(f"train.muon_overlap: a param of shape {tuple(p.shape)} got a second gradient in one "
                               "backward after its block's Muon step started: set train.muon_overlap = false")
        self._waiting[k].discard(id(p))
        if not self._waiting[k]:
            self._launched[k] = True
            self.muon.step(params=self.buckets[k], join=False)

    def step(self) -> None:
        """Step what the backward did not launch, then order the side streams before what follows."""
        if self.armed:
            launched = {id(p) for k, bucket in enumerate(self.buckets) if self._launched[k] for p in bucket}
            rest = [p for p in self.params if id(p) not in launched]
        else:  # never armed: a plain step
            rest = self.params
        self.armed = False
        if rest:
            self.muon.step(params=None if len(rest) == len(self.params) else rest, join=False)
        self.muon.join()

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
