"""Attention: masks (block-sparse vs dense), FlexAttention vs SDPA, ALiBi, every attention type's
causality, cached decoding, parameter counts and config errors.

torch refuses FlexAttention's backward on CPU, but its eager (math) implementation is
differentiable: the gradient tests lift that guard (monkeypatch) to check our masks and score_mod
through the same operator the CUDA kernel compiles. The CPU forward never looks at the block
structure, so the block masks are checked separately against the dense mask, tile by tile.
"""

import textwrap

import pytest
import torch

from moespeed import Transformer
from moespeed import config as C
from moespeed.errors import ConfigError
from moespeed.kernels import decode_attention as decode_kernels
from moespeed.model import masks
from moespeed.model.attention import AttentionContext
from moespeed.model.transformer import attention_param_count

from helpers import run_interpreted, tiny_model_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TYPES = {"mla": {}, "mha": {}, "gqa": dict(n_heads=4, n_kv_heads=2), "mqa": {}}


def random_doc_ids(B: int, T: int, p_new: float = 0.15) -> torch.Tensor:
    """(B, T) non-decreasing document ids with random lengths (like the loader's)."""
    return torch.cumsum(torch.rand(B, T) < p_new, dim=1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def model_for(kind: str, **overrides) -> Transformer:
    model = Transformer(tiny_model_config(attention=kind, **{**TYPES[kind], **overrides})).eval()
    for p in model.parameters():  # larger weights than init, so attention is far from uniform
        p.data.normal_(0, 0.3)
    return model


# ---------------------------------------------------------------------------------------- masks
def test_dense_mask_follows_the_rule():
    doc_ids = random_doc_ids(2, 14, 0.3)
    got = masks.dense_mask(doc_ids, torch.tensor(4), 14, torch.device("cpu"))
    for b in range(2):
        for q in range(14):
            for kv in range(14):
                expected = kv <= q and doc_ids[b, q] == doc_ids[b, kv] and q - kv < 4
                assert bool(got[b, 0, q, kv]) == expected


def tiles(counts, indices, n):
    """(B, n, n) bool tiles from a BlockMask's (B, 1, n) counts and (B, 1, n, n) indices."""
    B = counts.shape[0]
    out = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            out[b, i, indices[b, 0, i, : counts[b, 0, i]].long()] = True
    return out


@pytest.mark.parametrize("T, block, window, docs", [(48, 8, 10, True), (45, 8, 0, True), (40, 8, 8, False),
                                                     (64, 16, 20, True), (33, 8, 5, True),
                                                     (48, 8, 15, False), (48, 8, 9, True)])  # tile-edge windows
def test_block_mask_tiles_summarize_the_dense_mask(T, block, window, docs):
    doc_ids = random_doc_ids(2, T) if docs else None
    w = torch.tensor(window) if window else None
    bm = masks.block_mask(doc_ids, w, T, torch.device("cpu"), block_size=block)
    n = -(-T // block)
    partial = tiles(bm.kv_num_blocks, bm.kv_indices, n)
    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    dense = masks.dense_mask(doc_ids, w, T, torch.device("cpu"))[:, 0]  # (B|1, T, T)
    padded = torch.zeros(dense.shape[0], n * block, n * block, dtype=torch.bool)
    padded[:, :T, :T] = dense
    per_tile = padded.view(-1, n, block, n, block)
    some, every = per_tile.any(dim=(2, 4)), per_tile.all(dim=(2, 4))  # (B, n, n)
    assert not (partial & full).any()
    assert torch.equal(some & ~(partial | full), torch.zeros_like(some))  # no visible pair is skipped
    inner = torch.ones(n, n, dtype=torch.bool)
    if T % block:
        inner[-1, :] = inner[:, -1] = False
    assert torch.equal(full, every & inner)  # "full" (mask_mod skipped) exactly when every pair is visible
    assert bm.shape[-2:] == (T, T)


def test_block_mask_at_64k_tokens_is_sparse_and_small():
    T, window = 65536, 4096
    doc_ids = random_doc_ids(1, T, 1 / 2048)
    bm = masks.block_mask(doc_ids, torch.tensor(window), T, torch.device("cpu"))
    visited = bm.kv_num_blocks + bm.full_kv_num_blocks  # (1, 1, 512) tiles per query block
    assert bm.kv_indices.shape == (1, 1, 512, 512)
    assert int(visited.max()) <= window // masks.BLOCK_SIZE + 1
    assert int(visited.sum()) < 512 * 33


# ----------------------------------------------------------------------------- flex vs SDPA
def attend_both(monkeypatch, B, Hq, Hkv, T, dk, dv, window, docs, alibi):
    """ctx.attend with flex and with dense SDPA: outputs and q/k/v gradients of both."""
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_validate_device", lambda *args: None)
    doc_ids = random_doc_ids(B, T) if docs else None
    windows = torch.tensor([window]) if window else None
    slopes = masks.alibi_slopes(Hq) if alibi else None
    inputs = [torch.randn(B, Hq, T, dk), torch.randn(B, Hkv, T, dk), torch.randn(B, Hkv, T, dv)]
    results = []
    for backend in ("flex", "sdpa"):
        ctx = AttentionContext(torch.arange(T), None, None, doc_ids=doc_ids, windows=windows,
                               alibi_slopes=slopes, backend=backend)
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = ctx.attend(q, k, v, 0 if window else None, 0.3)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, dv)).sum(), (q, k, v))
        results.append((out, *grads))
    return results


