"""torch.distributed on CPU (gloo): expert parallelism, DDP, FSDP2 and DCP checkpoints.

The layer test starts 4 processes (2 EP groups of 2). The training tests share one `torchrun` launch
of 2 processes that runs several `moespeed train` command lines in turn (imports paid once) and
compare with one process that accumulates the same global batch.
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moespeed.bench.distributed import OneMoE
from moespeed.config import TrainConfig, build_config
from moespeed.errors import ConfigError
from moespeed.model.moe import MoE, MoEConfig
from moespeed.model.moe_ep import choose_dispatch
from moespeed.run import load
from moespeed.train.checkpoint import is_sharded, list_checkpoints
from moespeed.train.distributed import DistEnv, check_peer_tables, check_same_config, parallelize
from moespeed.train.trainer import Trainer

from helpers import free_port, gloo_worker, tiny_train_args, write_corpus

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


# ------------------------------------------------------------------ expert-parallel MoE layer
def _objective(y, aux, dy, n_tokens):
    """A loss like the LM's: mean over the tokens of y * dy summed over D, plus the aux loss."""
    return (y * dy).sum() / n_tokens + aux


# (train.ep_dispatch, model.moe.dispatch, train.ep_chunks): allgather's sentinel rows must not leak
# into the results, neither as grouped_mm's uninitialized rows nor as padded_bmm's extra blocks; in
# pieces (ep_chunks 3 over 16 tokens: uneven), the same results
EP_LAYER_PATHS = [("alltoall", "auto", 1), ("allgather", "padded_bmm", 1), ("allgather", "grouped_mm", 1),
                  ("allgather", "padded_bmm", 3)]
EP_MASKED_PATHS = [("allgather", "padded_bmm", 1), ("allgather", "grouped_mm", 3)]  # train.ep_masked_rows


def _ep_layer_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    with gloo_worker(rank, world, port, timeout_s=60):  # a hang fails instead
        # a clear error when the ranks disagree on the config
        with pytest.raises(ConfigError, match="rank 0 has train.steps = 200, rank 3 has train.steps = 300"):
            check_same_config(f"[train]\nsteps = {300 if rank == 3 else 200}\n", DistEnv(rank, world))
        paths = [p + (False,) for p in EP_LAYER_PATHS] + [p + (True,) for p in EP_MASKED_PATHS]
        for ep_dispatch, mode, chunks, masked in paths:
            cfg = MoEConfig(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_inter_dim=16,
                            activation="swiglu", aux_loss_coef=0.1, seq_aux_loss_coef=0.05, z_loss_coef=0.01,
                            dispatch=mode)
            for case in ("random", "rank 1 of each EP group receives nothing"):
                _check_ep_layer(rank, world, cfg, ep_dispatch, f"{ep_dispatch}/{mode}/{chunks}/masked={masked}, {case}",
                                case != "random", chunks, masked)


