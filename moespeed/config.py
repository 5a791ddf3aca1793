"""Typed configuration: model, data and train sections, named presets, TOML files, dotted overrides.

A `Config` is resolved in this order, later steps winning:
    preset (`--preset quickstart`)  ->  TOML file (`--config run.toml`)  ->  CLI overrides
    (`--model.n_layers 4 --train.lr 1e-3`).
Every key is declared with `option()` (a one-line doc and optional choices), so `--help` lists them
all and a bad key or value fails with one line that names the key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .model.moe import MoEConfig
from .model.moe_ep import DISPATCHERS as EP_DISPATCHERS
from .model.peer import PEERConfig
from .options import field_choices, field_doc, option

FFN_KINDS = ("dense", "moe", "peer")
ATTENTION_KINDS = ("mla", "mha", "gqa", "mqa")
POSITIONS = ("rope", "alibi", "nope")
ATTN_BACKENDS = ("auto", "flex", "sdpa")
DECODE_KERNELS = ("auto", "triton", "torch")
FLEX_KERNELS = ("triton", "flash")


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """"A:B" -> (A, B) with 0 <= A < B; "" -> None. ValueError for anything else."""
    if not spec:
        return None
    try:
        start, stop = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"'{spec}' is not A:B") from None
    if not 0 <= start < stop:
        raise ValueError(f"'{spec}' needs 0 <= A < B")
    return start, stop


@dataclass
class ModelConfig:
    """The Transformer: MLA attention + ReLU² MLP blocks (pre-RMSNorm)."""

    vocab_size: int = option(0, "vocabulary size; 0 = the tokenizer's size rounded up to a multiple of 64")
    d_model: int = option(256, "width of the residual stream")
    n_layers: int = option(4, "number of Transformer blocks")
    n_heads: int = option(4, "attention heads")
    q_lora_rank: int = option(0, "rank of MLA's low-rank query (RMSNorm on the latent); 0 = full-rank query")
    kv_lora_rank: int = option(64, "rank of MLA's joint KV latent (what the KV cache stores)")
    qk_nope_head_dim: int = option(32, "per-head query/key dims without position (RoPE-free part)")
    qk_rope_head_dim: int = option(16, "per-head query dims with RoPE; the rope key is one vector per token shared by all heads (even)")
    v_head_dim: int = option(32, "per-head value dim")
    qk_norm: bool = option(True, "RMSNorm on per-head queries and the shared rope key (the KV latent is always normed)")
    rope_theta: float = option(10000.0, "RoPE base")
    attention: str = option("mla", "attention type: mla (latent KV cache), or the baselines mha, gqa (n_kv_heads key/value heads), mqa", choices=ATTENTION_KINDS)
    n_kv_heads: int = option(0, "key/value heads of gqa (must divide n_heads; 0 = n_heads); mha has n_heads, mqa 1; unused by mla")
    head_dim: int = option(0, "per-head query/key/value dim of mha/gqa/mqa; 0 = d_model // n_heads; unused by mla")
    position: str = option("rope", "position encoding: rope, alibi (per-head linear distance bias) or nope; mla keeps its shared key dims unrotated without rope", choices=POSITIONS)
    attn_backend: str = option("auto", "training attention kernel: flex (FlexAttention, block-sparse doc/window masks), sdpa (dense masks: short sequences only), auto = sdpa for plain causal layers and on CPU, flex otherwise", choices=ATTN_BACKENDS)
    flex_kernel: str = option("triton", "FlexAttention's GPU kernels: triton (torch's Triton templates) or flash (FlashAttention-4's CuTe kernels through Flex's BACKEND=FLASH: needs the flash-attn-4 package and a Hopper or newer GPU; CPU runs ignore it)", choices=FLEX_KERNELS)
    decode_kernel: str = option("auto", "cached-decode attention: triton (fused flash-decoding kernel, CUDA), torch (batched matmuls), auto = triton on CUDA", choices=DECODE_KERNELS)
    window_pattern: str = option("0", "sliding window per layer in tokens, comma-separated, repeated to n_layers; 0 = full causal; e.g. 0,1024 or 4096,4096,4096,0")
    window_warmup_steps: int = option(0, "grow every sliding window linearly from window_warmup_start to its size over this many train steps; 0 = off")
    window_warmup_start: int = option(256, "sliding window size at step 0 when window_warmup_steps > 0")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward (attention always; dense FFNs too) to save memory")
    max_seq_len: int = option(256, "longest sequence the model is built for (RoPE table, KV cache)")
    d_ff: int = option(1024, "hidden width of the dense MLP")
    mlp_activation: str = option("relu2", "activation of the dense MLP", choices=["relu2", "gelu", "swiglu"])
    norm_eps: float = option(1e-6, "epsilon of every RMSNorm")
    tie_embeddings: bool = option(True, "share the token embedding with the output head")
    loss_backend: str = option("auto", "linear cross-entropy: auto (fused Triton on CUDA, else chunked), triton, chunked, reference (materialized logits), liger (needs liger-kernel)",
                               choices=["auto", "triton", "chunked", "reference", "liger"])
    loss_overlap: bool = option(False, "fused loss on CUDA: run each chunk's weight-gradient GEMM on a side stream next to its hidden-gradient GEMM (experimental: measured no gain on H100)")
    loss_memory: str = option("fast", "fused loss memory/speed trade-off: fast (fp32 weight-gradient sum, ~4096-token chunks) or lean (bf16 sum with Liger's chunk size: Liger's memory, about its speed)",
                              choices=["fast", "lean"])
    init_std: float = option(0.02, "std of the normal init of weights; residual output projections get std/sqrt(2*n_layers)")
    ffn_pattern: str = option("dense", "FFN kind per layer, comma-separated (dense, moe, peer), repeated to n_layers; e.g. dense,peer")
    first_k_dense: int = option(0, "the first k layers use the dense MLP whatever ffn_pattern says")
    moe: MoEConfig = option(MoEConfig(), "DeepSeekMoE layers (shared + routed experts)")
    peer: PEERConfig = option(PEERConfig(), "PEER layers (product-key retrieval over many tiny experts)")

    def ffn_kinds(self) -> list[str]:
        """The FFN kind of every layer."""
        pattern = [k.strip() for k in self.ffn_pattern.split(",") if k.strip()]
        return ["dense" if i < self.first_k_dense else pattern[i % len(pattern)] for i in range(self.n_layers)]

    def layer_windows(self) -> list[int]:
        """The configured sliding window of every layer (0 = full causal)."""
        pattern = [int(w) for w in self.window_pattern.split(",") if w.strip()]
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]

    def kv_heads(self) -> int:
        """Key/value heads of the mha/gqa/mqa baselines."""
        return {"mha": self.n_heads, "mqa": 1}.get(self.attention, self.n_kv_heads or self.n_heads)

    def attn_head_dim(self) -> int:
        """Per-head dim of the mha/gqa/mqa baselines."""
        return self.head_dim or self.d_model // self.n_heads

    def rope_dim(self) -> int:
        """Dims rotated by RoPE: MLA's shared rope key, or the baselines' whole head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim()

    def validate(self) -> None:
        pattern = [k.strip() for k in self.ffn_pattern.split(",") if k.strip()]
        _require(bool(pattern) and all(k in FFN_KINDS for k in pattern),
                 f"model.ffn_pattern = {self.ffn_pattern!r}: must be a comma-separated list of {', '.join(FFN_KINDS)}")
        _require(self.first_k_dense >= 0, f"model.first_k_dense = {self.first_k_dense}: must be >= 0")
        for key in ("d_model", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                    "max_seq_len", "d_ff"):
            _require(getattr(self, key) > 0, f"model.{key} = {getattr(self, key)}: must be a positive integer")
        _require(self.q_lora_rank >= 0, f"model.q_lora_rank = {self.q_lora_rank}: must be >= 0 (0 = full-rank query)")
        _require(self.vocab_size >= 0, f"model.vocab_size = {self.vocab_size}: must be >= 0 (0 = from the tokenizer)")
        _require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                 f"model.qk_rope_head_dim = {self.qk_rope_head_dim}: must be a positive even number (RoPE rotates pairs)")
        _require(self.rope_theta > 0, f"model.rope_theta = {self.rope_theta}: must be > 0")
        _require(self.norm_eps > 0, f"model.norm_eps = {self.norm_eps}: must be > 0")
        _require(self.init_std > 0, f"model.init_std = {self.init_std}: must be > 0")
        self._validate_attention()

    def _validate_attention(self) -> None:
        try:
            windows = [int(w) for w in self.window_pattern.split(",") if w.strip()]
        except ValueError:
            windows = []
        _require(bool(windows) and min(windows) >= 0,
                 f"model.window_pattern = {self.window_pattern!r}: must be comma-separated window sizes >= 0 (0 = full causal), e.g. 0,1024")
        _require(self.window_warmup_steps >= 0, f"model.window_warmup_steps = {self.window_warmup_steps}: must be >= 0 (0 = off)")
        _require(self.window_warmup_start > 0, f"model.window_warmup_start = {self.window_warmup_start}: must be > 0")
        if self.attention == "mla":
            return
        _require(self.head_dim >= 0, f"model.head_dim = {self.head_dim}: must be >= 0 (0 = d_model // n_heads)")
        _require(self.head_dim > 0 or self.d_model % self.n_heads == 0,
                 f"model.head_dim = 0: d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}; set model.head_dim")
        expected = {"mha": (0, self.n_heads), "mqa": (0, 1)}.get(self.attention)
        if expected is not None:
            _require(self.n_kv_heads in expected,
                     f"model.n_kv_heads = {self.n_kv_heads}: {self.attention} has {expected[1]} key/value heads; use 0 or attention = gqa")
        _require(self.n_kv_heads >= 0 and self.n_heads % self.kv_heads() == 0,
                 f"model.n_kv_heads = {self.n_kv_heads}: must divide n_heads = {self.n_heads} (0 = n_heads)")
        _require(self.position != "rope" or self.attn_head_dim() % 2 == 0,
                 f"model.head_dim = {self.attn_head_dim()}: must be even with position = rope (RoPE rotates pairs)")


