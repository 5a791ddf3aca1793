"""DeepSeekMoE layer: vectorized dispatch == per-expert loop, balance losses, bias, capacity, config."""
import copy
import dataclasses
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moespeed.errors import ConfigError
from moespeed.model import moe as moe_mod
from moespeed.model.moe import MoE, MoEConfig, scaled_activation
from helpers import run_interpreted


def make_moe(d_model=16, dispatch="naive_loop", **overrides) -> MoE:
    kw = dict(n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_inter_dim=8,
              activation="swiglu", aux_loss_coef=0.01, seq_aux_loss_coef=0.1, z_loss_coef=0.01)
    kw.update(overrides)
    return MoE(d_model, MoEConfig(dispatch=dispatch, **kw), init_std=0.3)


def with_dispatch(m: MoE, dispatch: str) -> MoE:
    other = copy.deepcopy(m)
    other.cfg = dataclasses.replace(m.cfg, dispatch=dispatch)
    return other


def skew(m: MoE) -> None:
    """Expert 0 gets every token (duplicate ids), the last two experts none."""
    m.expert_bias.zero_()
    m.expert_bias[0] = 10.0
    m.expert_bias[-2:] = -10.0


def run(m: MoE, x: torch.Tensor, dy: torch.Tensor):
    """Output, aux loss, grad of x and of every parameter for loss = <y, dy> + aux."""
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, aux = m(x)
    ((y.float() * dy).sum() + aux).backward()
    return y, aux, x.grad, {n: p.grad for n, p in m.named_parameters()}


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    (ya, auxa, gxa, gpa), (yb, auxb, gxb, gpb) = a, b
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    torch.testing.assert_close(auxa, auxb, rtol=rtol, atol=atol)
    torch.testing.assert_close(gxa, gxb, rtol=rtol, atol=atol)
    assert gpa.keys() == gpb.keys()
    for name in gpa:
        torch.testing.assert_close(gpa[name], gpb[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


VARIANTS = [dict(activation="swiglu", score_func="softmax", norm_topk_prob=True),
            dict(activation="relu2", score_func="sigmoid", norm_topk_prob=False, route_scale=2.5),
            dict(activation="gelu", score_func="softmax", norm_topk_prob=True, n_shared_experts=0)]


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v["activation"])
def test_vectorized_matches_naive_loop(dispatch, variant):
    ref = make_moe(**variant)
    x, dy = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    fast = with_dispatch(ref, dispatch)
    assert_same(run(fast, x, dy), run(ref, x, dy))
    # Skewed: duplicate ids piled on expert 0, experts 4 and 5 receive no token.
    skew(ref)
    fast = with_dispatch(ref, dispatch)
    out_fast, out_ref = run(fast, x, dy), run(ref, x, dy)
    assert_same(out_fast, out_ref)
    counts = fast.route(x.view(-1, 16)).counts
    assert counts[0] == 16 and counts[-2:].sum() == 0
    for name in ("w1", "w2"):
        assert out_fast[3][name][-2:].abs().max() == 0  # unused experts: exactly zero gradient
        assert out_fast[3][name][0].abs().max() > 0
    assert out_fast[3]["gate"].abs().max() > 0  # the router learns through the combine weights


@pytest.mark.parametrize("activation", ["swiglu", "relu2", "gelu"])
def test_scaled_activation_matches_autograd(activation):
    h, g = torch.randn(12, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    scale = torch.rand(12, requires_grad=True)
    g_in = g if activation == "swiglu" else None
    grad = torch.randn(12, 8)
    for s in (scale, None):
        out = scaled_activation(h, g_in, s, activation)
        ref_act = {"swiglu": lambda: F.silu(h) * g, "relu2": lambda: F.relu(h) ** 2,
                   "gelu": lambda: F.gelu(h, approximate="tanh")}[activation]()
        ref = ref_act * s.unsqueeze(-1) if s is not None else ref_act
        inputs = [t for t in (h, g_in, s) if t is not None]
        torch.testing.assert_close(out, ref)
        got = torch.autograd.grad(out, inputs, grad)
        want = torch.autograd.grad(ref, inputs, grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_moe_layer_gradients_match_eager(dtype):
    """Every gradient of a compiled MoE layer (shared + routed experts) equals eager's. On torch 2.11 a
    no-op `.to` at the end of `_ScaledActivation.forward` made the compiled w1 and input gradients zero
    in fp32 (relative error 1.0); bf16 was fine."""
    cfg = MoEConfig(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_inter_dim=16,
                    aux_loss_coef=0.1, dispatch="padded_bmm")
    torch.manual_seed(0)
    eager = MoE(24, cfg).to(dtype)
    compiled = copy.deepcopy(eager)
    x, dy = torch.randn(2, 8, 24, dtype=dtype), torch.randn(2, 8, 24, dtype=dtype)
    grads = []
    for model, run in ((eager, eager), (compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True))):
        xr = x.clone().requires_grad_()
        y, aux = run(xr)
        ((y * dy).sum() + aux).backward()
        grads.append([xr.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(b, a)


def test_bf16_autocast_uses_grouped_mm_and_matches_fp32():
    ref = make_moe()
    fast = with_dispatch(ref, "auto")
    x, dy = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.dispatch_mode(x.view(-1, 16)) == "grouped_mm"
        y, aux, gx, gp = run(fast, x, dy)
    assert y.dtype == torch.bfloat16
    y_ref, _, gx_ref, gp_ref = run(ref, x, dy)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, y_ref) < 2e-2 and rel(gx, gx_ref) < 2e-2
    assert rel(gp["w1"], gp_ref["w1"]) < 2e-2 and rel(gp["w2"], gp_ref["w2"]) < 2e-2


def test_auto_picks_padded_bmm_for_fp32():
    m = make_moe(dispatch="auto")
    assert m.dispatch_mode(torch.randn(4, 16)) == "padded_bmm"


def test_aux_losses_hand_computed():
    m = make_moe(d_model=4, n_routed_experts=4, num_experts_per_tok=1, moe_inter_dim=4,
                 aux_loss_coef=0.01, seq_aux_loss_coef=0.1, z_loss_coef=0.001, dispatch="auto")
    with torch.no_grad():
        m.gate.copy_(torch.eye(4))  # logits = x
    rows = [[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 1.0, 0]]  # experts 0, 1 | 2, 2
    x = torch.tensor(rows).view(2, 2, 4)
    _, aux = m(x)

    def softmax(row):
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    p = [softmax(r) for r in rows]
    f = [0.25, 0.25, 0.5, 0.0]  # 1, 1, 2, 0 of 4 slots
    balance = 4 * sum(f[i] * sum(pr[i] for pr in p) / 4 for i in range(4))
    f0, f1 = [0.5, 0.5, 0, 0], [0, 0, 1.0, 0]
    seq0 = 4 * sum(f0[i] * (p[0][i] + p[1][i]) / 2 for i in range(4))
    seq1 = 4 * sum(f1[i] * (p[2][i] + p[3][i]) / 2 for i in range(4))
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / 4
    want = 0.01 * balance + 0.1 * (seq0 + seq1) / 2 + 0.001 * z
    assert aux.item() == pytest.approx(want, rel=1e-5)
    stats = m.load_stats()
    assert stats["aux_balance"] == pytest.approx(balance, rel=1e-5)
    assert stats["aux_seq"] == pytest.approx((seq0 + seq1) / 2, rel=1e-5)
    assert stats["z_loss"] == pytest.approx(z, rel=1e-5)
    assert stats["expert_share"] == [0.25, 0.25, 0.5, 0.0]
    assert stats["max_over_mean"] == pytest.approx(2.0)


def test_perfectly_balanced_softmax_gives_unit_balance_loss():
    m = make_moe(d_model=8, n_routed_experts=4, num_experts_per_tok=2, aux_loss_coef=1.0,
                 seq_aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.no_grad():
        m.gate.zero_()  # uniform probabilities 1/E
        m.expert_bias.copy_(torch.tensor([0.0, 1e-3, 2e-3, 3e-3]))
    _, aux = m(torch.randn(1, 4, 8))  # every token picks experts 2, 3: f = [0, 0, .5, .5], P = 1/4
    assert aux.item() == pytest.approx(4 * (0.5 * 0.25 + 0.5 * 0.25))


def skewed_router_moe(gamma: float) -> tuple[MoE, torch.Tensor]:
    m = make_moe(d_model=8, n_routed_experts=4, num_experts_per_tok=1, bias_update_speed=gamma,
                 dispatch="auto")
    x = torch.randn(1, 256, 8)
    x[..., 0] += 1.0
    with torch.no_grad():
        m.gate.normal_(std=0.1)
        m.gate[0, 0] = 2.0  # expert 0 favoured by most tokens
    return m.train(), x


def test_bias_update_moves_skewed_router_toward_balance():
    m, x = skewed_router_moe(gamma=0.01)

    def train_steps(n: int) -> float:
        """Imbalance (max/mean) of the load summed over n steps, each followed by a bias update."""
        m.load_stats()  # reset
        with torch.no_grad():
            for _ in range(n):
                m(x)
                m.update_bias()
        return m.load_stats()["max_over_mean"]

    assert train_steps(1) > 3.0
    train_steps(100)
    assert train_steps(20) < 1.4  # sign updates oscillate around balance, balanced on average
    assert m.expert_bias[0] < 0 and m._bias_counts.sum() == 0


def test_bias_update_off_is_noop():
    m, x = skewed_router_moe(gamma=0.0)
    with torch.no_grad():
        m(x)
    m.update_bias()
    assert m.expert_bias.abs().max() == 0


def test_bias_update_uses_all_reduced_counts(monkeypatch):
    m, x = skewed_router_moe(gamma=0.1)
    with torch.no_grad():
        m(x)
    m._bias_counts.copy_(torch.tensor([10, 0, 5, 5]))  # this rank: expert 0 busiest
    other_rank = torch.tensor([0, 30, 5, 5])  # all ranks: expert 1 busiest, mean 15
    monkeypatch.setattr(moe_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(moe_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(moe_mod.dist, "all_reduce", lambda t: t.add_(other_rank))
    m.update_bias()
    torch.testing.assert_close(m.expert_bias, torch.tensor([0.1, -0.1, 0.1, 0.1]))
    assert m._bias_counts.sum() == 0


def test_capacity_drops_copies_beyond_capacity():
    m = make_moe(d_model=8, n_routed_experts=2, n_shared_experts=0, num_experts_per_tok=1,
                 capacity_factor=0.5, dispatch="auto").train()
    m.expert_bias[0] = 10.0  # all 16 tokens pick expert 0; capacity = ceil(0.5 * 16 / 2) = 4
    y, _ = m(torch.randn(2, 8, 8))
    y = y.view(16, 8)
    assert m.capacity(16) == 4
    assert (y[:4].abs().sum(-1) > 0).all()  # the first 4 tokens (token order) are kept
    assert (y[4:] == 0).all()  # the rest are dropped and add nothing
    assert m.load_stats()["drop_frac"] == pytest.approx(12 / 16)


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm"])
def test_capacity_matches_naive_loop(dispatch):
    ref = make_moe(capacity_factor=0.7)
    x, dy = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    ref.expert_bias[0] = 0.5  # uneven enough that some experts overflow
    out_ref = run(ref, x, dy)
    assert ref.route(x.view(-1, 16)).counts.max() > ref.capacity(16)
    assert_same(run(with_dispatch(ref, dispatch), x, dy), out_ref)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm"])
def test_memory_never_scales_with_tokens_times_experts(dispatch):
    n_tokens, n_experts, d_model, hidden = 64, 32, 16, 8
    m = make_moe(d_model=d_model, n_routed_experts=n_experts, moe_inter_dim=hidden, dispatch=dispatch)
    m.expert_bias[0] = 10.0  # also skewed: expert 0 gets all 64 tokens
    x = torch.randn(2, n_tokens // 2, d_model, requires_grad=True)
    with MaxNumel() as probe:
        y, aux = m(x)
        (y.sum() + aux).backward()
    assert probe.largest <= 2 * n_experts * d_model * hidden  # padded_bmm gathers <= 2E expert weights
    assert probe.largest < n_tokens * n_experts * d_model // 2


def test_load_stats_reset():
    m = make_moe().train()
    with torch.no_grad():
        m(torch.randn(2, 8, 16))
    stats = m.load_stats()
    assert stats["tokens_routed"] == 32 and len(stats["expert_share"]) == 6
    assert sum(stats["expert_share"]) == pytest.approx(1.0)
    assert "expert_share" not in m.load_stats()  # counts were reset
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 8, 16))
    assert "expert_share" not in m.load_stats()  # eval forwards are not counted


@pytest.mark.parametrize("key,value,needle", [
    ("num_experts_per_tok", 9, "model.moe.num_experts_per_tok"),
    ("num_experts_per_tok", 0, "model.moe.num_experts_per_tok"),
    ("n_routed_experts", 0, "model.moe.n_routed_experts"),
    ("activation", "tanh", "model.moe.activation"),
    ("score_func", "relu", "model.moe.score_func"),
    ("dispatch", "loop", "model.moe.dispatch"),
    ("capacity_factor", -1.0, "model.moe.capacity_factor"),
    ("bias_update_speed", float("nan"), "model.moe.bias_update_speed"),
    ("route_scale", 0.0, "model.moe.route_scale"),
])
def test_config_validation(key, value, needle):
    cfg = dataclasses.replace(MoEConfig(), **{key: value})
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()
    with pytest.raises(ConfigError):
        MoE(16, cfg)


def test_grouped_mm_on_unaligned_dims_is_a_config_error():
    m = make_moe(d_model=6, dispatch="grouped_mm")  # 6 fp32 = 24 bytes: not a multiple of 16
    with pytest.raises(ConfigError, match="model.moe.dispatch"):
        m(torch.randn(1, 4, 6))


@pytest.mark.gpu
def test_cuda_bf16_grouped_mm_matches_fp32_reference():
    ref = make_moe(d_model=64, n_routed_experts=8, moe_inter_dim=32).cuda()
    fast = with_dispatch(ref, "auto").to(torch.bfloat16)
    x, dy = torch.randn(4, 32, 64, device="cuda"), torch.randn(4, 32, 64, device="cuda")
    xb = x.to(torch.bfloat16)
    assert fast.dispatch_mode(xb.view(-1, 64)) == "grouped_mm"
    with torch.no_grad():  # same (bf16-rounded) weights for the fp32 reference
        for p_ref, p_fast in zip(ref.parameters(), fast.parameters()):
            p_ref.copy_(p_fast.float())
    y, _, gx, gp = run(fast, xb, dy)
    y_ref, _, gx_ref, gp_ref = run(ref, xb.float(), dy)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, y_ref) < 1e-2 and rel(gx, gx_ref) < 1e-2
    for name in gp_ref:
        assert rel(gp[name], gp_ref[name]) < 1e-2, name


# ---------------------------------------------------------------- masked-row EP kernels (interpreter)

_MASKED_ROWS_SCRIPT = '''
import torch
from moespeed.kernels import masked_rows as R
from moespeed.model.moe import _Combine, _Dispatch

g = torch.Generator().manual_seed(0)
cases = [(10, 3, 40, 0.5, True), (10, 3, 40, 0.5, False), (7, 2, 130, 0.0, False), (9, 4, 17, 1.0, True),
         (33, 6, 256, 0.4, False)]  # (tokens, k, D, live fraction, zero_dead): ragged tiles, none / all live
for T, k, D, frac, zero_dead in cases:
    M = T * k
    perm = torch.randperm(M, generator=g)
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(M))
    idx, n_live = perm // k, torch.tensor(int(frac * M))
    live = (torch.arange(M) < n_live).unsqueeze(-1)  # (M, 1)
    x0, w0, dy = torch.randn(T, D, generator=g), torch.randn(M, D, generator=g), torch.randn(T, D, generator=g)
    # the Triton kernels (interpreted) through the autograd functions; dead rows of o are made NaN
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    xs = R.masked_dispatch(x, idx, inv, k, n_live, zero_dead)  # (M, D)
    o = torch.where(live, xs * w, float("nan"))  # an "expert" that is garbage past the live rows
    y = R.masked_combine(o, inv, idx, k, n_live, zero_dead)  # (T, D)
    (y * dy).sum().backward()
    # the unmasked formulation the allgather dispatcher uses without ep_masked_rows
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    xsr = torch.where(live, _Dispatch.apply(xr, idx, inv, k), 0)
    yr = _Combine.apply(torch.where(live, xsr * wr, 0), inv, idx, k)
    (yr * dy).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.where(live, w.grad, 0), wr.grad, rtol=1e-6, atol=1e-6)
    if zero_dead:
        assert torch.equal(xs[~live.squeeze(-1)], torch.zeros_like(xs[~live.squeeze(-1)]))
    xb = x0.bfloat16()  # bf16 rows: copied exactly; sums rounded once
    torch.testing.assert_close(R._masked_gather(xb, idx, n_live, True), R.masked_gather_reference(xb, idx, n_live, True))
    ob = w0.bfloat16()
    torch.testing.assert_close(R._masked_unpermute_sum(ob, inv, k, n_live).float(),
                               R.masked_unpermute_sum_reference(ob.float(), inv, k, n_live), rtol=2**-7, atol=1e-6)
    # (one bf16 ulp: the interpreter truncates fp32 -> bf16 where the GPU rounds)
print("masked rows ok")
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_masked_row_kernels_match_the_unmasked_dispatch_and_combine():
    """The EP masked-row Triton kernels (CPU interpreter), forward and backward through their autograd
    functions, equal the unmasked dispatch/combine with torch.where; dead rows are never read."""
    run_interpreted(_MASKED_ROWS_SCRIPT, "masked rows ok")


def test_masked_row_kernels_compile_for_hopper():
    """The masked-row dispatch and combine kernels compile for an H100 (sm_90) ahead of time, also without a GPU."""
    from helpers import compile_for_hopper
    from moespeed.kernels import masked_rows as R

    for zero_dead in (False, True):
        compile_for_hopper(R._masked_gather_kernel, {"x_ptr": "*bf16", "idx_ptr": "*i64", "n_live_ptr": "*i64",
                                                     "out_ptr": "*bf16"},
                           dict(ZERO_DEAD=zero_dead, BLOCK_R=R._BLOCK_ROWS, BLOCK_D=R._BLOCK_COLS))
    compile_for_hopper(R._masked_sum_kernel, {"o_ptr": "*bf16", "inv_ptr": "*i64", "n_live_ptr": "*i64", "out_ptr": "*bf16"},
                       dict(K=6, BLOCK_T=R._BLOCK_ROWS, BLOCK_D=R._BLOCK_COLS))