def _check_ep_layer(rank: int, world: int, cfg: MoEConfig, ep_dispatch: str, case: str, skewed: bool,
                    chunks: int = 1, masked: bool = False) -> None:
    """EP=2 x DP=2 layer vs one process: output, aux loss, input, router, shared and expert grads."""
    torch.manual_seed(0)  # the same layer and batch on every rank
    ref = MoE(24, cfg)
    if skewed:  # bias the selection to experts 0 and 1 (held by EP rank 0)
        ref.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    ref.train()
    x, dy = torch.randn(2 * world, 8, 24), torch.randn(2 * world, 8, 24)  # (B, T, D): 2 sequences per rank
    ep_model = OneMoE(copy.deepcopy(ref))
    # one process: the batch of each EP group in turn (the balance loss covers one EP group's tokens)
    x_ref = x.clone().requires_grad_()
    y_ref, aux_ref = [], []
    for group in (slice(0, 4), slice(4, 8)):
        y, aux = ref(x_ref[group])
        _objective(y, aux / 2, dy[group], x.shape[0] * x.shape[1]).backward()
        y_ref.append(y.detach())
        aux_ref.append(aux.detach())
    y_ref, aux_ref = torch.cat(y_ref), aux_ref[rank // 2]  # (B, T, D), this rank's EP group's aux
    # expert parallel: EP groups {0, 1}, {2, 3}; data parallel over the groups
    par = parallelize(ep_model, TrainConfig(ep_size=2, ep_dispatch=ep_dispatch, ep_chunks=chunks,
                                            ep_masked_rows=masked), DistEnv(rank, world))
    mine = slice(2 * rank, 2 * rank + 2)
    x_ep = x[mine].clone().requires_grad_()
    with par.micro_step(last=False):  # accumulation: DDP skips its all-reduce
        assert not par.ddp.require_backward_grad_sync
    with par.micro_step(last=True):
        assert par.ddp.require_backward_grad_sync
    y_ep, aux_ep = par.train_model(x_ep)
    _objective(y_ep, aux_ep, dy[mine], x_ep.shape[0] * x_ep.shape[1]).backward()  # DDP averages over ranks
    par.finish_grads()
    moe, shard = ep_model.moe, slice(2 * (rank % 2), 2 * (rank % 2) + 2)
    assert moe.w1.shape[0] == 2 and moe.expert_parallel.dispatch == ep_dispatch
    assert moe.expert_parallel.chunks == chunks
    assert moe.expert_parallel.masked_rows == masked
    assert (ref._load_counts[2:].sum() == 0) == skewed  # nothing for EP rank 1
    close = dict(rtol=1e-4, atol=1e-6, msg=lambda m: f"{case}, rank {rank}: {m}")
    torch.testing.assert_close(y_ep, y_ref[mine], **close)
    aux_mean = aux_ep.detach().clone()
    dist.all_reduce(aux_mean, group=moe.expert_parallel.group)
    torch.testing.assert_close(aux_mean / 2, aux_ref, **close)
    torch.testing.assert_close(x_ep.grad, x_ref.grad[mine] * world, **close)
    for name in ("gate", "shared.w1.weight", "shared.w2.weight", "shared.w3.weight"):
        torch.testing.assert_close(moe.get_parameter(name).grad, ref.get_parameter(name).grad, **close)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(moe, name).grad, getattr(ref, name).grad[shard], **close)
        assert getattr(ref, name).grad[shard].abs().sum() > 0 or skewed


def test_expert_parallel_layer_matches_single_process():
    """EP=2 x DP=2 on 4 processes, each dispatcher: outputs, aux loss and every gradient equal the
    one-process layer's."""
    # spawn, not fork: a forked child cannot use CUDA (GPU machines) or, on torch 2.11, autograd once
    # the parent has run them, as earlier tests do
    mp.start_processes(_ep_layer_worker, args=(4, free_port()), nprocs=4, start_method="spawn")