@dataclass
class DataConfig:
    """Corpus, tokenizer, token shards and the batch loader."""

    data: list = option([], "text files, folders, globs, .jsonl (field `text`) or .parquet (column `text`); empty = this Python's standard library sources")
    tokenizer: str = option("", "path of an existing tokenizer.json to use instead of training one")
    vocab_size: int = option(4096, "BPE vocabulary size when training a tokenizer (< 65536 stores tokens as uint16)")
    tokenizer_train_chars: int = option(20_000_000, "characters of the training split used to train the tokenizer")
    val_fraction: float = option(0.05, "share of documents (files) held out for validation, chosen by a hash of the name")
    seq_len: int = option(256, "tokens per sequence")
    batch_size: int = option(16, "sequences per micro-batch (per process)")
    cache_dir: str = option("~/.cache/moespeed", "where prepared shards are cached, keyed by a content hash")

    def validate(self) -> None:
        _require(self.vocab_size >= 257, f"data.vocab_size = {self.vocab_size}: must be >= 257 (256 bytes + BOS)")
        _require(self.tokenizer_train_chars > 0, f"data.tokenizer_train_chars = {self.tokenizer_train_chars}: must be > 0")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction = {self.val_fraction}: must be in (0, 1)")
        _require(self.seq_len > 0, f"data.seq_len = {self.seq_len}: must be a positive integer")
        _require(self.batch_size > 0, f"data.batch_size = {self.batch_size}: must be a positive integer")
        _require(self.cache_dir.strip() != "", "data.cache_dir is empty: give a folder for the prepared data, e.g. ~/.cache/moespeed")


