"""Training on several processes with torch.distributed: DDP or FSDP2, plus expert parallelism.

Launch one process per GPU with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):

    torchrun --nproc_per_node=8 -m moespeed train --preset small-moe --train.ep_size 8

Everything here is applied to a model from outside; the model code stays single-device.

Layout. The world of W = D * P ranks is a (dp, ep) mesh with P = `train.ep_size`: rank = d * P + p.
The P consecutive ranks of a row form an EP group (inside one node when P <= GPUs per node); rank p
of it holds routed experts [p*E/P, (p+1)*E/P) of every MoE layer (`moe_ep.ExpertParallel` moves the
token copies). The D ranks of a column hold the same expert shard: their expert gradients are summed
over that "expert data-parallel" group. Every other parameter (attention, dense MLPs, shared experts,
routers, embeddings) is data-parallel over the whole world. Every rank reads its own micro-batches.

Gradients. With DDP (`train.parallel = ddp`) the replicated params are averaged over the world by
DDP, skipped with `no_sync()` for all but the last micro-batch of an accumulation. FSDP2
(`train.parallel = fsdp`) shards them over the world (`fully_shard` per block, then the root;
bf16 params and fp32 gradient reduction on GPU) and reduce-scatters every micro-batch (keeping
memory sharded, at the cost of a reduce-scatter per micro-batch). EP-local experts are neither DDP's
nor FSDP's: `finish_grads()` sums their gradients over the expert data-parallel group and divides
by W, which equals DDP's world mean: the expert gradient on a rank already sums the contributions
of all P ranks of its EP group (the EP exchange of `train.ep_dispatch` brought them: all-to-all,
or all-gather + reduce-scatter).

Optimizer. Replicated and FSDP params keep Muon's default (`replicated=True`: the Newton-Schulz work
is shared over the world); EP-local experts go to their own param groups, with `replicated=False`
for Muon (each rank orthogonalizes its own experts).

Checkpoints (see `state_dict`): model and optimizer state keyed by parameter name; FSDP params are
DTensors and EP-local experts are wrapped as DTensors sharded over the ep mesh dim, so that
torch.distributed.checkpoint (DCP) writes each shard once and reads it back into any layout:
the same world size, another one, or a single process.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.moe_ep import ExpertParallel, choose_dispatch
from ..optim.build import OptimizerSet, build_optimizer
from .checkpoint import is_sharded, load_sharded, read_single_checkpoint

try:  # absent from builds without torch.distributed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP
except ImportError:  # pragma: no cover
    DTensor, DDP = (), ()


def bf16_all_reduce_hook(group, bucket):  # no annotations: DDP compares them as objects
    """DDP communication hook: average a gradient bucket over the group with a bf16 all-reduce.

    What torch's `bf16_compress_hook` does, which refuses to register without NCCL (so the CPU gloo
    tests could not run it): half the bytes of the fp32 all-reduce, one bf16 rounding per gradient."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def write_back(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(write_back)


# ------------------------------------------------------------------------------- process group
@dataclass
class DistEnv:
    """Where this process stands: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's value of obj, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """t averaged over the world, in place."""
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def close(self) -> None:
        """Leave the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group torchrun describes in the environment, or stay a single process.

    `device` is the single-process device; under torchrun a CUDA device becomes cuda:LOCAL_RANK.
    The backend is NCCL on CUDA, gloo on CPU. An already initialized process group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and world <= 1:
        return DistEnv(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not initialized:
        if device.type == "cuda":  # binding the device lets barriers and NCCL know it up front
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=not initialized)