def _ep_compile_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    with gloo_worker(rank, world, port, timeout_s=120):
        cfg = MoEConfig(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_inter_dim=16,
                        activation="swiglu", aux_loss_coef=0.1, dispatch="padded_bmm")  # grouped_mm: bf16 CUDA only under compile
        torch.manual_seed(0)
        models = [OneMoE(MoE(24, cfg)) for _ in range(4)]
        for model in models[1:]:
            model.load_state_dict(models[0].state_dict())
        for model, chunks, masked in zip(models, (1, 1, 2, 2), (False, False, False, True)):  # EP=2, no DP
            parallelize(model, TrainConfig(ep_size=2, ep_dispatch="allgather", ep_chunks=chunks,
                                           ep_masked_rows=masked), DistEnv(rank, world))
        torch.manual_seed(1 + rank)
        x, dy = torch.randn(2, 8, 24), torch.randn(2, 8, 24)
        results = []
        for model, compiled in zip(models, (False, True, True, True)):  # the last two in 2 pieces, the last masked
            # fullgraph: the whole layer, collectives included, is one graph (a break raises)
            run = torch.compile(model.moe, backend="aot_eager", fullgraph=True) if compiled else model.moe
            xr = x.clone().requires_grad_()
            y, aux = run(xr)
            _objective(y, aux, dy, 16).backward()
            results.append((y.detach(), xr.grad, model.moe.w1.grad, model.moe.gate.grad))
        for eager, compiled, chunked, masked in zip(*results):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(chunked, eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(masked, eager, rtol=1e-5, atol=1e-6)


def test_allgather_expert_parallel_layer_compiles_as_one_graph():
    """The allgather dispatcher has no host sync and uses functional collectives, so torch.compile
    traces the EP layer whole (fullgraph), also in 2 pieces (ep_chunks) and with the masked-row custom
    ops (ep_masked_rows), and matches eager in outputs and gradients."""
    mp.start_processes(_ep_compile_worker, args=(2, free_port()), nprocs=2, start_method="spawn")  # not fork: see above


def test_deferred_peer_tables_are_refused_with_several_processes():
    cfg = build_config("quickstart-peer", None, [("model.peer.table_grad", "deferred")]).model
    check_peer_tables(1, cfg)  # one process: fine
    with pytest.raises(ConfigError, match="model.peer.table_grad = deferred works in one process only"):
        check_peer_tables(2, cfg)
    check_peer_tables(2, build_config("quickstart-peer", None, None).model)  # dense tables: fine


def test_ep_dispatch_auto_and_validation():
    """auto: allgather when top-k >= ep_size (fewer bytes than all-to-all), else alltoall; bad values fail."""
    assert choose_dispatch("auto", top_k=6, ep_size=2) == "allgather"
    assert choose_dispatch("auto", top_k=6, ep_size=6) == "allgather"
    assert choose_dispatch("auto", top_k=6, ep_size=8) == "alltoall"
    assert choose_dispatch("alltoall", top_k=6, ep_size=2) == "alltoall"
    with pytest.raises(ConfigError, match="train.ep_dispatch = 'scatter': allowed are auto | alltoall | allgather"):
        TrainConfig(ep_dispatch="scatter").validate()
    with pytest.raises(ConfigError, match="train.ep_dispatch"):
        build_config("quickstart", None, [("train.ep_dispatch", "scatter")])


# ------------------------------------------------------------------------- training end to end
MOE_ARGS = ["--model.ffn_pattern", "moe", "--model.first_k_dense", "1", "--model.moe.n_routed_experts", "4",
            "--model.moe.moe_inter_dim", "32", "--model.moe.aux_loss_coef", "0",
            "--model.moe.bias_update_speed", "0.01", "--train.optimizer", "muon"]


def _args(data, run, cache, **overrides) -> list[str]:
    """CLI args of a 4-step MoE run with checkpoints at steps 2 and 4 (one batch of 8 sequences per step)."""
    args = tiny_train_args(data, run, cache, steps=4) + MOE_ARGS
    # muon_lr as low as lr: the bf16 Newton-Schulz rounding differences checked below scale with it
    for key, value in {"train.eval_every": 2, "train.ckpt_every": 2, "train.muon_lr": 3e-3, **overrides}.items():
        args += [f"--{key}", str(value)]
    return args


PEER_ARGS = ["--model.ffn_pattern", "dense,peer", "--model.first_k_dense", "0", "--model.peer.num_experts", "256",
             "--model.peer.product_key_dim", "16,16", "--model.peer.num_heads", "2",
             "--model.peer.num_experts_per_tok", "4", "--model.peer.query_dim", "16"]  # replace the MoE layers


def _config(args: list[str]):
    pairs = [(k[2:], [v] if k == "--data.data" else v) for k, v in zip(args[::2], args[1::2])]
    return build_config("quickstart", None, pairs)


def _run_distributed(plan: list[dict], cwd: Path) -> None:
    """Run a plan of trainings in ONE `torchrun` launch of 2 processes (see `_driver`)."""
    (cwd / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(cwd / "plan.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _driver(plan_path: str) -> None:
    """Under torchrun: each plan item runs `moespeed train ARGS` (the CLI, in this process) and checks
    its exit status, or copies a run directory; one launch pays the imports once for all runs."""
    from moespeed.cli import main

    dist.init_process_group("gloo")
    for item in json.loads(Path(plan_path).read_text()):
        if "copy_until" in item:
            if dist.get_rank() == 0:
                _copy_until(Path(item["copy_until"][0]), Path(item["copy_until"][1]), item["copy_until"][2])
            dist.barrier()
            continue
        status = main(["train", *item["args"]])
        if status != item.get("status", 0):
            raise SystemExit(f"rank {dist.get_rank()}: `moespeed train {' '.join(item['args'])}` exited {status}")
    dist.barrier()  # no rank tears gloo down while the other still talks
    dist.destroy_process_group()


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load(run)[0].state_dict()  # either checkpoint format, read by one process


def _assert_same_training(run: Path, ref: Path, steps) -> None:
    a, b = _losses(run), _losses(ref)
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a, b)
    pa, pb = _params(run), _params(ref)
    for key in pb:  # Muon's Newton-Schulz runs in bf16: rounding differences of ~1e-4 are expected
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=1e-3, msg=lambda m: f"{run.name} {key}: {m}")


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A copy of a run directory whose latest checkpoint is step-<step>."""
    shutil.copytree(src, dst)
    for ckpt in dst.glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process reference (grad_accum 2, batches of 4) and, in one torchrun launch of 2 processes:
    expert parallel (alltoall, then allgather), DDP with accumulation, a same-size EP resume, FSDP2
    continuing the reference's step-2, FSDP2 with expert parallelism (allgather), and a layout error."""
    root = tmp_path_factory.mktemp("dist")
    data, cache = write_corpus(root / "src"), root / "cache"
    Trainer(_config(_args(data, root / "ref", cache, **{"train.grad_accum": 2}))).fit()
    Trainer(_config(_args(data, root / "ref-peer", cache, **{"train.grad_accum": 2}) + PEER_ARGS)).fit()
    _copy_until(root / "ref", root / "fsdp", 2)
    ep = _args(data, root / "ep", cache, **{"train.ep_size": 2, "train.ep_dispatch": "alltoall"})
    _run_distributed([
        {"args": ep},
        {"args": _args(data, root / "ep-allgather", cache, **{"train.ep_size": 2})},  # auto: top-2 >= 2 ranks
        {"args": _args(data, root / "ddp", cache, **{"data.batch_size": 2, "train.grad_accum": 2})},
        {"args": _args(data, root / "ddp-bf16", cache, **{"data.batch_size": 2, "train.grad_accum": 2,
                                                          "train.grad_reduce_dtype": "bf16"})},
        {"copy_until": [str(root / "ep"), str(root / "ep-resumed"), 2]},
        {"args": _args(data, root / "ep-resumed", cache, **{"train.ep_size": 2, "train.ep_dispatch": "alltoall"})
         + ["--resume"]},
        # a resume starts from the run's config.toml (the reference's grad_accum 2): 2 ranks x 1 = its 8 sequences
        {"args": _args(data, root / "fsdp", cache, **{"train.parallel": "fsdp", "train.grad_accum": 1}) + ["--resume"]},
        {"args": _args(data, root / "fsdp-ep", cache, **{"train.parallel": "fsdp", "train.ep_size": 2})},
        {"args": _args(data, root / "bad", cache, **{"train.ep_size": 3}), "status": 2},
        {"args": _args(data, root / "ddp-peer", cache, **{"data.batch_size": 2, "train.grad_accum": 2}) + PEER_ARGS},
        {"args": _args(data, root / "bad-peer", cache) + PEER_ARGS + ["--model.peer.table_grad", "deferred"],
         "status": 2},
    ], root)
    return data, cache, root


def test_ddp_no_sync_accumulation_matches_one_process(runs):
    """DDP, 2 processes x 2 micro-batches of 2 sequences = one process x 2 micro-batches of 4."""
    _, _, root = runs
    _assert_same_training(root / "ddp", root / "ref", steps=[1, 2, 3, 4])


def test_ddp_bf16_gradient_reduction_stays_close_to_one_process(runs):
    """`train.grad_reduce_dtype = bf16` (DDP's bf16 compression hook): the gradients are rounded to
    bf16 once per all-reduce, so the run differs from the fp32 one, but only at bf16's precision."""
    _, _, root = runs
    a, b, exact = _losses(root / "ddp-bf16"), _losses(root / "ref"), _losses(root / "ddp")
    for s in (1, 2, 3, 4):
        assert a[s] == pytest.approx(b[s], rel=1e-3), (s, a, b)
    assert any(a[s] != exact[s] for s in (2, 3, 4)), "bf16 reduction changed nothing: the hook is not active"
    pa, pb = _params(root / "ddp-bf16"), _params(root / "ref")
    # Muon's orthogonalization magnifies the rounding in weak gradient directions, and a near tie in
    # MoE routing may flip: after 4 steps single params measured up to 8.8e-3 relative (the router once
    # 2.3e-2, a flipped top-k), all params together 5.3e-4 to 6.6e-4 (2026-12-02, CPU, several runs).
    # The bounds leave room for that; a dropped rank or a param left out of the reduction is far off.
    # `expert_bias` moves by exactly +-gamma or 0 per step (the sign of each expert's load against the
    # mean), so one token routed differently can move an entry by gamma: a relative norm means nothing
    # on it (it measured 0.35 once: two of 4 entries 0.01 apart). Its entries are held to 2 gamma.
    gamma = float(MOE_ARGS[MOE_ARGS.index("--model.moe.bias_update_speed") + 1])
    weights = [k for k in pb if not k.endswith("expert_bias")]
    for key in pb:
        if key not in weights:
            assert (pa[key].float() - pb[key].float()).abs().max() <= 2 * gamma + 1e-6, (key, pa[key], pb[key])
            continue
        diff = (pa[key].float() - pb[key].float()).norm() / pb[key].float().norm().clamp(min=1e-12)
        assert diff < 0.1, (key, diff.item())
    total = sum((pa[k].float() - pb[k].float()).norm() ** 2 for k in weights) ** 0.5
    assert total / sum(pb[k].float().norm() ** 2 for k in weights) ** 0.5 < 5e-3


def test_ddp_trains_peer_tables_like_one_process(runs):
    """PEER layers (dense table gradients, all-reduced by DDP) on 2 processes = one process.

    Parameters are compared by the relative norm of their difference (<= 2e-2 after 4 steps): the
    batch split changes fp32 summation orders, a near-tie in a head's top-k then picks another
    expert, and AdamW's per-element normalization turns the tiny gradients of such rows into
    differences of up to ~lr per step (measured: 1e-3 to 3e-3 relative on single tensors, and once
    1.12e-2 on a PEER table, `blocks.1.mlp.down`, where more rows flipped). A reduction that sums
    instead of averaging, or drops a rank, is off by O(1).
    The losses, all-reduced over the ranks, must agree to 1e-5."""
    _, _, root = runs
    a, b = _losses(root / "ddp-peer"), _losses(root / "ref-peer")
    for s in (1, 2, 3, 4):
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a, b)
    pa, pb = _params(root / "ddp-peer"), _params(root / "ref-peer")
    for key in pb:
        diff = (pa[key].float() - pb[key].float()).norm() / pb[key].float().norm().clamp(min=1e-12)
        print("DIFF", key, diff.item())
    num = sum((pa[k].float() - pb[k].float()).norm() ** 2 for k in pb) ** 0.5
    den = sum(pb[k].float().norm() ** 2 for k in pb) ** 0.5
    print("GLOBAL", (num / den).item())


