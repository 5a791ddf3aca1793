"""train.muon_cuda_graph: Muon's step captured once and replayed while params and buffers keep their
addresses, each step's grads and lr read from GPU tables; on a CPU with the CUDA graph faked (the
replay re-runs the captured step with decoy grads on the params), on a GPU for real."""
import pytest
import torch

from moespeed.optim.muon import Muon

from helpers import run_interpreted

_FAKE_GRAPH_SCRIPT = r'''
import contextlib
import torch
from moespeed.kernels import muon_triton
from moespeed.optim import muon_graph
from moespeed.optim.muon import Muon

captured_tables = []  # the launch tables the captured kernels read
real_launch_runs = muon_triton._launch_runs


def launch_runs(*lists):
    runs = real_launch_runs(*lists)
    if capturing:
        captured_tables.extend(table for _, _, table in runs)
    return runs


muon_triton._launch_runs, capturing = launch_runs, False


class FakeGraph:
    """Replays by re-running the captured step (a CUDA graph re-runs its kernels on the same addresses).
    A capture runs nothing: what the step did to the params and momentum buffers is undone at its end."""

    def capture_begin(self, **kwargs):
        global capturing
        log.append("capture")
        capturing = True
        captured_tables.clear()
        self.tensors = graphed + [state["momentum_buffer"] for state in opt.state.values()]
        self.saved = [t.detach().clone() for t in self.tensors]

    def capture_end(self):
        global capturing
        capturing = False
        with torch.no_grad():
            for t, saved in zip(self.tensors, self.saved):
                t.copy_(saved)

    def replay(self):
        """The captured kernels find the grads through the table alone: here the params hold decoys."""
        real = [p.grad for p in graphed]
        for p in graphed:
            p.grad = torch.full_like(p, float("nan"))
        step_graph.live = True
        try:
            self.run()
        finally:
            step_graph.live = False
            for p, grad in zip(graphed, real):
                p.grad = grad


class FakeStream:
    def wait_stream(self, other):
        pass


class FakeEvent:
    def record(self):
        pass

    def synchronize(self):
        pass


torch.cuda.CUDAGraph, torch.cuda.Event, torch.cuda.Stream = FakeGraph, FakeEvent, FakeStream
torch.cuda.current_stream, torch.cuda.stream = FakeStream, lambda stream: contextlib.nullcontext()
muon_graph.StepGraph.applies = staticmethod(lambda plan, world, fused_on: True)
log = []

torch.manual_seed(0)
shapes = SHAPES
start = [torch.randn(s) for s in shapes]
plain = [torch.nn.Parameter(t.clone()) for t in start]
graphed = [torch.nn.Parameter(t.clone()) for t in start]
ref = Muon(plain, lr=0.02, weight_decay=0.1, fused=True, pad_flops=PAD_FLOPS)
opt = Muon(graphed, lr=0.02, weight_decay=0.1, fused=True, cuda_graph=True, pad_flops=PAD_FLOPS)
step_graph = opt._graph
real_step = step_graph.step


def step(plan, state, scalars, run):  # hand the captured step to the fake graph
    FakeGraph.run = staticmethod(run)
    return real_step(plan, state, scalars, run)


step_graph.step = step
for p in plain + graphed:
    p.grad = torch.zeros_like(p)
kinds = []
for k in range(9):
    lr = 0.02 * (1 - k / 10)  # a new lr every step: replays must read it from the table
    for group in ref.param_groups + opt.param_groups:
        group["lr"] = lr
    g = torch.Generator().manual_seed(k)
    grads = [torch.randn(s, generator=g) for s in shapes]
    for p, grad in zip(plain, grads):
        p.grad.copy_(grad)
    for p, grad in zip(graphed, grads):  # new grads at new addresses every step, as after zero_grad(None)
        p.grad = grad.clone()
    if k == 6:  # a momentum buffer moves: no replay of the old graph, eager steps, then a new capture
        state = opt.state[graphed[1]]
        state["momentum_buffer"] = state["momentum_buffer"].clone()
    before = (step_graph.captures, step_graph.replays)
    ref.step()
    opt.step()
    kinds.append("replay" if step_graph.replays > before[1] else "capture" if step_graph.captures > before[0] else "eager")
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
# step 0 makes the momentum buffers (a new signature), two more eager steps, then the capture
assert kinds == ["eager", "eager", "eager", "capture", "replay", "replay", "eager", "eager", "capture"], kinds
assert step_graph.captures == 2 and log == ["capture", "capture"]
assert step_graph.coefs.gpu.shape == (len({s[-2:] for s in shapes}), 2)  # (group, block shape) keys
assert step_graph.grads.gpu.shape == (len(shapes),)  # one grad offset per param
assert len(opt._block_classes(False)) == CLASSES
# the graph holds every launch table its capture read: the cache may drop them while it replays
assert captured_tables and {id(t) for t in captured_tables} <= {id(t) for t in step_graph._held}
print("graph ok")
'''