@pytest.mark.parametrize("name, Hq, Hkv, dk, dv", [("mla", 2, 2, 12, 8), ("gqa", 4, 2, 8, 8)])
def test_flex_equals_dense_sdpa_with_documents_and_window(monkeypatch, name, Hq, Hkv, dk, dv):
    flex, sdpa = attend_both(monkeypatch, 2, Hq, Hkv, 40, dk, dv, window=7, docs=True, alibi=False)
    for a, b in zip(flex, sdpa):
        assert rel(a, b) < 1e-5
    assert flex[0].shape == (2, Hq, 40, dv)


def test_alibi_flex_equals_dense_bias_reference(monkeypatch):
    flex, sdpa = attend_both(monkeypatch, 1, 4, 2, 32, 8, 8, window=0, docs=True, alibi=True)
    for a, b in zip(flex, sdpa):
        assert rel(a, b) < 1e-5
    slopes = masks.alibi_slopes(8)
    assert torch.allclose(slopes, 2.0 ** -torch.arange(1, 9).float())
    assert len(masks.alibi_slopes(12)) == 12 and masks.alibi_slopes(12)[8] == 2.0 ** -0.5
    bias = masks.alibi_bias(slopes, torch.tensor([3, 5]), 6)  # (H, T, S)
    assert bias[2, 1, 1] == slopes[2] * (1 - 5) and bias[0, 0, 3] == 0


def test_model_flex_equals_sdpa_for_mla_and_gqa():
    tokens, doc_ids = torch.randint(0, 97, (2, 40)), random_doc_ids(2, 40)
    for kind in ("mla", "gqa"):  # mha and mqa are gqa's code path
        model = model_for(kind, window_pattern="0,6", position="alibi" if kind == "gqa" else "rope")
        with torch.no_grad():
            ref = model(tokens, doc_ids=doc_ids)
            model.cfg.attn_backend = "flex"
            assert rel(model(tokens, doc_ids=doc_ids), ref) < 1e-5, kind


# ---------------------------------------------------------------------- model-level behaviour
@pytest.mark.parametrize("kind", list(TYPES))
def test_causality_and_documents_for_every_type(kind):
    model = model_for(kind, window_pattern="0,5")
    tokens = torch.randint(0, 97, (2, 24))
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(0, 97, (2, 9))
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14] * 2)
    changed = tokens.clone()
    changed[:, :10] = torch.randint(0, 97, (2, 10))  # rewrite document 0 only
    a, b = model(tokens, doc_ids=doc_ids), model(changed, doc_ids=doc_ids)
    assert torch.allclose(a[:, 10:], b[:, 10:], atol=1e-5)