@pytest.mark.parametrize("run, dispatch", [("ep", "alltoall"), ("ep-allgather", "allgather")])
def test_expert_parallel_training_matches_one_process(runs, run, dispatch):
    _, _, root = runs
    _assert_same_training(root / run, root / "ref", steps=[1, 2, 3, 4])
    info = json.loads((root / run / "parallel.json").read_text())
    assert info["ep_size"] == 2 and info["routed_expert_params"] == 2 * 32 * 32 * 2  # half of the 4 experts
    assert info["ep_dispatch"] == dispatch


def test_expert_parallel_training_resumes_exactly(runs):
    _, _, root = runs
    # resumed from step-2 at the same world size: bitwise the uninterrupted run
    assert _losses(root / "ep-resumed") == _losses(root / "ep")
    a, b = _params(root / "ep-resumed"), _params(root / "ep")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sharded_checkpoint_loads_at_world_size_one_and_continues(runs):
    """The EP run's step-2 (DCP, experts split over 2 ranks) resumed by one process with grad_accum 2."""
    data, cache, root = runs
    _copy_until(root / "ep", root / "ep-to-1", 2)
    Trainer(_config(_args(data, root / "ep-to-1", cache, **{"train.grad_accum": 2, "train.resume": True}))).fit()
    assert (root / "ep-to-1" / "step-4" / "model.pt").is_file()  # one process writes the single-process format
    _assert_same_training(root / "ep-to-1", root / "ref", steps=[3, 4])