@dataclass
class TrainConfig:
    """Optimization, schedule, evaluation, checkpoints and the run directory."""

    run_dir: str = option("", "run directory; empty = runs/<preset>")
    resume: bool = option(False, "continue the run in run_dir (default: the latest run under runs/) from its latest checkpoint, with its saved config.toml as the base for the config file and overrides (model and data keys must not change); a run that already reached steps stops at once (raise steps to train further); the same as moespeed train --resume")
    steps: int = option(300, "optimizer steps")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    optimizer: str = option("muon", "adamw for everything, or muon for hidden matrices (AdamW for the rest)", choices=["adamw", "muon"])
    lr: float = option(3e-3, "peak learning rate (AdamW; also Muon's with muon_adjust_lr = match_rms_adamw)")
    muon_lr: float = option(0.0, "Muon's peak learning rate; 0 = the same as lr")
    muon_momentum: float = option(0.95, "Muon's momentum")
    muon_momentum_dtype: str = option("float32", "dtype of Muon's momentum buffers: bfloat16 halves their memory and traffic (the lerps still run in fp32; DeepSeek-V3 keeps AdamW's moments in bf16); the small presets' choice: H200 small-moe Muon 7.16 vs 7.40 ms per step, 590 MiB less peak memory, val loss unchanged (3 seeds on small)", choices=["float32", "bfloat16"])
    muon_ns_steps: int = option(5, "Newton-Schulz iterations of Muon (each costs the same; the small presets run 4 polar_express steps: on small they converged like 5 standard ones, 0.004 lower val loss on each of 3 seeds, Muon 2.84 vs 3.33 ms of a 63 ms H200 step; on quickstart they ended 0.007-0.012 higher; 3 steps aimed at 1e-2 cut small-moe's Muon from 6.86 to 5.76 ms on an H200 but ended 0.036 higher on average over 3 seeds)")
    muon_ns_coefficients: str = option("standard", "Muon's Newton-Schulz coefficients: standard (one quintic, (3.4445, -4.7750, 2.0315), every step: torch.optim.Muon's) or polar_express (a minimax-optimal quintic per step for the singular values in [muon_ns_lowest, 1]: a tighter band at the same cost per step; moespeed/optim/polar_express.py; the small presets' choice, with 4 steps)", choices=["standard", "polar_express"])
    muon_ns_lowest: float = option(3e-3, "polar_express: the smallest singular value of the Frobenius-normalized momentum that the schedule aims at (smaller ones still grow, more slowly; 1e-3 widens the band 4 steps reach to ~[0.43, 1.57]); ignored by standard")
    muon_streams: int = option(3, "CUDA side streams on which Muon runs its shape classes concurrently (one process only; saved 0.4-1.1 ms per step on an H100); 0 = all on the current stream")
    adamw_side_stream: bool = option(False, "with Muon on CUDA: step AdamW (embeddings, head, norms) on a side stream beside Muon's step instead of before it, so its memory-bound kernels can overlap Muon's GEMMs (ignored off CUDA and with FSDP's DTensors; H200 small-moe, one run: Muon 6.75 vs 6.86 ms, 0.11 ms less, not yet repeated, so the presets leave it off)")
    muon_cuda_graph: bool = option(False, "run Muon's step as one CUDA graph, captured after a few eager steps and replayed while the params and momentum buffers keep their addresses (the grads and the lr are read from GPU tables written each step; one process on CUDA, ignored elsewhere): hundreds of kernel launches cost one, for hosts where launching Muon's kernels takes longer than running them; the NS temporaries stay reserved in the graph's memory pool (moespeed/optim/muon_graph.py)")
    muon_batch_numel: int = option(2**26, "elements of one batched Newton-Schulz call (a round) of Muon: bigger rounds mean fewer kernel launches (small-moe: 10 rounds per step at 2^26, 6 at 2^28) and bigger NS temporaries (a round's bf16 copy, ~2 bytes per element, per side stream); H200 small-moe Muon step: 6.95/6.94 ms at 2^28 vs 6.91/6.87 ms at 2^26, so bigger rounds do not pay")
    muon_ns_fp8_first_step: bool = option(False, "run the first Newton-Schulz step's three GEMMs on fp8 e4m3 operands (fp32 accumulation; Hopper's fp8 tensor cores are twice as fast as bf16; a CPU emulates the rounding): expert-shaped blocks moved 8.6e-3 to 1.2e-2 from fp64 NS against 8.6e-3 to 9.2e-3 in bf16, one step 1.0-3.3x a bf16 step's error, the whole NS 1.0-2.0x; fp8 in later steps can leave the schedule's band, so only the first; on GPUs below compute capability 8.9 it emulates the rounding without fp8 hardware (no faster), and ns_method = gram blocks stay bf16 (moespeed/optim/ns_fp8.py; H200 small-moe: Muon 8.61 vs 6.86 ms, slower: the fp8 casts and the column-major X the fp8 product needs cost more than the faster GEMMs save)")
    muon_stack_batches: int = option(4, "a Muon shape class holds at most this many muon_batch_numel elements (or one bigger param); a bigger one is cut between params, and on one GPU the parts run concurrently on Muon's side streams, one part's memory-bound momentum and update beside another's NS GEMMs (small-moe's expert blocks: 2 classes at 4, one per orientation, each alone on a stream; 6 at 1, spread over the 3 streams; H200 small-moe, one run: Muon 6.87 ms at 1 vs 6.86 at 4)")
    muon_ns_method: str = option("standard", "Muon's orthogonalization: standard Newton-Schulz, or gram (iterates on the small Gram matrix of blocks whose long side is >= 2x the short: fewer FLOPs; H100, small: 3.37 vs 3.77 ms per step, but a 0.009-0.022 higher val loss after 500 steps on three seeds)", choices=["standard", "gram"])
    muon_ns_gemm: str = option("auto", "Muon's Newton-Schulz GEMMs: torch (cuBLAS baddbmm), triton (a GEMM that adds D in its epilogue), tma (the same GEMM as a persistent Triton kernel with TMA loads, Hopper or newer; the triton kernel for batches whose sides are not multiples of 128 x 64), poly (P = aI + bA + cA^2 first, then X <- P X as one plain cuBLAS bmm; H200 small-moe: 7.17 vs 7.41 ms of Muon per step, slightly larger bf16 error), auto = tma on Hopper or newer GPUs (H200 small-moe train step: Muon 6.59 vs 6.84 ms with triton), triton on older GPUs, torch elsewhere, tune = on CUDA the fastest of torch, triton, poly (and tma on Hopper or newer) per NS batch shape, timed once on the first step (H200: as fast as poly)", choices=["auto", "torch", "triton", "tma", "poly", "tune"])
    muon_adjust_lr: str = option("match_rms_adamw", "Muon's per-shape lr scale: match_rms_adamw = 0.2*sqrt(max(rows, cols)) (AdamW lrs carry over), original = sqrt(max(1, rows/cols))", choices=["match_rms_adamw", "original"])
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = option(20, "linear warmup steps")
    schedule: str = option("cosine", "decay after warmup: cosine, or warmup-stable-decay", choices=["cosine", "wsd"])
    decay_fraction: float = option(0.2, "wsd: share of steps spent decaying at the end")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (never on norms, biases, embeddings)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off")
    eval_every: int = option(100, "evaluate on the val split every N steps (and at step 0 and the end)")
    eval_batches: int = option(8, "val batches per evaluation (a fixed random sample of windows from the whole val split, the same every time)")
    ckpt_every: int = option(100, "save a checkpoint every N steps (and at the end)")
    keep_last: int = option(2, "checkpoints kept in the run directory")
    log_every: int = option(10, "write train metrics every N steps (and, when stderr is not a terminal, e.g. a log file, print them as one plain line instead of a progress bar)")
    seed: int = option(1337, "seed of init, data order and dropout")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU", choices=["auto", "fp32", "bf16"])
    compile: bool = option(False, "torch.compile the model")
    compile_overlap: bool = option(False, "with train.compile: let Inductor reorder each compiled graph so collectives inside it (expert parallelism's all-gathers and reduce-scatters) overlap computation (torch._inductor.config.reorder_for_compute_comm_overlap)")
    compile_scope: str = option("blocks", "with train.compile: blocks (each transformer block compiled on its own, embedding, head and loss eager: as fast on one GPU, faster under DDP, less memory, quicker to compile) or model (one graph for the whole forward; under DDP, torch splits it at the gradient buckets)", choices=["blocks", "model"])
    profile_steps: str = option("", "profile steps A:B (A <= step < B) with torch.profiler on rank 0: profile.txt and profile_trace.json in the run dir; empty = off")
    threads: int = option(0, "CPU threads for torch; 0 = torch's default")
    parallel: str = option("ddp", "with several processes (torchrun): ddp replicates the model; fsdp shards params, grads and optimizer state (FSDP2)", choices=["ddp", "fsdp"])
    muon_share: str = option("rounds", "several ranks: how Muon splits the Newton-Schulz work of replicated params: rounds (each batch of blocks whole to one rank, then a broadcast: each rank launches ~1/W of the kernels) or blocks (every batch split over all ranks, then an all-gather)", choices=["rounds", "blocks"])
    grad_reduce_dtype: str = option("fp32", "dtype of the data-parallel gradient reduction (DDP all-reduce, FSDP2 reduce-scatter): bf16 halves the bytes sent, rounding each gradient to bf16 once per reduction", choices=["fp32", "bf16"])
    ddp_bucket_mb: int = option(25, "DDP gradient bucket size in MiB (torch's default 25): larger buckets mean fewer, longer all-reduces, overlapping less of the backward")
    ep_size: int = option(1, "expert parallelism: routed experts split over groups of ep_size ranks (must divide the number of processes and model.moe.n_routed_experts); data parallel over the groups")
    ep_dispatch: str = option("auto", "how expert parallelism moves token copies: alltoall (each copy to its expert's rank and back; one host sync per layer), allgather (all-gather tokens, reduce-scatter outputs; no host sync, ep_size x the expert rows in memory), auto = allgather when model.moe.num_experts_per_tok >= ep_size", choices=EP_DISPATCHERS)
    ep_chunks: int = option(1, "allgather dispatcher: split each MoE layer's tokens into this many pieces, each gathered, run through the experts and scattered on its own, so one piece's exchange can overlap another's expert FFN; 1 = one piece")
    ep_masked_rows: bool = option(False, "allgather dispatcher: dispatch/combine kernels (Triton on CUDA) that read and write only the rows of this rank's experts, not all ep_size x tokens x top-k rows (not yet measured on GPUs, so off)")

    def validate(self) -> None:
        for key in ("steps", "grad_accum", "eval_every", "eval_batches", "ckpt_every", "keep_last", "log_every"):
            _require(getattr(self, key) > 0, f"train.{key} = {getattr(self, key)}: must be a positive integer")
        try:
            window = parse_profile_steps(self.profile_steps)
        except ValueError as exc:
            raise ConfigError(f"train.profile_steps = {exc}: use A:B, e.g. 10:13, or leave it empty") from None
        _require(window is None or window[1] <= self.steps,
                 f"train.profile_steps = '{self.profile_steps}': must end by train.steps = {self.steps}")
        _require(self.lr > 0, f"train.lr = {self.lr}: must be > 0")
        _require(self.muon_lr >= 0, f"train.muon_lr = {self.muon_lr}: must be >= 0 (0 = lr)")
        _require(0 <= self.muon_momentum < 1, f"train.muon_momentum = {self.muon_momentum}: must be in [0, 1)")
        _require(self.muon_ns_steps > 0, f"train.muon_ns_steps = {self.muon_ns_steps}: must be > 0")
        _require(0 < self.muon_ns_lowest < 1, f"train.muon_ns_lowest = {self.muon_ns_lowest}: must be in (0, 1)")
        _require(self.muon_batch_numel >= 1, f"train.muon_batch_numel = {self.muon_batch_numel}: must be >= 1")
        _require(self.muon_stack_batches >= 1, f"train.muon_stack_batches = {self.muon_stack_batches}: must be >= 1")
        _require(self.muon_streams >= 0, f"train.muon_streams = {self.muon_streams}: must be >= 0 (0 = off)")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio = {self.min_lr_ratio}: must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"train.warmup_steps = {self.warmup_steps}: must be >= 0")
        _require(0 < self.decay_fraction <= 1, f"train.decay_fraction = {self.decay_fraction}: must be in (0, 1]")
        _require(self.weight_decay >= 0, f"train.weight_decay = {self.weight_decay}: must be >= 0")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, f"train.{key} = {getattr(self, key)}: must be in [0, 1)")
        _require(self.grad_clip >= 0, f"train.grad_clip = {self.grad_clip}: must be >= 0 (0 = off)")
        _require(self.threads >= 0, f"train.threads = {self.threads}: must be >= 0")
        _require(self.ddp_bucket_mb > 0, f"train.ddp_bucket_mb = {self.ddp_bucket_mb}: must be a positive integer")
        _require(self.ep_size >= 1, f"train.ep_size = {self.ep_size}: must be >= 1 (1 = no expert parallelism)")
        _require(self.ep_chunks >= 1, f"train.ep_chunks = {self.ep_chunks}: must be >= 1 (1 = no chunking)")
        _require(self.ep_dispatch in EP_DISPATCHERS,
                 f"train.ep_dispatch = {self.ep_dispatch!r}: allowed are {' | '.join(EP_DISPATCHERS)}")
        _require(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None,
                 f"train.device = {self.device!r}: must be auto, cpu, cuda or cuda:N (N = a GPU index: 0, 1, ...)")