def check_same_config(config_text: str, env: DistEnv) -> None:
    """Raise ConfigError on every rank when the ranks were given different configs (TOML texts)."""
    if not env.distributed:
        return
    texts = [None] * env.world_size
    dist.all_gather_object(texts, config_text)
    for rank, text in enumerate(texts):
        if text != texts[0]:
            ours, theirs = _toml_keys(texts[0]), _toml_keys(text)
            key = next((k for k in {**ours, **theirs} if ours.get(k) != theirs.get(k)), "?")
            raise ConfigError(f"ranks disagree on the config: rank 0 has {key} = {ours.get(key)}, rank {rank} has "
                              f"{key} = {theirs.get(key)}: give every rank the same command line and files")


def _toml_keys(text: str) -> dict[str, str]:
    """{"section.key": "value"} of a config TOML text (as `to_toml` writes it)."""
    section, keys = "", {}
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line:
            key, value = line.split(" = ", 1)
            keys[section + key] = value
    return keys


def check_layout(world: int, ep_size: int, n_routed_experts: int | None) -> None:
    """ConfigError unless train.ep_size fits the world size and the MoE layers (None: the model has none)."""
    if ep_size == 1:
        return
    if world == 1:
        raise ConfigError(f"train.ep_size = {ep_size}: expert parallelism needs several processes: launch with "
                          f"torchrun --nproc_per_node=N, N a multiple of {ep_size}")
    if world % ep_size:
        raise ConfigError(f"train.ep_size = {ep_size}: must divide the number of processes ({world})")
    if n_routed_experts is None:
        raise ConfigError(f"train.ep_size = {ep_size}: the model has no MoE layer (model.ffn_pattern): use 1")
    if n_routed_experts % ep_size:
        raise ConfigError(f"train.ep_size = {ep_size}: must divide model.moe.n_routed_experts = {n_routed_experts}")


def check_peer_tables(world: int, model_cfg) -> None:
    """ConfigError for deferred PEER table gradients with several processes: each process would
    apply only its own tokens' updates to its replica of the tables (they have no .grad to all-reduce)."""
    if world > 1 and "peer" in model_cfg.ffn_kinds() and model_cfg.peer.table_grad == "deferred":
        raise ConfigError("model.peer.table_grad = deferred works in one process only (the row-wise table updates "
                          "are not all-reduced, so replicas would drift apart): use dense with several processes")