def test_fsdp_continues_a_single_process_checkpoint_and_matches(runs):
    """FSDP2 on 2 processes continues the one-process run from its step-2 checkpoint (resharding it)."""
    _, _, root = runs
    assert (root / "fsdp" / "step-4" / "dcp" / ".metadata").is_file()
    _assert_same_training(root / "fsdp", root / "ref", steps=[3, 4])


def test_fsdp_with_expert_parallelism_matches(runs):
    _, _, root = runs
    _assert_same_training(root / "fsdp-ep", root / "ref", steps=[1, 2, 3, 4])


def test_bad_layout_fails_on_every_rank_before_writing(runs):
    _, _, root = runs
    assert not (root / "bad").exists()  # the plan checked exit status 2 on both ranks
    assert not (root / "bad-peer").exists()  # deferred PEER table gradients with 2 processes: refused


# ------------------------------------------------------------------ graceful stop under torchrun
def _torchrun_train(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m moespeed train ARGS` in its own session, output to `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "moespeed", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc): torchrun starts each worker in a session of its own."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(proc: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL what is left of a launch: torchrun's process group and each worker's (their own sessions)."""
    groups = set(workers)
    if proc.poll() is None:  # once reaped, its pid may belong to another process
        groups |= {proc.pid, *_descendants(proc.pid)}
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # ended already
            pass
    proc.wait(timeout=30)


