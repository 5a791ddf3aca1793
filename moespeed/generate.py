"""Sampling (temperature, top-k, nucleus) and the static decode step (compiled, CUDA-graphed)."""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> sampled token ids (B,). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0: a tiny temperature cannot overflow
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


STEP_MODES = ("eager", "compile", "graph", "compile_graph")


def make_step(model, caches, token: torch.Tensor, pos: torch.Tensor, mode: str):
    """run() -> (B, V) logits: one decode step of the (B, 1) token buffer at the 0-d position buffer.

    The caches are static (`model.new_cache`), so the step has fixed shapes and addresses: write
    the next token into `token` and its position into `pos`, then call run().
    mode: eager | compile (torch.compile fuses the step's many small ops) | graph (the eager ops
    captured in a CUDA graph) | compile_graph (compiled, then captured; the fastest on GPUs).
    Warm-up steps write the same token at the same position as the real step, so the caches stay
    as the caller prepared them.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"decode step mode {mode!r}: use one of {', '.join(STEP_MODES)}")

    def step(token, pos):
        h = model.hidden_states(token, caches=caches, start_pos=pos)  # (B, 1, D)
        return model.logits(h[:, -1])  # (B, V)

    fn = step if mode in ("eager", "graph") else torch.compile(step, fullgraph=True, dynamic=False)
    if not mode.endswith("graph"):
        return lambda: fn(token, pos)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(token, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = fn(token, pos)
    return lambda: (graph.replay(), logits)[1]
