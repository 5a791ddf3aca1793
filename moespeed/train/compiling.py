"""torch.compile for training, over the whole model or block by block (`train.compile_scope`)."""
from __future__ import annotations

import torch
from torch import nn

COMPILE_SCOPES = ("model", "blocks")
# The passes torch's Inductor config recommends for reorder_for_compute_comm_overlap (torch >= 2.9)
OVERLAP_PASSES = ("reorder_communication_preserving_peak_memory", "sink_waits_iterative",
                  "reorder_communication_preserving_peak_memory")


def compile_for_training(run_model: nn.Module, model: nn.Module, scope: str, overlap: bool = False) -> nn.Module:
    """What the training forward should call.

    run_model is what the step runs (the model, or its DDP / FSDP2 wrapper); model the plain
    Transformer inside it. "model": one compiled graph around run_model (under DDP, Dynamo's
    DDPOptimizer splits it at the gradient buckets). "blocks": each of model's blocks is compiled in
    place (`nn.Module.compile`), embedding, head and loss stay eager, and run_model is returned as it
    is: the wrapper's hooks see each block's gradients as soon as its compiled backward ends.
    overlap: `train.compile_overlap`.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}")
    if overlap:  # Inductor moves collectives earlier and their waits later, past independent work
        inductor = torch._inductor.config
        inductor.reorder_for_compute_comm_overlap = True
        inductor.reorder_for_compute_comm_overlap_passes = list(OVERLAP_PASSES)
    if scope == "model":
        return torch.compile(run_model)
    # Inside DDP's forward Dynamo would hand every block graph to its DDPOptimizer, which splits
    # graphs at bucket boundaries for a whole-model compile; per block that only adds graphs.
    torch._dynamo.config.optimize_ddp = False
    # One code object (Block.forward) serves every block, and Dynamo specializes it per block kind
    # (dense or MoE FFN, window slot), per train/eval mode and per state of the context's lazily built
    # masks: more than the default 8 variants, after which it would silently run blocks eagerly.
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(model.blocks))
    torch._dynamo.config.recompile_limit = limit
    for block in model.blocks:
        block.compile()
    return run_model