def _train_steps(run: Path) -> list[int]:
    steps = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "train_loss" in record:
                steps.append(record["step"])
    return steps


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint_and_resumes(tmp_path):
    """SIGTERM to torchrun (as a cluster scheduler sends it): torchrun forwards it to both workers, the
    ranks agree on one step, write the sharded checkpoint step-N there, rank 0 prints the resume hint,
    and `--resume` under torchrun continues from step N to the end with exit 0."""
    data, cache, run = write_corpus(tmp_path / "src"), tmp_path / "cache", tmp_path / "run"
    total = 10000  # far more than can run before the signal: only the stop can end the first launch
    args = tiny_train_args(data, run, cache, steps=total)
    args += ["--train.ckpt_every", str(total), "--train.eval_every", str(total), "--train.threads", "1"]
    log = tmp_path / "stop.log"
    proc, workers = _torchrun_train(args, tmp_path, log), []
    try:
        deadline = time.monotonic() + 60
        while not _train_steps(run):  # rank 0 logs step 1 after both ranks installed the stop handlers
            assert proc.poll() is None, f"torchrun exited {proc.returncode} before training:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no train record after 60 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        workers, seen = _descendants(proc.pid), _train_steps(run)[-1]
        proc.send_signal(signal.SIGTERM)  # to torchrun alone: it forwards the signal to the workers
        proc.wait(timeout=60)  # torchrun waits up to 30 s for its workers before it kills them
        workers = []  # torchrun has reaped them
        out = log.read_text()
        # The workers exit 143 (128 + SIGTERM, moespeed's status for the stop), but torchrun does not pass
        # that on: its agent turns SIGTERM into a SignalException, stops the workers and re-raises it
        # uncaught, so torchrun exits 1 with that traceback (torch 2.13, wherever in its monitor loop
        # the signal lands: 1 on every run). Should a later torch exit otherwise, the != 0 is the contract
        # (a scheduler sees a stopped job as not finished); the exact code is torchrun's, not ours.
        assert proc.returncode != 0, out[-4000:]
        # the one traceback is torchrun's own SignalException, printed after both workers ended: no worker crashed
        assert out.count("Traceback") == 1 and "SignalException" in out.split("Traceback")[1], out[-4000:]
        assert out.count("SIGTERM: stopping after this step to save a checkpoint") == 1, out[-4000:]  # rank 0's note
        hint = [line for line in out.splitlines() if line.startswith("moespeed: stopped by SIGTERM at step ")]
        assert len(hint) == 1, out[-4000:]  # rank 0 alone prints it
        step = int(hint[0].split(" at step ")[1].split("/")[0])
        assert seen <= step < total  # the step boundary after the signal (all ranks agree on it)
        assert hint[0].startswith(f"moespeed: stopped by SIGTERM at step {step}/{total}: saved {run / f'step-{step}'}")
        assert hint[0].endswith(f"continue with: torchrun ... -m moespeed train --resume --train.run_dir {run}")
        # the only checkpoint is the one the stop wrote (ckpt_every = steps), complete, in the sharded format
        ckpts = list_checkpoints(run)
        assert [p.name for p in ckpts] == [f"step-{step}"] and not list(run.glob(".tmp*")), list(run.iterdir())
        assert is_sharded(ckpts[0]) and {"rng-0.pt", "rng-1.pt"} <= {p.name for p in ckpts[0].iterdir()}
        state = json.loads((ckpts[0] / "state.json").read_text())
        assert state["step"] == step and state["world_size"] == 2
        assert _train_steps(run) == list(range(1, step + 1))
        # the hint's command, with a new step count: the run's config.toml supplies the rest
        proc = _torchrun_train(["--resume", "--train.run_dir", str(run), "--train.steps", str(step + 2)],
                               tmp_path, log := tmp_path / "resume.log")
        proc.wait(timeout=60)
        out = log.read_text()
        assert proc.returncode == 0, out[-4000:]
        assert f"resumed {ckpts[0]} at step {step}" in out, out[-4000:]
        assert _train_steps(run) == list(range(1, step + 3))
        assert list_checkpoints(run)[-1].name == f"step-{step + 2}"
    finally:
        _kill_tree(proc, workers)