def test_sliding_window_hides_tokens_beyond_it_and_grows_with_warmup():
    model = model_for("gqa", n_layers=1, window_pattern="4", window_warmup_steps=10, window_warmup_start=2)
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % 97
    a, b = model(tokens), model(changed)
    assert not torch.allclose(a[:, 3], b[:, 3], atol=1e-4)  # position 3 sees 0..3
    assert torch.allclose(a[:, 4:], b[:, 4:], atol=1e-6)  # position 4 sees 1..4
    assert model.window_sizes.tolist() == [4]  # a fresh model uses the full windows
    model.set_train_step(0)
    assert model.window_sizes.tolist() == [2]
    assert torch.allclose(model(tokens)[:, 2:], model(changed)[:, 2:], atol=1e-6)
    model.set_train_step(5)
    assert model.window_sizes.tolist() == [3]
    model.set_train_step(100)
    assert model.window_sizes.tolist() == [4]


def decode_logits(model, tokens, prefill: int, static: bool):
    caches = model.new_cache(tokens.shape[0], tokens.shape[1], dtype=torch.float32)
    pieces = [model.hidden_states(tokens[:, :prefill], caches=caches, start_pos=0)]
    for t in range(prefill, tokens.shape[1]):
        pos = torch.tensor(t) if static else t
        pieces.append(model.hidden_states(tokens[:, t:t + 1], caches=caches, start_pos=pos))
    return model.logits(torch.cat(pieces, dim=1))


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("position", ["rope", "alibi", "nope"])
def test_cached_decode_equals_full_forward(kind, position):
    model = model_for(kind, position=position, window_pattern="0,6")
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    assert rel(decode_logits(model, tokens, 7, static=False), full) < 1e-5
    caches = model.new_cache(2, 20, dtype=torch.float32)  # chunked prefill: 11 new tokens on a cache
    first = model.hidden_states(tokens[:, :9], caches=caches)
    rest = model.hidden_states(tokens[:, 9:], caches=caches, start_pos=9)
    assert rel(model.logits(torch.cat([first, rest], dim=1)), full) < 1e-5
    if position == "rope":  # static shapes: the whole cache under a position mask
        assert rel(decode_logits(model, tokens, 7, static=True), full) < 1e-5
    if kind == "mla":  # the naive path: expand every cached latent
        for block in model.blocks:
            block.attn.absorb = False
        assert rel(decode_logits(model, tokens, 7, static=True), full) < 1e-5


def test_model_compiles_without_graph_breaks_and_window_growth_never_recompiles():
    """On CPU the block masks are traced too (on CUDA they are built outside the graph on purpose)."""
    torch._dynamo.reset()
    model = model_for("mla", window_pattern="0,6", attn_backend="flex", window_warmup_steps=4, window_warmup_start=2)
    tokens, doc_ids = torch.randint(0, 97, (2, 24)), random_doc_ids(2, 24)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel(compiled(tokens, doc_ids=doc_ids), model(tokens, doc_ids=doc_ids)) < 1e-5
        model.set_train_step(0)  # window 6 -> 2: a buffer update, no recompilation
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert rel(compiled(tokens, doc_ids=doc_ids), model(tokens, doc_ids=doc_ids)) < 1e-5
    torch._dynamo.reset()


def test_generate_runs_for_every_type():
    prompt = torch.randint(0, 97, (2, 5))
    for kind in TYPES:
        model = model_for(kind, window_pattern="0,4")
        out = [list(model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(1)))
               for _ in range(2)]
        assert len(out[0]) == 6 and all(torch.equal(x, y) for x, y in zip(*out))


def test_baseline_caches_hold_k_and_v_of_the_kv_heads():
    model = model_for("gqa")
    caches = model.new_cache(3, 10, dtype=torch.float32)
    cfg = model.cfg
    assert caches[0].k.shape == caches[0].v.shape == (3, 2, 10, cfg.attn_head_dim())
    assert caches[0].bytes_per_token() == 4 * 2 * 2 * cfg.attn_head_dim()
    sizes = model.kv_cache_bytes_per_token(torch.bfloat16)
    assert sizes["per_layer"] == 2 * 2 * 2 * cfg.attn_head_dim() and sizes["mha_per_layer"] == 2 * sizes["per_layer"]