# ------------------------------------------------------------------------------------- parallel
class Parallel:
    """A model made ready for this process group, and what the trainer needs from its parallelism.

    `model` is the plain module (its state dict, MoE layers and optimizer), `train_model` what the
    forward runs through (DDP wrapper, FSDP2 root or the model itself). A single process gets a
    no-op version of everything.
    """

    def __init__(self, model: nn.Module, tc, env: DistEnv, bf16: bool = False):
        self.model, self.env, self.tc = model, env, tc
        self.ep_size = tc.ep_size
        self.local_experts: dict[str, nn.Parameter] = {}  # name -> EP-local expert stack
        self.fsdp = env.distributed and tc.parallel == "fsdp"
        self.ddp = None
        self.train_model = model
        moes = model.moe_layers()
        check_layout(env.world_size, tc.ep_size, moes[0][1].cfg.n_routed_experts if moes else None)
        if not env.distributed:
            return
        kind = env.device.type
        self.mesh = init_device_mesh(kind, (env.world_size // self.ep_size, self.ep_size), mesh_dim_names=("dp", "ep"))
        self.world_mesh = init_device_mesh(kind, (env.world_size,), mesh_dim_names=("world",))
        if self.ep_size > 1:
            self._shard_experts()
            self._broadcast_local_experts()
        if self.fsdp:
            self._fully_shard(bf16)
        else:
            self.ddp = self.train_model = self._wrap_ddp()

    def _shard_experts(self) -> None:
        """Keep only this rank's slice of every routed expert stack; install the EP dispatcher."""
        group = self.mesh.get_group("ep")
        for _, moe in self.model.moe_layers():
            dispatch = choose_dispatch(self.tc.ep_dispatch, moe.cfg.num_experts_per_tok, self.ep_size)
            moe.expert_parallel = ExpertParallel(group, moe.cfg.n_routed_experts, dispatch, self.tc.ep_chunks,
                                                 self.tc.ep_masked_rows)
            rows = moe.expert_parallel.expert_slice()
            for name in ("w1", "w2", "w3"):
                full = getattr(moe, name)
                if full is not None:
                    setattr(moe, name, nn.Parameter(full.detach()[rows].clone()))  # (E/P, ., .)
        local = {id(getattr(moe, n)) for _, moe in self.model.moe_layers() for n in ("w1", "w2", "w3")
                 if getattr(moe, n) is not None}
        self.local_experts = {n: p for n, p in self.model.named_parameters() if id(p) in local}

    def _wrap_ddp(self) -> nn.Module:
        if self.local_experts:  # DDP neither broadcasts nor all-reduces them
            DDP._set_params_and_buffers_to_ignore_for_model(self.model, list(self.local_experts))
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # buffers (RoPE tables, expert_bias) are identical on all ranks: no broadcast per forward
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"  # torch < 2.13
        ddp = DDP(self.model, device_ids=device_ids, gradient_as_bucket_view=True,
                  bucket_cap_mb=self.tc.ddp_bucket_mb, **{no_sync: False})
        if self.tc.grad_reduce_dtype == "bf16":  # cast each bucket to bf16, all-reduce, cast back
            ddp.register_comm_hook(None, bf16_all_reduce_hook)  # None: DDP's process group
        return ddp

    def _fully_shard(self, bf16: bool) -> None:
        """FSDP2: each block is one all-gather unit, the root holds embedding, final norm and head."""
        reduce_dtype = torch.bfloat16 if self.tc.grad_reduce_dtype == "bf16" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=reduce_dtype)
        local_ids = {id(p) for p in self.local_experts.values()}
        for module in [*self.model.blocks, self.model]:
            ignored = {p for p in module.parameters() if id(p) in local_ids}
            kwargs = {"ignored_params": ignored} if ignored else {}  # EP-local experts stay whole and local
            fully_shard(module, mesh=self.world_mesh, mp_policy=policy, **kwargs)

    def _broadcast_local_experts(self) -> None:
        """Same init for the replicas of an expert shard (DDP does this for the params it owns)."""
        if self.local_experts and self.mesh.size(0) > 1:
            group = self.mesh.get_group("dp")
            for p in self.local_experts.values():
                dist.broadcast(p.data, src=dist.get_global_rank(group, 0), group=group)

    def describe(self) -> str:
        if not self.env.distributed:
            return f"single process on {self.env.device}"
        kind = "FSDP2" if self.fsdp else "DDP"
        text = f"{kind} over {self.env.world_size} ranks ({self.env.device.type})"
        if self.ep_size > 1:
            moe = self.model.moe_layers()[0][1]
            text += (f", expert parallel ({moe.expert_parallel.dispatch}) over groups of {self.ep_size} ranks "
                     f"({moe.expert_parallel.n_local} of {moe.cfg.n_routed_experts} routed experts per rank), "
                     f"data parallel over "
                     f"{self.env.world_size // self.ep_size}")
        return text

    # ---------------------------------------------------------------------------- training step
    def build_optimizer(self, tc) -> tuple[OptimizerSet, str]:
        """`build_optimizer` of the model, with EP-local experts in their own param groups."""
        optimizer, summary = build_optimizer(self.model, tc)
        if self.local_experts:
            _separate_rank_local(optimizer, {id(p) for p in self.local_experts.values()})
            summary += f"\n  ({len(self.local_experts)} expert-parallel tensors in rank-local groups)"
        return optimizer, summary

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """Context of one micro-batch's forward and backward: DDP all-reduces only on the last one."""
        if self.ddp is not None and not last:
            with self.ddp.no_sync():
                yield
        else:
            yield

    @torch.no_grad()
    def finish_grads(self) -> None:
        """After the last micro-batch: sum EP-local expert grads over their replicas, divide by W."""
        if not self.local_experts:
            return
        group, replicas = self.mesh.get_group("dp"), self.mesh.size(0)
        for p in self.local_experts.values():
            if p.grad is None:  # no token reached these experts on this rank
                p.grad = torch.zeros_like(p)
            if replicas > 1:
                dist.all_reduce(p.grad, group=group)
        torch._foreach_div_([p.grad for p in self.local_experts.values()], self.env.world_size)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale all grads so their global L2 norm is at most max_norm; returns the norm before.

        Norms and scaling are foreach ops (a handful of kernels, not a few per param): the launches
        of a per-param loop cost milliseconds of CPU per step, which DDP's short steps cannot hide.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not self.env.distributed:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        local_ids = {id(p) for p in self.local_experts.values()}
        shards = [p.grad.to_local() for p in params if isinstance(p.grad, DTensor)]  # FSDP shards
        local = [p.grad for p in params if id(p) in local_ids]  # identical on the mesh.size(0) replicas
        replicated = [p.grad for p in params if not isinstance(p.grad, DTensor) and id(p) not in local_ids]
        spread = _squared_norm(shards, self.env.device) + _squared_norm(local, self.env.device) / self.mesh.size(0)
        if self.fsdp or local_ids:
            dist.all_reduce(spread)  # summed over the world
        total = (_squared_norm(replicated, self.env.device) + spread).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(shards + local + replicated, coef)
        return total

    @torch.no_grad()
    def reduce_moe_counts(self) -> None:
        """Sum every MoE layer's load counters over the world, so load metrics cover all tokens."""
        if not self.env.distributed:
            return
        for _, moe in self.model.moe_layers():
            for counts in (moe._load_counts, moe._dropped):
                if counts is not None:
                    dist.all_reduce(counts)

    def routed_expert_bytes(self, optimizer: OptimizerSet) -> dict:
        """Bytes on this rank of the routed experts' params and optimizer state."""
        stacks = [getattr(moe, n) for _, moe in self.model.moe_layers() for n in ("w1", "w2", "w3")]
        stacks = [p for p in stacks if p is not None]
        ids = {id(p) for p in stacks}
        params = sum(_local(p).numel() * p.element_size() for p in stacks)
        state = sum(_local(t).numel() * t.element_size() for opt in optimizer.optimizers.values()
                    for p, s in opt.state.items() if id(p) in ids for t in s.values() if torch.is_tensor(t))
        return {"routed_expert_params": sum(_local(p).numel() for p in stacks),
                "routed_expert_param_bytes": params, "routed_expert_optimizer_bytes": state}

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self, optimizer: OptimizerSet) -> dict:
        """Model and optimizer state keyed by parameter name (tensors shared with the live ones).

        {"model": {name: tensor}, "optim": {"adamw"|"muon": {param name: {state key: tensor}}}}.
        Sharded tensors are DTensors, so DCP saves and loads them in any layout. Param groups are
        not saved: their hyperparameters come from the config.
        """
        if self.fsdp:  # after a forward without backward (eval) the root still holds unsharded params
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        names = {id(p): n for n, p in self.model.named_parameters()}
        model = {k: self._global(k, v) for k, v in self.model.state_dict().items()}
        optim = {}
        for opt_name, opt in optimizer.optimizers.items():
            optim[opt_name] = {names[id(p)]: {k: self._global(names[id(p)], v) if torch.is_tensor(v) and v.ndim else v
                                              for k, v in state.items()}
                               for p, state in opt.state.items()}
        return {"model": model, "optim": optim}

    def _global(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """An EP-local expert stack (or its optimizer state) as a DTensor of the full (E, ., .) stack."""
        if name not in self.local_experts:
            return t
        return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def load_checkpoint(self, ckpt: Path, optimizer: OptimizerSet) -> None:
        """Load model and optimizer state from a checkpoint of any world size or layout."""
        _init_optimizer_state(optimizer)
        target = self.state_dict(optimizer)
        if is_sharded(ckpt):
            load_sharded(ckpt, target, self.env.distributed)
        else:
            _copy_full(target, self._single_process_state(ckpt), str(ckpt))

    def _single_process_state(self, ckpt: Path) -> dict:
        """A single-process checkpoint (model.pt, optimizer.pt) in the layout of `state_dict`."""
        model, optim = read_single_checkpoint(ckpt)
        reference, _ = build_optimizer(self.model, self.tc)  # the grouping and order it was saved with
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {"model": model, "optim": {}}
        for opt_name, saved in optim.items():
            if opt_name not in reference.optimizers:
                raise CheckpointError(f"{ckpt}: holds {opt_name} state but train.optimizer = {self.tc.optimizer}: "
                                      "resume with the optimizer the run was trained with")
            groups = zip(saved["param_groups"], reference.optimizers[opt_name].param_groups)
            id_to_name = {i: names[id(p)] for saved_g, g in groups for i, p in zip(saved_g["params"], g["params"])}
            out["optim"][opt_name] = {id_to_name[i]: state for i, state in saved["state"].items()}
        return out


def parallelize(model: nn.Module, tc, env: DistEnv, bf16: bool = False) -> Parallel:
    """Apply `train.parallel` and `train.ep_size` to a model (built the same way on every rank)."""
    return Parallel(model, tc, env, bf16)


def write_parallel_info(run_dir: Path, par: Parallel, optimizer: OptimizerSet) -> None:
    """run_dir/parallel.json: the layout and this rank's routed-expert memory (rank 0 writes it)."""
    info = {"world_size": par.env.world_size, "parallel": "fsdp" if par.fsdp else ("ddp" if par.ddp else "none"),
            "ep_size": par.ep_size, **par.routed_expert_bytes(optimizer)}
    if par.ep_size > 1:
        info["ep_dispatch"] = par.model.moe_layers()[0][1].expert_parallel.dispatch
    if par.env.is_main:
        (Path(run_dir) / "parallel.json").write_text(json.dumps(info, indent=1) + "\n")


# ---------------------------------------------------------------------------------------- helpers
def _squared_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all entries, in fp32, as a 0-d tensor on device (foreach: few launches)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _separate_rank_local(optimizer: OptimizerSet, local_ids: set[int]) -> None:
    """Move rank-local params into param groups of their own (Muon: `replicated=False`).

    Separate groups also keep AdamW's foreach/fused kernels from mixing FSDP DTensors and plain
    tensors. Call before the first step (no state exists yet).
    """
    for opt in optimizer.optimizers.values():
        for group in list(opt.param_groups):
            local = [p for p in group["params"] if id(p) in local_ids]
            if not local:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in local_ids]
            if not group["params"]:
                opt.param_groups.remove(group)
            options = {k: v for k, v in group.items() if k != "params"}
            if "replicated" in options:
                options["replicated"] = False
            opt.add_param_group({**options, "params": local})


@torch.no_grad()
def _init_optimizer_state(optimizer: OptimizerSet) -> None:
    """Create every state tensor (one step with zero grads at lr 0) so a checkpoint can fill them."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _copy_full(target: dict, full: dict, where: str, prefix: str = "") -> None:
    """Copy full (unsharded) tensors into the tensors of `target`, each rank taking its shard."""
    for key, dst in target.items():
        name = f"{prefix}{key}"
        if key not in full:
            raise CheckpointError(f"{where}: has no {name}: it does not fit this model and optimizer")
        src = full[key]
        if isinstance(dst, dict):
            _copy_full(dst, src, where, name + ".")
        elif torch.is_tensor(dst):
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(src.shape)}, this model {tuple(dst.shape)}")
            if isinstance(dst, DTensor):
                src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements,
                                        src_data_rank=None).to_local()
                dst = dst.to_local()
            dst.copy_(src)
