"""Parameter grouping and the optimizer: one place decides which parameter gets what.

- `train.optimizer = adamw`: AdamW everywhere.
- `train.optimizer = muon`: Muon for hidden matrices (attention projections, MLP and expert weights,
  2-D and stacked 3-D; see `muon_eligible`), AdamW for embeddings, the head, norms, biases, scalars,
  router vectors and PEER's expert tables (embedding-like: each step touches a few rows).
AdamW's weight decay skips norms, biases, embeddings, the head and scalars. Every group records its
peak lr as `base_lr`; the trainer multiplies it by the schedule's factor. The grouping is printed
at start-up.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import ConfigError
from .muon import NS_COEFFICIENTS, Muon, muon_eligible
from .polar_express import polar_express_coefficients


def no_decay(name: str, param: nn.Parameter) -> bool:
    """True for parameters that must not be weight-decayed."""
    if getattr(param, "_no_weight_decay", False):
        return True
    if name.split(".")[-1] in ("gate", "router"):  # MoE router vectors
        return True
    return param.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".bias") or name.startswith("head.")


class OptimizerSet:
    """Several optimizers stepped as one (Muon + AdamW), with one state_dict.

    `adamw_side_stream`: on CUDA, AdamW steps on a side stream while the others (Muon) step on the
    current one, so its memory-bound kernels can run beside Muon's GEMMs instead of before them; the
    current stream waits for it at the end (ignored off CUDA, alone, and with DTensor params)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], adamw_side_stream: bool = False):
        self.optimizers = optimizers
        self.adamw_side_stream = adamw_side_stream
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # AdamW's side stream, if it has one
        self._stream_decided = False  # at the first step: the param groups are set by then

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        stream = self._adamw_stream()
        if stream is None:
            for opt in self.optimizers.values():
                opt.step()
            return
        current = torch.cuda.current_stream(stream.device)
        stream.wait_stream(current)  # the grads are ready
        with torch.cuda.stream(stream):
            self.optimizers["adamw"].step()
        for name, opt in self.optimizers.items():
            if name != "adamw":
                opt.step()
        current.wait_stream(stream)  # later work (zero_grad frees the grads) waits for AdamW

    def _adamw_stream(self):
        """AdamW's side stream, or None (option off, not CUDA, nothing beside it, DTensors); the param
        scan runs once, at the first step."""
        if not self._stream_decided:
            self._stream_decided = True
            adamw = self.optimizers.get("adamw")
            params = [p for g in adamw.param_groups for p in g["params"]] if adamw is not None else []
            if (self.adamw_side_stream and len(self.optimizers) > 1 and params and params[0].device.type == "cuda"
                    and not any(isinstance(p, DTensor) for p in params)):
                self._streams[params[0].device] = torch.cuda.Stream(params[0].device)
        return next(iter(self._streams.values()), None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state has {sorted(state)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def check_muon_device(tc, device: torch.device) -> None:
    """One clear line for `train.muon_ns_gemm = triton` or `tma` off CUDA (their GEMMs are GPU kernels)."""
    if (tc.optimizer == "muon" and tc.muon_ns_gemm in ("triton", "tma") and device.type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError(f"train.muon_ns_gemm = {tc.muon_ns_gemm} runs on CUDA GPUs, and training runs on {device.type}: "
                          "use auto (Triton GEMMs on CUDA, torch elsewhere) or torch")


def build_optimizer(model: nn.Module, tc) -> tuple[OptimizerSet, str]:
    """The optimizer of a model for a TrainConfig, and a summary of the grouping."""
    muon, decay, keep, peer_tables = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_peer_table_grad", None) is not None:  # PEER tables with deferred gradients
            peer_tables.append(p)
        elif tc.optimizer == "muon" and muon_eligible(name, p):
            muon.append(p)
        elif no_decay(name, p):
            keep.append(p)
        else:
            decay.append(p)
    fused = next(model.parameters()).is_cuda or None
    adamw_groups = [g for g in ({"params": decay, "weight_decay": tc.weight_decay, "base_lr": tc.lr},
                                {"params": keep, "weight_decay": 0.0, "base_lr": tc.lr}) if g["params"]]
    optimizers = {"adamw": torch.optim.AdamW(adamw_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused)}
    lines = [f"  AdamW wd={g['weight_decay']}: {len(g['params'])} tensors, "
             f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M params" for g in adamw_groups]
    if peer_tables:
        from ..model.peer import PEERTableOptimizer
        optimizers["peer_tables"] = PEERTableOptimizer([{"params": peer_tables, "base_lr": tc.lr}], lr=tc.lr,
                                                       betas=(tc.beta1, tc.beta2))
        lines.append(f"  PEER tables (lazy row-wise AdamW, deferred grads): {len(peer_tables)} tensors, "
                     f"{sum(p.numel() for p in peer_tables) / 1e6:.2f}M params")
    if muon:
        check_muon_device(tc, muon[0].device)
        muon_lr = tc.muon_lr or tc.lr
        coefficients = (polar_express_coefficients(tc.muon_ns_steps, tc.muon_ns_lowest)
                        if tc.muon_ns_coefficients == "polar_express" else NS_COEFFICIENTS)
        optimizers["muon"] = Muon([{"params": muon, "base_lr": muon_lr}], lr=muon_lr, weight_decay=tc.weight_decay,
                                  momentum=tc.muon_momentum, ns_steps=tc.muon_ns_steps, ns_coefficients=coefficients,
                                  adjust_lr_fn=tc.muon_adjust_lr,
                                  ns_gemm=tc.muon_ns_gemm, streams=tc.muon_streams, batch_numel=tc.muon_batch_numel,
                                  ns_method=tc.muon_ns_method, share=tc.muon_share,
                                  momentum_dtype=getattr(torch, tc.muon_momentum_dtype), cuda_graph=tc.muon_cuda_graph,
                                  stack_batches=tc.muon_stack_batches, ns_fp8_steps=int(tc.muon_ns_fp8_first_step))
        lines.insert(0, f"  Muon lr={muon_lr} ({tc.muon_adjust_lr}) wd={tc.weight_decay}, {tc.muon_ns_steps} NS steps "
                        f"({tc.muon_ns_coefficients}): {len(muon)} tensors, "
                        f"{sum(p.numel() for p in muon) / 1e6:.2f}M params"
                        + (", step as a CUDA graph (one process)" if tc.muon_cuda_graph and muon[0].is_cuda else ""))
    return OptimizerSet(optimizers, tc.adamw_side_stream), "optimizer groups:\n" + "\n".join(lines)