def test_parameter_counts_match_formulas():
    for kind in TYPES:
        for qk_norm in (True, False):
            cfg = tiny_model_config(attention=kind, qk_norm=qk_norm, head_dim=6, **TYPES[kind])
            attn = Transformer(cfg).blocks[0].attn
            assert sum(p.numel() for p in attn.parameters()) == attention_param_count(cfg)
    cfg = tiny_model_config(attention="gqa", n_heads=4, n_kv_heads=2, qk_norm=False)  # head_dim 32 // 4
    assert attention_param_count(cfg) == 32 * 4 * 8 * 2 + 32 * 2 * 8 * 2


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    tokens, doc_ids = torch.randint(0, 97, (2, 16)), random_doc_ids(2, 16)
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        model = Transformer(tiny_model_config(window_pattern="0,4", activation_checkpointing=recompute)).train()
        loss = model(tokens, tokens, doc_ids=doc_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


# ------------------------------------------------------------------------- decode kernel (Triton)
TRITON_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, "tests")
    from helpers import tiny_model_config
    from moespeed import Transformer
    from moespeed.kernels import decode_attention as K
    torch.manual_seed(0)
    # fp32 only: the interpreter's bf16 tl.dot is wrong (bf16 is checked on the GPU)
    for B, Hkv, T, G, S, dk, dv, shared, window, alibi in [
            (2, 1, 2, 6, 300, 24, 16, True, 0, False), (1, 1, 1, 12, 150, 40, 32, True, 37, True),
            (1, 2, 3, 2, 90, 16, 16, False, 21, True)]:
        q = torch.randn(B, Hkv, T * G, dk)
        k = torch.randn(B, Hkv, S + 5, dk)[:, :, :S]  # a strided view of a larger cache
        v = None if shared else torch.randn(B, Hkv, S, dv)
        q_pos = torch.arange(S - T, S) - 2  # the last keys are masked (a static cache past the context)
        w = torch.tensor(window) if window else None
        slopes = torch.rand(Hkv * G) if alibi else None
        args = (q, k, v, q_pos, 0.3, w, slopes, dv if shared else 0)
        ref, got = K.decode_attention(*args, kernel="torch"), K.decode_attention(*args, kernel="triton")
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, (B, Hkv, T, G, S)
    model = Transformer(tiny_model_config(window_pattern="0,6", decode_kernel="triton")).eval()  # MLA
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_cache(2, 16, dtype=torch.float32)
        pieces = [model.hidden_states(tokens[:, :5], caches=caches)]
        pieces += [model.hidden_states(tokens[:, t:t + 1], caches=caches, start_pos=torch.tensor(t))
                   for t in range(5, 12)]
        got = model.logits(torch.cat(pieces, dim=1))
    assert ((got - full).norm() / full.norm()).item() < 1e-5
    print("TRITON_OK")
