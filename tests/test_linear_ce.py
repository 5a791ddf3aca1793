"""Tests for moespeed.kernels.linear_ce: every backend against the fp32 reference, on CPU."""
import importlib.util
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

from moespeed.kernels.linear_ce import (
    _WeightGradAccumulator,
    _addmm_into,
    lean_chunk_size,
    linear_cross_entropy,
    memory_settings,
    reference_linear_cross_entropy,
)
from helpers import run_interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
OPTIONS = [  # (reduction, z_loss, softcap)
    ("mean", 0.0, None),
    ("sum", 0.0, None),
    ("mean", 1e-2, None),
    ("mean", 0.0, 3.0),
    ("sum", 0.1, 2.0),
]


def make_inputs(n=37, d=16, v=101, dtype=torch.float32, ignore_every=5):
    """Random hidden (n, d), weight (v, d) with logits of O(1), targets with some ignored."""
    hidden = torch.randn(n, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) * 2 / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[::ignore_every] = -100
    return hidden, weight, targets


def loss_and_grads(hidden, weight, targets, **kwargs):
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden, weight, targets, **kwargs)
    loss.backward()
    return loss.detach().float(), hidden.grad.float(), weight.grad.float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_reference_matches_torch_cross_entropy():
    hidden, weight, targets = make_inputs()
    logits = hidden.detach() @ weight.detach().t()
    for reduction in ("mean", "sum"):
        ours = reference_linear_cross_entropy(hidden.detach(), weight.detach(), targets,
                                              reduction=reduction)
        torch.testing.assert_close(ours, F.cross_entropy(logits, targets, reduction=reduction))


@pytest.mark.parametrize("reduction,z_loss,softcap", OPTIONS)
def test_chunked_matches_reference_fp32(reduction, z_loss, softcap):
    hidden, weight, targets = make_inputs()
    kw = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
    ref = loss_and_grads(hidden, weight, targets, backend="reference", **kw)
    for chunk in (8, 37, None):  # 8 does not divide 37: a short last chunk
        ours = loss_and_grads(hidden, weight, targets, backend="chunked", chunk_size=chunk, **kw)
        for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), ours, ref):
            assert rel_err(a, b) < 1e-5, (name, chunk, rel_err(a, b))


@pytest.mark.parametrize("accum_dtype", [torch.float32, None])
def test_chunked_bf16_within_tolerance(accum_dtype):
    hidden, weight, targets = make_inputs(n=64, d=32, v=300, dtype=torch.bfloat16, ignore_every=7)
    kw = dict(z_loss=1e-3, softcap=5.0)
    ref = loss_and_grads(hidden, weight, targets, backend="reference", **kw)
    ours = loss_and_grads(hidden, weight, targets, backend="chunked", chunk_size=16,
                          accum_dtype=accum_dtype, **kw)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), ours, ref):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))


@pytest.mark.parametrize("vocab,dim", [(1001, 6), (64, 4), (3, 2), (7, 3)])
def test_weight_grad_accumulator_fp32_inside_bf16_output(vocab, dim):
    """The in-place fp32 -> bf16 scheme equals an fp32 sum cast at the end, bit for bit."""
    chunks = [(torch.randn(9, vocab).bfloat16(), torch.randn(9, dim).bfloat16()) for _ in range(3)]
    acc = _WeightGradAccumulator(vocab, dim, torch.bfloat16, "cpu", fp32=True)
    acc.out.fill_(float("nan"))  # uninitialized memory must never leak through
    if acc.hi is not None:
        acc.hi.fill_(float("nan"))
    expected = torch.full((vocab, dim), float("nan"))
    for i, (g, h) in enumerate(chunks):
        acc.add(g, h)
        _addmm_into(expected, g.t(), h, first=i == 0)
    out = acc.finish()
    assert out.shape == (vocab, dim) and out.dtype == torch.bfloat16
    assert torch.equal(out, expected.bfloat16())


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_not_nan(backend, reduction):
    hidden, weight, _ = make_inputs(n=8)
    targets = torch.full((8,), -100)
    loss, gh, gw = loss_and_grads(hidden, weight, targets, backend=backend, reduction=reduction,
                                  z_loss=0.1)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_grad_output_scales_gradients_and_leading_dims():
    hidden, weight, targets = make_inputs(n=12)
    ref = loss_and_grads(hidden, weight, targets, backend="reference")
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden.view(3, 4, -1), weight, targets.view(3, 4),
                                backend="chunked", chunk_size=5)
    (3.0 * loss).backward()
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(hidden.grad, 3.0 * ref[1])
    torch.testing.assert_close(weight.grad, 3.0 * ref[2])