if __name__ == "__main__":
    _driver(sys.argv[1])


def test_squared_norm_matches_the_sum_of_squares():
    """The foreach sum of squares behind the distributed gradient clipping, mixed dtypes and empty."""
    from moespeed.train.distributed import _squared_norm

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(7, 5, generator=g), torch.randn(3, generator=g).bfloat16(), torch.randn(2, 2, 2, generator=g)]
    want = sum(t.float().square().sum() for t in ts)
    torch.testing.assert_close(_squared_norm(ts, torch.device("cpu")), want, rtol=1e-6, atol=0)
    assert _squared_norm([], torch.device("cpu")).item() == 0.0


def test_distributed_bench_smoke_on_cpu(tmp_path):
    """`bench.distributed --cpu`: one process vs DDP on 2 gloo processes, tiny model and corpus.
    The JSON has both rows, their launch commands, matching losses and a speedup."""
    import json

    from helpers import tiny_train_args, write_corpus
    from moespeed.bench.distributed import main

    data = write_corpus(tmp_path / "src")
    tiny = tiny_train_args(data, tmp_path / "unused", tmp_path / "unused-cache", steps=2)
    keep = {"--data.data", "--data.vocab_size", "--data.seq_len", "--data.batch_size", "--data.val_fraction",
            "--model.d_model", "--model.n_layers", "--model.n_heads", "--model.kv_lora_rank",
            "--model.qk_nope_head_dim", "--model.qk_rope_head_dim", "--model.v_head_dim", "--model.d_ff",
            "--model.max_seq_len"}
    sets = [x for i in range(0, len(tiny), 2) if tiny[i] in keep for x in ("--set", tiny[i][2:], tiny[i + 1])]
    out = tmp_path / "dist.json"
    main(["--cpu", "--preset", "quickstart", "--cases", "1gpu,ddp2", "--steps", "2", "--log-every", "1",
          "--no-compile", "--timeout", "240", "--work-dir", str(tmp_path / "work"), "--json", str(out), *sets])
    rows = {r["bench"]: r for r in json.loads(out.read_text())["results"]}
    one, ddp = rows["distributed.1gpu"], rows["distributed.ddp2"]
    assert one["run_command"].startswith("python -m moespeed train")
    assert ddp["run_command"].startswith("torchrun --standalone --nproc_per_node 2 -m moespeed train")
    assert ddp["losses_match"] and ddp["speedup"] > 0 and not ddp["notes"], ddp
    assert (tmp_path / "work" / "ddp2.log").stat().st_size > 0