""")


@pytest.mark.skipif(not decode_kernels.HAS_TRITON, reason="triton is not installed")
def test_decode_kernel_interpreted_matches_reference():
    """Runs in a subprocess: TRITON_INTERPRET=1 must be set before the kernel is defined."""
    run_interpreted(TRITON_CHECK, "TRITON_OK")


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, fragment", [
    ([("model.attention", "gqa"), ("model.n_kv_heads", "3")], "model.n_kv_heads = 3: must divide n_heads = 4"),
    ([("model.attention", "mha"), ("model.n_kv_heads", "2")], "model.n_kv_heads = 2: mha has 4"),
    ([("model.attention", "mqa"), ("model.head_dim", "7")], "model.head_dim = 7: must be even"),
    ([("model.attention", "mha"), ("model.n_heads", "5")], "model.head_dim = 0: d_model = 192 is not divisible"),
    ([("model.attention", "flash")], "model.attention = 'flash': must be one of mla, mha, gqa, mqa"),
    ([("model.position", "xpos")], "model.position = 'xpos'"),
    ([("model.attn_backend", "xformers")], "model.attn_backend = 'xformers'"),
    ([("model.window_pattern", "0,-4")], "model.window_pattern = '0,-4'"),
    ([("model.window_pattern", "full")], "model.window_pattern = 'full'"),
    ([("model.window_warmup_start", "0")], "model.window_warmup_start = 0"),
])
def test_bad_attention_settings_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        C.build_config("quickstart", None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_compiled_flex_on_gpu_matches_dense_reference():
    torch.manual_seed(0)
    B, H, T = 2, 4, 1024
    doc_ids = random_doc_ids(B, T, 1 / 200).cuda()
    inputs = [torch.randn(B, H, T, 96, device="cuda"), torch.randn(B, H, T, 96, device="cuda"),
              torch.randn(B, H, T, 64, device="cuda")]
    results = []
    for backend, dtype in (("flex", torch.bfloat16), ("sdpa", torch.float32)):
        ctx = AttentionContext(torch.arange(T, device="cuda"), None, None, doc_ids=doc_ids,
                               windows=torch.tensor([256], device="cuda"), backend=backend)
        q, k, v = (x.to(dtype).requires_grad_() for x in inputs)
        out = ctx.attend(q, k, v, 0, 96 ** -0.5)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for a, b in zip(*results):
        assert rel(a.float(), b) < 2e-2


@pytest.mark.gpu
def test_decode_kernel_on_gpu_matches_reference_in_bf16():
    torch.manual_seed(0)
    for Hkv, G, dk, dv, shared in ((1, 12, 288, 256, True), (12, 1, 64, 64, False), (2, 4, 64, 64, False)):
        q = torch.randn(3, Hkv, 2 * G, dk, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(3, Hkv, 5000, dk, device="cuda", dtype=torch.bfloat16)
        v = None if shared else torch.randn(3, Hkv, 5000, dv, device="cuda", dtype=torch.bfloat16)
        q_pos = torch.tensor([4000, 4001], device="cuda")
        for window in (None, torch.tensor(700, device="cuda")):
            args = (q, k, v, q_pos, dk ** -0.5, window, None, dv if shared else 0)
            ref = decode_kernels.decode_attention(*args, kernel="torch")
            assert rel(decode_kernels.decode_attention(*args, kernel="triton").float(), ref.float()) < 2e-2


def test_flex_kernel_flash_sets_flex_backend_and_is_checked_before_training(monkeypatch):
    """model.flex_kernel = flash asks Flex for BACKEND=FLASH on CUDA only; without flash-attn-4 a CUDA
    run is refused in one line before anything is written, and a CPU run ignores the option."""
    from moespeed.errors import ConfigError
    from moespeed.model import attention
    from moespeed.train.trainer import check_backends

    assert attention.flex_kernel_options("flash", cuda=True) == {"BACKEND": "FLASH"}
    assert attention.flex_kernel_options("triton", cuda=True) is None
    assert attention.flex_kernel_options("flash", cuda=False) is None
    monkeypatch.setitem(attention.FLEX_KERNEL_OPTIONS, "ROWS_GUARANTEED_SAFE", True)  # the benches' knob stays
    assert attention.flex_kernel_options("flash", cuda=True) == {"ROWS_GUARANTEED_SAFE": True, "BACKEND": "FLASH"}

    cfg = tiny_model_config(flex_kernel="flash")
    check_backends(cfg, torch.device("cpu"))
    monkeypatch.setattr("moespeed.train.trainer.flash_kernels_available", lambda: False)
    with pytest.raises(ConfigError, match="model.flex_kernel = flash needs .*flash-attn-4"):
        check_backends(cfg, torch.device("cuda"))
    monkeypatch.setattr("moespeed.train.trainer.flash_kernels_available", lambda: True)
    check_backends(cfg, torch.device("cuda"))


def test_decode_kernel_compiles_for_hopper():
    """The flash-decoding kernel compiles for an H100 (sm_90) ahead of time, also without a GPU: MLA's
    absorbed decode (values inside the latent keys, 512 + 64 wide) and a GQA cache with a window and ALiBi."""
    from helpers import compile_for_hopper

    types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "POS": "*i64", "WIN": "*i64", "SLOPES": "*fp32",
             "O": "*fp32", "LSE": "*fp32", "scale": "fp32"}
    mla = dict(DA=512, DB=64, DV=512, DA_P=512, DB_P=64, DV_P=512, BLOCK_R=16, BLOCK_N=64, V_IN_K=True,
               HAS_WINDOW=False, HAS_ALIBI=False)
    gqa = dict(DA=64, DB=0, DV=64, DA_P=64, DB_P=16, DV_P=64, BLOCK_R=16, BLOCK_N=128, V_IN_K=False,
               HAS_WINDOW=True, HAS_ALIBI=True)
    for constexprs in (mla, gqa):
        launch = decode_kernels.LAUNCH
        compile_for_hopper(decode_kernels._decode_chunk_kernel, types, constexprs,
                           num_warps=launch["num_warps"], num_stages=launch["num_stages"])