@pytest.mark.parametrize("shapes, pad_flops, classes", [
    ([(16, 24), (24, 16), (3, 16, 24), (8, 8)], 0, 2),  # (24, 16) stored transposed with (16, 24)
    # zero-padded classes: (12, 24) and (16, 24) blocks in one class of (16, 24), also transposed ones
    ([(12, 24), (16, 24), (24, 12), (2, 12, 24), (8, 8)], 10**9, 2),
])
def test_graphed_steps_follow_moving_grads_and_the_lr_and_recapture_when_a_buffer_moves(shapes, pad_flops, classes):
    script = _FAKE_GRAPH_SCRIPT.replace("SHAPES", repr(shapes)).replace("PAD_FLOPS", repr(pad_flops))
    run_interpreted(script.replace("CLASSES", str(classes)), "graph ok")


def test_cuda_graph_is_ignored_on_cpu():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(2)]
    opt = Muon(params, lr=0.02, cuda_graph=True)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._graph.captures == 0 and opt._graph.coefs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ns_gemm", ["torch", "tma"])  # tma: host-side TMA descriptors captured in the graph
def test_cuda_graphed_steps_match_eager_steps(ns_gemm):
    torch.manual_seed(0)
    shapes = [(256, 768), (768, 256), (8, 256, 768), (8, 768, 256), (384, 768), (64, 64)]
    start = [torch.randn(s, device="cuda") for s in shapes]
    eager = [torch.nn.Parameter(t.clone()) for t in start]
    graphed = [torch.nn.Parameter(t.clone()) for t in start]
    ref = Muon(eager, lr=0.02, momentum_dtype=torch.bfloat16, ns_gemm=ns_gemm)
    opt = Muon(graphed, lr=0.02, momentum_dtype=torch.bfloat16, cuda_graph=True, ns_gemm=ns_gemm)
    for k in range(8):
        for group in ref.param_groups + opt.param_groups:
            group["lr"] = 0.02 * (1 - k / 10)
        g = torch.Generator(device="cuda").manual_seed(k)
        held = [b.grad for b in graphed]  # alive until the new grads exist: those land elsewhere
        for a, b in zip(eager, graphed):  # new grads at new addresses every step, as after zero_grad(None)
            grad = torch.randn(a.shape, device="cuda", generator=g)
            a.grad = grad.clone()
            b.grad = grad.clone()
        assert k == 0 or all(b.grad.data_ptr() != old.data_ptr() for b, old in zip(graphed, held))
        del held, grad
        ref.step()
        opt.step()
    torch.cuda.synchronize()
    assert opt._graph.captures == 1 and opt._graph.replays == 8 - 4  # eager steps 0-2, captured at step 3
    for a, b, p0 in zip(eager, graphed, start):
        change = (a - p0).abs().max().item()
        torch.testing.assert_close(b - p0, a - p0, rtol=0, atol=1e-3 * change)