@dataclass
class Config:
    """Everything a run needs; saved as config.toml in the run directory."""

    preset: str = option("quickstart", "named preset the other keys start from")
    model: ModelConfig = option(ModelConfig(), "model")
    data: DataConfig = option(DataConfig(), "data")
    train: TrainConfig = option(TrainConfig(), "train")

    def validate(self) -> "Config":
        for section in (self.model, self.data, self.train):
            _validate_tree(section, _section_name(section))
        _require(self.data.seq_len <= self.model.max_seq_len,
                 f"data.seq_len = {self.data.seq_len}: must be <= model.max_seq_len = {self.model.max_seq_len}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _section_name(obj: Any) -> str:
    return {ModelConfig: "model", DataConfig: "data", TrainConfig: "train"}[type(obj)]


def _validate_tree(obj: Any, prefix: str) -> None:
    """Check every float is finite and every field's choices, then call validate() of every nested dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):  # inf or nan: training would give loss nan
            raise ConfigError(f"{prefix}.{f.name} = {value}: must be a finite number")
        choices = field_choices(f)
        if choices is not None and value not in choices:
            raise ConfigError(f"{prefix}.{f.name} = {value!r}: must be one of {', '.join(map(str, choices))}")
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{prefix}.{f.name}")
    if hasattr(obj, "validate"):
        obj.validate()


# ---------------------------------------------------------------------------------------- presets
def _derived(base: dict, **model_changes) -> dict:
    """A preset equal to `base` but for some model keys."""
    return {"model": {**base["model"], **model_changes}, "data": dict(base["data"]), "train": dict(base["train"])}


# CPU, a few minutes on 2 cores: a 4-layer MLA model on the standard library's sources.
_QUICKSTART = {
    "model": dict(d_model=192, n_layers=4, n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, d_ff=768, max_seq_len=256),
    "data": dict(vocab_size=4096, seq_len=128, batch_size=16, tokenizer_train_chars=8_000_000),
    "train": dict(steps=300, lr=3e-3, muon_lr=2e-3, warmup_steps=20, eval_every=100, eval_batches=8,
                  ckpt_every=100, log_every=10),
}
# GPU: a ~100M-parameter MLA model (12 layers, d_model 768), 32K vocabulary, 1K context. qk head dim
# 48 + 16 = v head dim 64 (kernel-friendly); the latent + rope key (128 + 16) is 10.7x smaller than MHA's K+V.
_SMALL = {
    "model": dict(d_model=768, n_layers=12, n_heads=12, q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=48,
                  qk_rope_head_dim=16, v_head_dim=64, d_ff=3072, max_seq_len=1024),
    "data": dict(vocab_size=32768, seq_len=1024, batch_size=32, tokenizer_train_chars=50_000_000),
    "train": dict(steps=2000, lr=1e-3, muon_lr=3e-3, warmup_steps=100, eval_every=250, eval_batches=20, ckpt_every=500,
                  log_every=10, compile=True,
                  # 4 Polar Express NS steps: small's val loss as with 5 standard steps (3 seeds), 15% less Muon time
                  muon_ns_coefficients="polar_express", muon_ns_steps=4,
                  # bf16 Muon momentum: small val loss 3.6413 vs 3.6414 (mean of 3 seeds), small-moe -0.24 ms and
                  # -590 MiB per step on an H200 (BENCHMARKS.md, session 10)
                  muon_momentum_dtype="bfloat16",
                  # Muon's step as one CUDA graph: H200 small-moe 6.84/6.88 vs 6.90/6.94 ms, on an emulated
                  # slow-launch host 9.14/6.86 vs 12.88/13.92 ms, same peak memory (BENCHMARKS.md, session 15)
                  muon_cuda_graph=True),
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quickstart": _QUICKSTART,
    # quickstart with DeepSeekMoE FFNs after one dense layer: 1 shared + 8 routed experts, top-2.
    "quickstart-moe": _derived(_QUICKSTART, ffn_pattern="moe", first_k_dense=1, moe=dict(
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_inter_dim=192, bias_update_speed=0.001)),
    # quickstart with a PEER FFN (4096 single-neuron experts, 4 heads x 8) in every other layer.
    "quickstart-peer": _derived(_QUICKSTART, ffn_pattern="dense,peer", peer=dict(
        num_experts=4096, product_key_dim=[64, 64], num_experts_per_tok=8, num_heads=4, query_dim=64)),
    "small": _SMALL,
    # small with DeepSeekMoE FFNs (first layer dense): 2 shared + 64 routed experts of width 256, top-6.
    "small-moe": _derived(_SMALL, ffn_pattern="moe", first_k_dense=1, moe=dict(
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_inter_dim=256, bias_update_speed=0.001,
        aux_loss_coef=0.001)),
}


def preset_config(name: str) -> Config:
    """A fresh Config for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} does not exist: choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)
    return cfg


