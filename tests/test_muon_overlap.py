"""Muon under the backward pass (train.muon_overlap): same parameters as the plain step, buckets launched
during the last backward only, clipping that leaves Muon's grads alone, one process only."""
import contextlib
import copy

import pytest
import torch

from moespeed.config import TrainConfig
from moespeed.model.transformer import Transformer
from moespeed.optim.build import build_optimizer
from moespeed.optim.muon import Muon
from moespeed.optim.overlap import MuonOverlap
from moespeed.train.distributed import DistEnv, Parallel

from helpers import tiny_model_config


def _model(device="cpu", **overrides):
    torch.manual_seed(0)
    cfg = tiny_model_config(n_layers=3, **overrides)
    return Transformer(cfg).to(device)


def _train(model, overlap: bool, steps: int = 3, grad_accum: int = 2, grad_clip: float = 0.0):
    """`steps` optimizer steps on fixed random batches, the trainer's order of calls."""
    tc = TrainConfig(optimizer="muon", muon_overlap=overlap, lr=1e-2, grad_clip=grad_clip)
    par = Parallel(model, tc, DistEnv(device=next(model.parameters()).device))
    optimizer, summary = par.build_optimizer(tc)
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    for _ in range(steps):
        for micro in range(grad_accum):
            tokens = torch.randint(0, 97, (2, 17), generator=g).to(device)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            if micro == grad_accum - 1:
                optimizer.before_last_backward()
            (loss / grad_accum).backward()
        if grad_clip:
            par.clip_grad_norm(grad_clip, optimizer.unclipped_params())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, summary


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_overlapped_steps_equal_the_plain_step(ffn):
    plain = _model(ffn_pattern=ffn, first_k_dense=0)
    overlapped = copy.deepcopy(plain)
    _train(plain, overlap=False)
    optimizer, summary = _train(overlapped, overlap=True)
    assert optimizer.overlap is not None and len(optimizer.overlap.buckets) == 3  # one per block
    assert "under the backward pass" in summary
    for (name, a), b in zip(plain.named_parameters(), overlapped.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_overlapped_steps_on_side_streams_match_the_plain_step():
    """On CUDA the buckets' NS runs on side streams during the backward: the same params, within
    bf16 rounding of the updates (the batches of NS calls differ)."""
    plain = _model("cuda", ffn_pattern="moe", first_k_dense=1)
    overlapped = copy.deepcopy(plain)
    start = [p.detach().clone() for p in plain.parameters()]
    _train(plain, overlap=False)
    _train(overlapped, overlap=True)
    for (name, a), b, p0 in zip(plain.named_parameters(), overlapped.parameters(), start):
        assert torch.isfinite(b).all(), name
        change = (a - p0).abs().max().item()
        torch.testing.assert_close(b - p0, a - p0, rtol=0, atol=0.05 * change + 1e-6, msg=name)


def test_buckets_start_during_the_last_backward_last_block_first(monkeypatch):
    model = _model()
    tc = TrainConfig(optimizer="muon", muon_overlap=True)
    optimizer, _ = build_optimizer(model, tc)
    overlap = optimizer.overlap
    calls = []  # (params of the call, join, backward still running)
    in_backward = [False]
    real = Muon.step

    def recording(self, closure=None, params=None, join=True):
        calls.append((None if params is None else [id(p) for p in params], join, in_backward[0]))
        return real(self, closure, params=params, join=join)

    monkeypatch.setattr(Muon, "step", recording)
    block_ids = [[id(p) for p in b] for b in overlap.buckets]
    tokens = torch.randint(0, 97, (2, 17))
    model(tokens[:, :-1], tokens[:, 1:]).backward()  # an earlier micro-batch: nothing starts
    assert calls == []
    optimizer.before_last_backward()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    in_backward[0] = True
    loss.backward()
    in_backward[0] = False
    assert [c[0] for c in calls] == block_ids[::-1]  # the last block's gradients arrive first
    assert all(not join and running for _, join, running in calls)
    optimizer.step()
    assert len(calls) == len(block_ids)  # every Muon param is in a block: nothing left for step()
    # after a step, the next backward is not armed
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert len(calls) == len(block_ids)


def test_step_takes_what_the_backward_did_not_launch(monkeypatch):
    model = _model()
    muon = build_optimizer(model, TrainConfig(optimizer="muon"))[0].optimizers["muon"]
    blocks = [list(block.parameters()) for block in model.blocks]
    overlap = MuonOverlap(muon, blocks[1:])  # block 0's params are in no bucket
    calls = []
    real = Muon.step
    monkeypatch.setattr(Muon, "step", lambda self, closure=None, params=None, join=True: (
        calls.append((None if params is None else {id(p) for p in params}, join)),
        real(self, closure, params=params, join=join))[1])
    tokens = torch.randint(0, 97, (2, 17))
    overlap.arm()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert len(calls) == 2
    overlap.step()
    owned = {id(p) for g in muon.param_groups for p in g["params"]}
    assert calls[-1] == ({id(p) for p in blocks[0]} & owned, False)
    calls.clear()
    overlap.step()  # not armed: one plain step of everything
    assert calls == [(None, False)]
    overlap.remove()
    overlap.arm()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert calls == [(None, False)]  # no hooks any more


class _FakeStream:
    """Stands in for torch.cuda.Stream on CPU: records waits in a shared log."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


def test_join_false_leaves_the_current_stream_free_until_join(monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(4, 8, 16))]
    for p in params:
        p.grad = torch.randn_like(p)
    log = []
    streams = [_FakeStream(k, log) for k in range(2)]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream("current", log))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    opt = Muon(params, lr=0.02, streams=2)
    monkeypatch.setattr(opt, "_streams_for", lambda plan, world: streams)
    opt.step(params=params[:1], join=False)
    opt.step(params=params[1:], join=False)
    assert log == [("wait", 0, "current"), ("wait", 1, "current")] * 2  # each launch waits for the grads
    log.clear()
    opt.join()
    assert log == [("wait", "current", 0), ("wait", "current", 1)]
    log.clear()
    opt.join()  # nothing left to wait for
    assert log == []
    opt.step()  # join=True: the current stream waits at the end
    assert log[-2:] == [("wait", "current", 0), ("wait", "current", 1)]


def test_a_second_gradient_after_the_launch_raises():
    model = _model()
    optimizer, _ = build_optimizer(model, TrainConfig(optimizer="muon", muon_overlap=True))
    tokens = torch.randint(0, 97, (2, 17))
    optimizer.before_last_backward()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    with pytest.raises(RuntimeError, match="second gradient"):
        model(tokens[:, :-1], tokens[:, 1:]).backward()


def test_clipping_counts_muon_grads_but_scales_only_the_others():
    model = _model()
    tc = TrainConfig(optimizer="muon", muon_overlap=True)
    par = Parallel(model, tc, DistEnv())
    optimizer, _ = par.build_optimizer(tc)
    tokens = torch.randint(0, 97, (2, 17))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    before = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before.values()]))
    unclipped = optimizer.unclipped_params()
    assert unclipped == {id(p) for g in optimizer.optimizers["muon"].param_groups for p in g["params"]}
    total = par.clip_grad_norm(norm.item() / 4, unclipped)
    torch.testing.assert_close(total, norm)
    for p in model.parameters():
        if p.grad is None:
            continue
        scale = 1.0 if id(p) in unclipped else 0.25
        torch.testing.assert_close(p.grad, before[id(p)] * scale, rtol=1e-4, atol=1e-7)


def test_overlap_is_off_with_several_processes_and_without_muon():
    model = _model()
    optimizer, summary = build_optimizer(model, TrainConfig(optimizer="muon", muon_overlap=True), single_process=False)
    assert optimizer.overlap is None and "ignored: one process only" in summary
    assert optimizer.unclipped_params() == set()
    optimizer, _ = build_optimizer(model, TrainConfig(optimizer="adamw", muon_overlap=True))
    assert optimizer.overlap is None
