"""PEER layer: product-key retrieval, the layer against a naive definition, configs, and the fused
Triton kernel against the reference (run under TRITON_INTERPRET=1 in a subprocess, so the kernels
are interpreted whatever other test modules imported first)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moespeed.errors import ConfigError
from moespeed.model.peer import PEER, PEERConfig, product_key_topk
from moespeed.kernels.peer_triton import HAS_TRITON, activation_fn


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
    H, dq, n, hid, N = cfg.num_heads, cfg.query_dim, cfg.product_key_dim[0], cfg.expert_hidden_size, cfg.num_experts
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


_KERNEL_CHECK = textwrap.dedent("""
    import json, torch
    from moespeed.kernels.peer_triton import peer_experts_reference, peer_experts_triton
    from moespeed.model.peer import PEER, PEERConfig

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    out = {}
    torch.manual_seed(0)
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
def test_triton_kernel_matches_reference_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for act in ("relu2", "gelu"):
        errs = out["mix_" + act]  # y, grad x, grad w, grad down, grad up
        assert all(e < 1e-5 for e in errs), (act, errs)
        assert out["unselected_rows_zero_" + act]
    for name in ("layer_shared", "layer_pools_hidden"):
        errs = out[name]
        assert {"y", "x", "query.weight", "keys", "down", "up", "query_norm.norm.weight"} <= set(errs)
        assert all(e < 1e-5 for e in errs.values()), (name, errs)