def test_no_grad_and_frozen_weight():
    hidden, weight, targets = make_inputs()
    ref = loss_and_grads(hidden, weight, targets, backend="reference", z_loss=1e-2)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, backend="chunked", z_loss=1e-2)
    torch.testing.assert_close(loss, ref[0])
    hidden.grad = None
    loss = linear_cross_entropy(hidden, weight.detach(), targets, backend="chunked", z_loss=1e-2)
    loss.backward()
    torch.testing.assert_close(hidden.grad, ref[1])


def test_bad_arguments_raise_value_error():
    hidden, weight, targets = make_inputs(n=4)
    with pytest.raises(ValueError, match="backend='fast' is unknown"):
        linear_cross_entropy(hidden, weight, targets, backend="fast")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="share D"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(hidden, weight, targets[:2])
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, targets, softcap=0.0)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                    reason="liger-kernel is installed")
def test_liger_backend_missing_is_a_clear_error():
    hidden, weight, targets = make_inputs(n=4)
    with pytest.raises(ValueError, match="liger-kernel"):
        linear_cross_entropy(hidden, weight, targets, backend="liger")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled")
    hidden, weight, targets = make_inputs(n=4)
    with pytest.raises(ValueError, match="backend='triton'"):
        linear_cross_entropy(hidden, weight, targets, backend="triton")


def test_torch_compile_chunked_matches_eager():
    hidden, weight, targets = make_inputs(n=20, d=8, v=33)
    kw = dict(backend="chunked", chunk_size=7, z_loss=1e-2, softcap=4.0)
    eager = loss_and_grads(hidden, weight, targets, **kw)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(h, w, t):
        return linear_cross_entropy(h, w, t, **kw) * 2.0

    hidden.grad = weight.grad = None
    step(hidden, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, 2.0 * eager[1])
    torch.testing.assert_close(weight.grad, 2.0 * eager[2])


