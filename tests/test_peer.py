"""PEER layer: product-key retrieval, the layer against a naive definition, configs, deferred table
gradients with PEERTableOptimizer, and the fused Triton kernels against their references (run under
TRITON_INTERPRET=1 in a subprocess, so the kernels are interpreted whatever other test modules
imported first)."""
import json
import os
import textwrap

import pytest
import torch

from moespeed.errors import ConfigError
from moespeed.model.peer import MAX_PENDING_BACKWARDS, PEER, PEERConfig, PEERTableOptimizer, product_key_topk
from moespeed.kernels.peer_triton import HAS_TRITON, TableGradFactors, activation_fn, table_step_reference
from helpers import run_interpreted


def small_cfg(**kw) -> PEERConfig:
    base = dict(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2,
                query_dim=8, kernel="reference")
    base.update(kw)
    return PEERConfig(**base)


@pytest.mark.parametrize("groups,key_groups", [(3, 1), (3, 3)])
def test_product_key_topk_equals_brute_force(groups, key_groups):
    n, k, dk = 8, 5, 6
    q = torch.randn(4, 7, groups, 2, dk)                      # (B, T, G, 2, dk)
    keys = torch.randn(key_groups, 2, n, dk)
    scores, ids = product_key_topk(q, keys, k)
    # brute force: score all n * n experts, expert i1 * n + i2 scores q1.K1[i1] + q2.K2[i2]
    sim = torch.einsum("btgcd,gcnd->btgcn", q, keys.expand(groups, -1, -1, -1))
    full = (sim[..., 0, :, None] + sim[..., 1, None, :]).flatten(-2)   # (B, T, G, n * n)
    want_scores, want_ids = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)


def naive_peer(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """The layer by definition: score all N experts per head, softmax over the top k, run each
    selected expert as a tiny MLP (hidden neurons = expert_hidden_size) one by one."""
    cfg = layer.cfg
    B, T, D = x.shape
    H, dq, hid, N = cfg.num_heads, cfg.query_dim, cfg.expert_hidden_size, cfg.num_experts
    q = layer.query_norm(layer.query(x).view(B, T, H, dq))
    down = layer.down.view(layer.pools, N, hid, D)
    up = layer.up.view(layer.pools, N, hid, D)
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for head in range(H):
                pool = 0 if cfg.shared_pool else head
                q1, q2 = q[b, t, head, : dq // 2], q[b, t, head, dq // 2:]
                s = (layer.keys[pool, 0] @ q1)[:, None] + (layer.keys[pool, 1] @ q2)[None, :]  # (n, n)
                top, experts = s.flatten().topk(cfg.num_experts_per_tok)
                for g, e in zip(top.softmax(-1), experts):
                    hidden = activation_fn(cfg.activation, down[pool, e] @ x[b, t])      # (hid,)
                    y[b, t] += g * (hidden @ up[pool, e])
    return y


@pytest.mark.parametrize("overrides", [
    {},
    {"shared_pool": False, "expert_hidden_size": 3, "activation": "gelu"},
    {"query_norm": "layernorm", "num_heads": 3},
])
def test_layer_equals_naive_definition(overrides):
    layer = PEER(12, small_cfg(**overrides), init_std=0.3)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x), naive_peer(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"num_experts": 100}, "model.peer.num_experts = 100: must equal the product of model.peer.product_key_dim"),
    ({"product_key_dim": [8, 8, 1], "num_experts": 64}, "model.peer.product_key_dim = [8, 8, 1]: must have exactly 2"),
    ({"product_key_dim": [16, 4]}, "model.peer.product_key_dim = [16, 4]: must be [n, n]"),
    ({"num_experts_per_tok": 9}, "model.peer.num_experts_per_tok = 9"),
    ({"num_heads": 0}, "model.peer.num_heads = 0"),
    ({"expert_hidden_size": 0}, "model.peer.expert_hidden_size = 0"),
    ({"query_dim": 7}, "model.peer.query_dim = 7"),
    ({"query_norm": "groupnorm"}, "model.peer.query_norm = 'groupnorm'"),
    ({"activation": "swish"}, "model.peer.activation = 'swish'"),
    ({"kernel": "cuda"}, "model.peer.kernel = 'cuda'"),
    ({"table_grad": "sparse"}, "model.peer.table_grad = 'sparse'"),
])
def test_invalid_configs_raise_config_error(overrides, message):
    cfg = small_cfg(**overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value).startswith(message)
    with pytest.raises(ConfigError):
        PEER(12, cfg)