# ----------------------------------------------------------------------------- setting by dotted key
def _field_type(owner: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(owner))
    return hints[name]


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a value (a CLI string or a TOML value) to a field's declared type, or fail naming key."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} = {value!r}: must be true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be an integer")
        try:
            if isinstance(value, str):
                value = value.replace("_", "")
                return int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"{key} = {value!r}: must be an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {value!r}: must be a number") from None
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: must be a string")
    if typ is list or origin is list:
        (item_type,) = typing.get_args(typ) or (str,)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):  # CLI: `a b` or `a,b`
            value = [part for v in value for part in (v.split(",") if isinstance(v, str) else [v]) if part != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: must be a list (comma-separated on the command line)")
        return [coerce(v, item_type, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    return value


# Options that existed once: a run saved with one still loads (the key is dropped, see `config_from_dict`);
# given anew, it is an error that says why it went.
REMOVED_OPTIONS = {
    "train.muon_fuse_update": "the update in the last Newton-Schulz GEMM's epilogue measured slower on an H200 "
                              "(BENCHMARKS.md, session 13)",
}


def set_key(cfg: Any, dotted: str, value: Any) -> None:
    """Set `section.key` (any depth) on a config, converting the value to the field's type."""
    if dotted in REMOVED_OPTIONS:
        raise ConfigError(f"{dotted} was removed ({REMOVED_OPTIONS[dotted]}): delete it")
    parts = dotted.split(".")
    owner = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(owner)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            close = difflib.get_close_matches(part, sorted(names), n=3, cutoff=0.7)
            if close:
                raise ConfigError(f"unknown config key {dotted!r}: did you mean {' or '.join(close)}?")
            raise ConfigError(f"unknown config key {dotted!r}: {where} has keys {', '.join(sorted(names))}")
        if i == len(parts) - 1:
            current = getattr(owner, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section: set its keys, e.g. {dotted}.<key>")
                for k, v in value.items():
                    set_key(cfg, f"{dotted}.{k}", v)
                return
            setattr(owner, part, coerce(value, _field_type(owner, part), dotted))
        else:
            owner = getattr(owner, part)
            if not dataclasses.is_dataclass(owner):
                raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[:i + 1])} is not a section")


def apply_dict(cfg: Config, values: dict, prefix: str = "") -> None:
    """Apply a nested dict (e.g. a parsed TOML file) onto a config."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            apply_dict(cfg, value, dotted + ".")
        else:
            set_key(cfg, dotted, value)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found: give the path of a .toml file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: list[tuple[str, str]] | None = None, base: Config | None = None) -> Config:
    """Resolve preset -> TOML file -> overrides into a validated Config.

    `base` (a resumed run's saved config) replaces the preset: a preset named here must be its own."""
    file_values = load_toml(config_file) if config_file else {}
    file_preset = file_values.pop("preset", None)
    if base is not None:
        for given, where in ((preset, f"--preset {preset}"), (file_preset, f"{config_file}: preset = {file_preset!r}")):
            if given is not None and given != base.preset:
                raise ConfigError(f"{where}: the run being resumed was trained with preset {base.preset!r} and "
                                  f"continues from its config.toml: drop the preset")
        cfg = copy.deepcopy(base)
    else:
        cfg = preset_config(preset or file_preset or "quickstart")
    apply_dict(cfg, file_values)
    for key, value in overrides or []:
        set_key(cfg, key, value)
    return cfg.validate()


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with `to_toml` (a run's config.toml); options removed since are dropped."""
    values = copy.deepcopy(values)
    for dotted in REMOVED_OPTIONS:
        *sections, key = dotted.split(".")
        table = values
        for section in sections:
            table = table.get(section) if isinstance(table, dict) else None
        if isinstance(table, dict):
            table.pop(key, None)
    cfg = Config(preset=values.pop("preset", "quickstart"))
    apply_dict(cfg, values)
    return cfg.validate()


# --------------------------------------------------------------------------------------- printing
def iter_options(obj: Any = None, prefix: str = ""):
    """Yield (dotted key, type name, default, doc, choices) for every leaf option."""
    obj = obj if obj is not None else Config()
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_options(value, f"{prefix}{f.name}.")
        elif prefix:
            typ = hints[f.name]
            yield f"{prefix}{f.name}", getattr(typ, "__name__", str(typ)), value, field_doc(f), field_choices(f)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(cfg: Config) -> str:
    """Serialize a Config to TOML (sections nested with dotted table names)."""
    lines = [f"preset = {_toml_value(cfg.preset)}"]

    def emit(obj: Any, table: str) -> None:
        lines.append(f"\n[{table}]")
        nested = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((value, f"{table}.{f.name}"))
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for value, name in nested:
            emit(value, name)

    for name in ("model", "data", "train"):
        emit(getattr(cfg, name), name)
    return "\n".join(lines) + "\n"


def options_markdown() -> str:
    """docs/config.md: every config key with its type, default and doc (regenerate with
    `python -c "from moespeed.config import options_markdown; print(options_markdown(), end='')" > docs/config.md`)."""
    lines = ["# Configuration reference", "",
             "Every key, as `--section.key VALUE` on the command line or `key = value` under `[section]` in a",
             "TOML file. Generated from `moespeed/config.py` (a test checks it is current).", ""]
    section = None
    for key, type_name, default, doc, choices in iter_options():
        head = key.rsplit(".", 1)[0]
        if head != section:
            section = head
            lines += ["", f"## `{section}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        allowed = f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else ""
        lines.append(f"| `{key}` | {type_name} | `{default!r}` | {doc.replace('|', '/')}{allowed} |")
    return "\n".join(lines) + "\n"