TRITON_CHECK = textwrap.dedent("""
    import torch
    from moespeed.kernels import linear_ce as m
    torch.manual_seed(0)
    # the softmax kernel alone, against its PyTorch twin, fp32 and bf16 logits
    for dtype in (torch.float32, torch.bfloat16):
        for z, cap in ((0.0, 0.0), (1e-2, 0.0), (0.0, 3.0), (0.1, 2.0)):
            x = (torch.randn(6, 300) * 3).to(dtype)
            t = torch.tensor([0, 5, -100, 299, 17, -100])
            a, b = x.clone(), x.clone()
            la, lb, s = torch.empty(6), torch.empty(6), torch.tensor(0.25)
            m._ce_chunk_triton(a, t, la, s, -100, z, cap, True)
            m._ce_chunk_torch(b, t, lb, s, -100, z, cap, True)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert torch.allclose(la, lb, atol=1e-4), (dtype, z, cap, (la - lb).abs().max())
            assert torch.allclose(a.float(), b.float(), atol=tol), (dtype, z, cap)
    # the whole triton backend against the reference
    h = torch.randn(13, 16, requires_grad=True)
    w = (torch.randn(50, 16) / 2).requires_grad_()
    t = torch.randint(0, 50, (13,)); t[::4] = -100
    for red, z, cap in (("mean", 0.0, None), ("sum", 1e-2, 2.0)):
        out = []
        for backend in ("reference", "triton"):
            h.grad = w.grad = None
            loss = m.linear_cross_entropy(h, w, t, backend=backend, chunk_size=5,
                                          reduction=red, z_loss=z, softcap=cap)
            loss.backward()
            out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        for a, b in zip(*out):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (red, z, cap, (a - b).abs().max())
    # all tokens ignored: 0, not NaN
    t_none = torch.full((13,), -100)
    loss = m.linear_cross_entropy(h, w, t_none, backend="triton")
    assert loss.item() == 0.0
    assert m.triton_works("cpu")
    # backward's scaling kernel: skips g == 1, scales otherwise
    for g in (1.0, -3.0):
        x = torch.randn(5000); y = x.clone()
        m._scale_unless_one_kernel[(2,)](x, torch.tensor(g), x.numel(), BLOCK=4096)
        assert torch.allclose(x, g * y), g
    print("TRITON_OK")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_interpreted_matches_torch():
    """Runs in a subprocess: TRITON_INTERPRET=1 must be set before the kernel is defined."""
    run_interpreted(TRITON_CHECK, "TRITON_OK")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction,z_loss,softcap", OPTIONS)
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_cuda_bf16_matches_reference(backend, reduction, z_loss, softcap):
    """On a GPU: cuBLAS GEMMs, mixed-dtype addmm, the compiled kernel; odd V, short last chunk."""
    torch.manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(5003, 256, device="cuda") / 8).bfloat16().requires_grad_()
    targets = torch.randint(0, 5003, (1000,), device="cuda")
    targets[::9] = -100
    kw = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
    ref = loss_and_grads(hidden, weight, targets, backend="reference", **kw)
    ours = loss_and_grads(hidden, weight, targets, backend=backend, chunk_size=384, **kw)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), ours, ref):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))


def test_lean_chunk_is_liger_chunk_and_memory_modes():
    assert lean_chunk_size(16384, 4096, 131072) == 512  # ceil(V / D) = 32 -> 16384 / 32
    assert lean_chunk_size(16384, 1024, 32768) == 512
    assert lean_chunk_size(100, 64, 1000) == 8  # ceil(100 / 16) = 7 -> next power of two
    assert memory_settings("lean", 16384, 4096, 131072, 2) == (512, None)
    assert memory_settings("fast", 16384, 4096, 131072, 2) == (4096, torch.float32)
    with pytest.raises(ValueError, match="memory='huge'"):
        memory_settings("huge", 8, 8, 8, 2)


def test_model_lean_loss_memory_matches_fast():
    from moespeed.model.transformer import Transformer
    from tests.helpers import tiny_model_config

    tokens = torch.randint(0, 97, (2, 32))  # the tiny vocabulary; lean: 4 chunks of 16 tokens, fast: 1
    results = []
    for memory in ("fast", "lean"):
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(loss_memory=memory))
        loss = model(tokens, tokens)
        loss.backward()
        results.append((loss.detach(), model.head_weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_triton_kernels_compile_for_hopper():
    """The fused CE kernels compile for an H100 (sm_90) ahead of time, also without a GPU, in every
    variant (bf16 and fp32 logits, softcap on and off, forward only or with the gradient)."""
    from helpers import compile_for_hopper
    from moespeed.kernels import linear_ce as L

    for logits in ("*bf16", "*fp32"):
        for softcap in (False, True):
            for grad in (False, True):
                compile_for_hopper(L._ce_rows_kernel, {"logits_ptr": logits, "targets_ptr": "*i64", "row_loss_ptr": "*fp32",
                                                       "scale_ptr": "*fp32", "z_loss": "fp32", "softcap": "fp32"},
                                   dict(HAS_SOFTCAP=softcap, COMPUTE_GRAD=grad, BLOCK_V=4096), num_warps=8)
        compile_for_hopper(L._scale_unless_one_kernel, {"x_ptr": logits, "g_ptr": "*fp32"}, dict(BLOCK=1024))