def test_defaults_are_valid_and_lists_not_shared():
    a, b = PEERConfig(), PEERConfig()
    a.validate()
    a.product_key_dim.append(1)
    assert b.product_key_dim == [128, 128]


@pytest.mark.parametrize("overrides", [
    {"query_norm": "rmsnorm", "activation": "relu2"},
    {"query_norm": "batchnorm", "activation": "gelu", "shared_pool": False},
    {"query_norm": "layernorm", "expert_hidden_size": 2},
])
def test_forward_backward_smoke(overrides):
    layer = PEER(32, small_cfg(**overrides))
    x = torch.randn(2, 8, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 8, 32) and torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in [("x", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "query_norm.norm.bias":  # layernorm/batchnorm bias: zero-mean-ish grads allowed
            assert p.grad.abs().sum() > 0, name


def test_batchnorm_leaks_future_tokens_rmsnorm_does_not():
    """Why rmsnorm is the causal-LM default: batchnorm's training statistics mix all tokens."""
    x = torch.randn(1, 6, 16)
    x_future = x.clone()
    x_future[0, -1] += 5.0  # change only the last token
    for norm, leaks in (("batchnorm", True), ("rmsnorm", False)):
        layer = PEER(16, small_cfg(query_norm=norm)).train()
        changed = not torch.allclose(layer(x)[0, :-1], layer(x_future)[0, :-1])
        assert changed == leaks, norm


def test_kernel_option_errors_without_triton_device():
    layer = PEER(16, small_cfg(kernel="triton"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ConfigError, match="model.peer.kernel = triton"):
            layer(torch.randn(1, 2, 16))


def _twin_layers(**kw) -> tuple[PEER, PEER]:
    """A dense and a deferred layer (PyTorch path) with the same weights."""
    torch.manual_seed(0)
    dense = PEER(16, small_cfg(**kw), init_std=0.3)
    deferred = PEER(16, small_cfg(table_grad="deferred", **kw))
    deferred.load_state_dict(dense.state_dict())
    return dense, deferred


def test_deferred_sgd_with_accumulation_equals_dense_sgd():
    """Two backwards (gradient accumulation) then a step: PEERTableOptimizer(sgd) on factors moves
    the tables exactly like torch SGD on the dense gradients; all other gradients are the same."""
    dense, deferred = _twin_layers(expert_hidden_size=2, shared_pool=False)
    xs = [torch.randn(2, 5, 16) for _ in range(2)]
    for layer in (dense, deferred):
        for x in xs:
            layer(x).square().sum().backward()
    assert deferred.down.grad is None and deferred.up.grad is None
    assert len(deferred.table_grad.parts) == 2
    for (name, a), b in zip(dense.named_parameters(), deferred.parameters()):
        if name not in ("down", "up"):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch.optim.SGD([dense.down, dense.up], lr=0.1).step()
    opt = PEERTableOptimizer([deferred.down, deferred.up], lr=0.1, algorithm="sgd")
    opt.step()
    assert not deferred.table_grad.parts  # consumed
    torch.testing.assert_close(deferred.down, dense.down, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deferred.up, dense.up, rtol=1e-5, atol=1e-6)


def test_deferred_lazy_adamw_updates_only_selected_rows():
    """Step 1 equals torch AdamW on the selected rows; unselected rows (weights and moments) never
    change; step 2 leaves rows selected only in step 1 alone."""
    dense, deferred = _twin_layers()
    x = torch.randn(1, 3, 16)
    hp = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    dense(x).square().sum().backward()
    deferred(x).square().sum().backward()
    rows = deferred.table_grad.merged()[0].flatten()
    touched = torch.isin(torch.arange(len(deferred.down)), rows)  # selected (their grads may be 0)
    assert 0 < touched.sum() < len(touched)
    opt = PEERTableOptimizer([deferred.down, deferred.up], algorithm="adamw", **hp)
    opt.step()
    for name in ("down", "up"):
        before, after, grad = getattr(dense, name).detach(), getattr(deferred, name).detach(), getattr(dense, name).grad
        sub = before[touched].clone().requires_grad_()
        sub.grad = grad[touched]
        torch.optim.AdamW([sub], **hp).step()
        torch.testing.assert_close(after[touched], sub.detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(after[~touched], before[~touched])
        assert torch.equal(opt.state[getattr(deferred, name)]["exp_avg"][~touched], torch.zeros_like(before[~touched]))
    snapshot = deferred.down.detach().clone()
    deferred(torch.randn(1, 1, 16)).sum().backward()
    selected = torch.isin(torch.arange(len(snapshot)), deferred.table_grad.merged()[0].flatten())
    opt.step()
    assert torch.equal(deferred.down[~selected], snapshot[~selected])
    assert not torch.equal(deferred.down[selected], snapshot[selected])


def test_deferred_training_fits_a_target():
    """The trainer's wiring: AdamW for the rest, PEERTableOptimizer for the tables, zero_grad
    between steps; the loss of a fixed regression falls."""
    torch.manual_seed(0)
    layer = PEER(16, small_cfg(table_grad="deferred"), init_std=0.3)
    tables = [layer.down, layer.up]
    rest = [p for p in layer.parameters() if all(p is not t for t in tables)]
    opts = [torch.optim.AdamW(rest, lr=1e-2), PEERTableOptimizer(tables, lr=3e-2)]
    x, target = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    up0 = layer.up.detach().clone()
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(layer.up, up0) and layer.up.grad is None


def test_table_optimizer_state_dict_round_trip():
    _, layer = _twin_layers()
    opt = PEERTableOptimizer([layer.down, layer.up], lr=0.01)
    layer(torch.randn(1, 4, 16)).sum().backward()
    opt.step()
    again = PEERTableOptimizer([layer.down, layer.up], lr=0.01)
    again.load_state_dict(opt.state_dict())
    assert again.state[layer.up]["step"] == 1
    assert torch.equal(again.state[layer.up]["exp_avg_sq"], opt.state[layer.up]["exp_avg_sq"])


def test_table_optimizer_rejects_bad_params():
    dense, deferred = _twin_layers()
    with pytest.raises(ValueError, match="only the down/up tables"):
        PEERTableOptimizer([dense.down, dense.up])
    with pytest.raises(ValueError, match="both the down and the up table"):
        PEERTableOptimizer([deferred.down])
    with pytest.raises(ValueError, match="algorithm = 'lion'"):
        PEERTableOptimizer([deferred.down, deferred.up], algorithm="lion")


def test_deferred_backwards_without_a_step_raise():
    """Factors that no optimizer consumes would leak memory and leave the tables untrained."""
    _, layer = _twin_layers()
    x = torch.randn(1, 2, 16)
    for _ in range(MAX_PENDING_BACKWARDS):
        layer(x).sum().backward()
    with pytest.raises(RuntimeError, match="PEERTableOptimizer"):
        layer(x)
    PEERTableOptimizer([layer.down, layer.up]).zero_grad()
    layer(x)  # zero_grad dropped the factors


def test_table_grad_factors_dense_sums_repeated_rows():
    """grad_down[r] = sum of coef_down * x over every pair at r (here row 1 twice, row 0 never)."""
    f = TableGradFactors()
    x, dy = torch.randn(2, 3), torch.randn(2, 3)
    f.add(torch.tensor([[1, 2], [1, 1]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
          torch.tensor([[0.5, 0.0], [1.0, 2.0]]), x, dy)
    g_down, g_up = f.dense(3)
    torch.testing.assert_close(g_down, torch.stack([torch.zeros(3), x[0] + 7 * x[1], 2 * x[0]]))
    torch.testing.assert_close(g_up, torch.stack([torch.zeros(3), 0.5 * dy[0] + 3 * dy[1], torch.zeros(3)]))
    table = torch.randn(3, 3)
    updated = table.clone()
    table_step_reference(f, updated, updated.clone(), {}, {"algorithm": "sgd", "lr_down": 1.0, "lr_up": 1.0,
                                                            "wd_down": 0.0, "wd_up": 0.0})
    torch.testing.assert_close(updated, table - g_down)


_KERNEL_CHECK = textwrap.dedent("""
    import json, torch
    from moespeed.kernels.peer_triton import (TableGradFactors, peer_experts_reference, peer_experts_triton,
        peer_table_step, product_key_topk_reference, product_key_topk_triton, table_step_reference)
    from moespeed.model.peer import PEER, PEERConfig

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    out = {}
    torch.manual_seed(0)
    # retrieval: shared / per-head keys, k not a power of 2, n not a multiple of the key block,
    # dk below the dot's minimum; k = n (every sub-key selected)
    for name, (T, H, n, k, dk, pools) in {"pk_shared": (19, 2, 40, 5, 6, 1), "pk_pools": (6, 3, 24, 8, 16, 3),
                                          "pk_k_eq_n": (5, 1, 8, 8, 3, 1)}.items():
        q = torch.randn(T, H, 2, dk, requires_grad=True)
        keys = torch.randn(pools, 2, n, dk, requires_grad=True)
        ds = torch.randn(T, H, k)
        res = []
        for fn in (product_key_topk_triton, product_key_topk_reference):
            scores, ids = fn(q, keys, k)
            res.append((scores, ids, *torch.autograd.grad(scores, (q, keys), ds)))
        out[name] = {"scores": rel(res[0][0], res[1][0]), "ids_equal": bool(torch.equal(res[0][1], res[1][1])),
                     "grad_q": rel(res[0][2], res[1][2]), "grad_keys": rel(res[0][3], res[1][3])}
    # the expert mix alone: repeated rows, a row width that is not a power of two
    T, P, D, R = 7, 6, 40, 11
    for act in ("relu2", "gelu"):
        x = torch.randn(T, D, requires_grad=True)
        rows = torch.randint(0, R, (T, P))
        w = torch.rand(T, P, requires_grad=True)
        down = torch.randn(R, D, requires_grad=True)
        up = torch.randn(R, D, requires_grad=True)
        dy = torch.randn(T, D)
        res = []
        for fn in (peer_experts_triton, peer_experts_reference):
            y = fn(x, rows, w, down, up, act)
            grads = torch.autograd.grad(y, (x, w, down, up), dy)
            res.append((y, *grads))
        out["mix_" + act] = [rel(a, b) for a, b in zip(*res)]
        out["unselected_rows_zero_" + act] = bool(
            (res[0][3][~torch.isin(torch.arange(R), rows)] == 0).all())
        # deferred: same y, grad x, grad w; the factors sum to the dense table gradients
        factors = TableGradFactors()
        y = peer_experts_triton(x, rows, w, down, up, act, factors)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        out["deferred_" + act] = [rel(a, b) for a, b in zip((y, gx, gw, *factors.dense(R)), res[1])]
        # the fused table step vs the reference step on the same factors
        for algorithm in ("sgd", "adamw"):
            hp = {"algorithm": algorithm, "lr_down": 0.1, "lr_up": 0.05, "wd_down": 0.1, "wd_up": 0.0,
                  "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "step": 3}
            after = []
            for step in (peer_table_step, table_step_reference):
                d, u = down.detach().clone(), up.detach().clone()
                states = {k: torch.full((R, D), 0.5) for k in
                          ("exp_avg_down", "exp_avg_sq_down", "exp_avg_up", "exp_avg_sq_up")}
                step(factors, d, u, states, hp)
                after.append((d - down, u - up, *states.values()))
            out[f"step_{algorithm}_{act}"] = [rel(a, b) for a, b in zip(*after)]  # updates, moments
    # the whole layer: gradients reach the query projection, keys and norm through the scores
    for name, kw in (("layer_shared", {}),
                     ("layer_pools_hidden", {"shared_pool": False, "expert_hidden_size": 2})):
        cfg = dict(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2,
                   query_dim=8, **kw)
        torch.manual_seed(1)
        fast = PEER(24, PEERConfig(kernel="triton", **cfg), init_std=0.3)
        ref = PEER(24, PEERConfig(kernel="reference", **cfg))
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(2, 5, 24)
        dy = torch.randn(2, 5, 24)
        res = []
        for layer in (fast, ref):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            params = [xi] + list(layer.parameters())
            res.append((y, *torch.autograd.grad(y, params, dy)))
        names = ["y", "x"] + [n for n, _ in fast.named_parameters()]
        out[name] = dict(zip(names, (rel(a, b) for a, b in zip(*res))))
    print(json.dumps(out))
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_kernels_match_references_interpreted():
    stdout = run_interpreted(_KERNEL_CHECK, '"pk_shared"')
    out = json.loads(stdout.strip().splitlines()[-1])
    for name in ("pk_shared", "pk_pools", "pk_k_eq_n"):
        res = out[name]
        assert res.pop("ids_equal"), name
        assert all(e < 1e-5 for e in res.values()), (name, res)
    for act in ("relu2", "gelu"):
        for key in ("mix_", "deferred_"):  # y, grad x, grad w, grad down, grad up
            errs = out[key + act]
            assert len(errs) == 5 and all(e < 1e-5 for e in errs), (key, act, errs)
        assert out["unselected_rows_zero_" + act]
        for algorithm in ("sgd", "adamw"):  # the two tables' updates and the four moments
            errs = out[f"step_{algorithm}_{act}"]
            assert len(errs) == 6 and all(e < 1e-5 for e in errs), (algorithm, act, errs)
    for name in ("layer_shared", "layer_pools_hidden"):
        errs = out[name]
        assert {"y", "x", "query.weight", "keys", "down", "up", "query_norm.norm.weight"} <= set(errs)
        assert all(e < 1e-5 for e in errs.values()), (name, errs)


def test_triton_kernels_compile_for_hopper():
    """Every PEER kernel compiles for an H100 (sm_90) ahead of time, also without a GPU, in the variants
    the launchers use (shared or per-head keys, both activations, dense or deferred table grads, the
    three row-sum modes), with one tile config each (the GPU autotunes over more)."""
    from helpers import compile_for_hopper
    from moespeed.kernels import peer_triton as K

    fp32, bf16, i64 = "*fp32", "*bf16", "*i64"
    for shared in (True, False):
        compile_for_hopper(K._pk_topk_kernel, {"q_ptr": bf16, "key_ptr": bf16, "score_ptr": fp32, "id_ptr": i64},
                           dict(K=16, SHARED=shared, BLOCK_M=32, BLOCK_N=64, BLOCK_DK=64, KP=16), num_warps=4)
        compile_for_hopper(K._pk_bwd_q_kernel, {"ds_ptr": fp32, "id_ptr": i64, "key_ptr": bf16, "dq_ptr": fp32},
                           dict(SHARED=shared, BLOCK_M=32, BLOCK_DK=64, KP=16), num_warps=4)
    compile_for_hopper(K._pk_bwd_keys_kernel, {"ds_ptr": fp32, "q_ptr": fp32, "order_ptr": i64, "offsets_ptr": "*i32",
                                               "dkey_ptr": fp32}, dict(BLOCK_E=32, BLOCK_DK=64), num_warps=4)
    table = {"down_ptr": fp32, "up_ptr": fp32, "rows_ptr": i64, "w_ptr": fp32}
    for act in (0, 1):
        compile_for_hopper(K._peer_fwd_kernel, {**table, "x_ptr": bf16, "y_ptr": bf16, "h_ptr": fp32},
                           dict(ACT=act, BLOCK_P=4, BLOCK_D=512), num_warps=4)
        for dense in (True, False):
            compile_for_hopper(K._peer_bwd_pairs_kernel, {"dy_ptr": bf16, "w_ptr": fp32, "h_ptr": fp32, "up_ptr": fp32,
                                                          "order_ptr": i64, "offsets_ptr": "*i32", "gw_ptr": fp32,
                                                          "gh_ptr": fp32, "gup_ptr": fp32},
                               dict(ACT=act, DENSE=dense, BLOCK_R=2, BLOCK_D=512), num_warps=4)
    compile_for_hopper(K._peer_bwd_x_kernel, {"gh_ptr": fp32, "rows_ptr": i64, "down_ptr": fp32, "gx_ptr": bf16},
                       dict(BLOCK_P=4, BLOCK_D=512), num_warps=4)
    floats = {name: "fp32" for name in ("lr", "wd", "beta1", "beta2", "eps", "bc1", "bc2")}
    for mode in (0, 1, 2):
        compile_for_hopper(K._peer_rows_sum_kernel, {"src_ptr": bf16, "coef_ptr": fp32, "order_ptr": i64,
                                                     "offsets_ptr": "*i32", "tab_ptr": fp32, "m_ptr": fp32,
                                                     "v_ptr": fp32, **floats},
                           dict(MODE=mode, BLOCK_R=2, BLOCK_D=512), num_warps=4)
