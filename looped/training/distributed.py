"""Data-parallel training over the processes that `torchrun` starts: DDP or FSDP2.

`torchrun --nproc_per_node=N train.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK; `DistEnv` reads
them (world size 1 without torchrun: plain single-process training, nothing here is used).

The contract that makes an N-rank run the same training as a 1-rank run:
  * `train.batch_size` is the global batch. Every rank draws the full global batch from the
    per-step generator and keeps its own `batch_size / world_size` rows (`shard_batch`), and the
    loop count R comes from (seed, step), so all ranks run the same R on a partition of the data.
  * The losses (looped.training.losses) are means over the answer tokens of the local rows.
    Each rank scales its loss by world_size * n_local / n_global before backward
    (`loss_weight`); DDP and FSDP average gradients over ranks, so the reduced gradient is the gradient of the mean over
    the global batch's answer tokens, as in a 1-rank run. The logged loss is the all-reduced
    global mean. (Not covered: model.init_state=noise draws noise of the local batch's shape,
    so its noise differs from a 1-rank run's.)

Only rank 0 writes (run dir, TensorBoard, checkpoints, stdout). Under DDP, evaluation runs on rank
0 alone while the others wait at a barrier; under FSDP every forward needs every rank (the
parameters are sharded), so all ranks evaluate and rank 0 reports.

FSDP2 (`train.parallel=fsdp`) shards the model by the model's own plan (looped.model.parallelize:
each prelude and coda block, the shared core as one unit, the root). Checkpoints gather a full
state dict, so `model.safetensors` and `state.pt` have the same format as a 1-rank run's and a
run can be resumed under any of 1-rank, DDP or FSDP.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from looped.errors import ConfigError

# hsdp: FSDP2 sharded within a node and replicated across nodes (a 2-D device mesh)
PARALLEL_MODES = ("ddp", "fsdp", "hsdp")
# Under DDP the other ranks wait at a barrier while rank 0 evaluates and checkpoints; the
# barrier is bound by the process group's timeout.
TIMEOUT = timedelta(hours=2)
# On a user error, ranks other than 0 wait this long before printing it and exiting 2: torchrun
# stops them as soon as rank 0 exits 2 with the same error, so it is printed once.
ERROR_GRACE_S = 5.0


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "DistEnv":
        """The torchrun environment; world size 1 when not started by torchrun."""
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local = int(environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are set "
                              "by torchrun)") from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(world, rank, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_parallel(parallel: str) -> None:
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"unknown train.parallel '{parallel}'; choose one of: "
                          f"{', '.join(PARALLEL_MODES)}")


def local_batch_size(global_batch: int, env: DistEnv) -> int:
    """Rows per rank; the global batch must split evenly (checked before any process group)."""
    if global_batch % env.world_size:
        raise ConfigError(f"train.batch_size={global_batch} is the global batch and must be "
                          f"divisible by the world size {env.world_size} (torchrun "
                          f"--nproc_per_node); use a multiple of {env.world_size}")
    return global_batch // env.world_size


def setup(env: DistEnv, device: torch.device) -> None:
    """Join the process group (idempotent): nccl for a CUDA device, gloo on CPU."""
    if not env.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT)


def shard_batch(batch, env: DistEnv):
    """This rank's rows of a global batch (anything with `inputs` (B, ...) and `rows(lo, hi)`)."""
    if not env.enabled:
        return batch
    n = local_batch_size(batch.inputs.shape[0], env)
    return batch.rows(env.rank * n, (env.rank + 1) * n)


def loss_weight(n_local: int, n_global: int, env: DistEnv) -> float:
    """What a rank's local-mean loss is multiplied by before backward so that the gradients DDP
    and FSDP average over ranks equal the gradient of the global mean: world * n_local / N."""
    return env.world_size * n_local / max(n_global, 1)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_model(model: nn.Module, env: DistEnv, parallel: str, device: torch.device) -> nn.Module:
    """The module to run training forwards through: DistributedDataParallel around `model`
    (which stays the plain module), or `model` itself sharded in place by FSDP2: over all ranks
    (fsdp), or within each node and replicated across nodes (hsdp: gradients reduce-scatter
    over the fast intra-node links and all-reduce across nodes). On GPU, FSDP2 computes with
    bf16 parameters and reduces gradients in fp32; the optimizer keeps fp32 shards."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # DDP runs the whole loss (LossForward): the losses read the head outside the model's
        # forward, and DDP only follows what its forward computes. The rotary tables are
        # constant buffers. Some parameters get no gradient in some steps (an unrolled model's
        # early copies under truncated backprop, a cross-layer method's parameters of positions
        # past the sampled R): DDP must then look for them
        return DistributedDataParallel(LossForward(model), device_ids=ids,
                                       broadcast_buffers=False,
                                       find_unused_parameters=may_skip_parameters(model))
    from looped.model.parallelize import apply_fsdp  # the model's own sharding plan

    mesh = None
    if parallel == "hsdp":
        mesh = hsdp_mesh(env, device)
    return apply_fsdp(model, mesh=mesh, mixed_precision=device.type == "cuda")


class LossForward(nn.Module):
    """What DDP wraps: its forward computes a training step's loss (a closure over the model
    it holds), so that every use of a parameter happens inside DDP's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn) -> torch.Tensor:
        return loss_fn()


def may_skip_parameters(model: nn.Module) -> bool:
    """Whether a training step can leave some parameters without gradient."""
    c = model.cfg
    return not c.share_weights or c.cross_layer.method != "none"


def hsdp_mesh(env: DistEnv, device: torch.device):
    """A (nodes, ranks per node) mesh: replicate across its first dim, shard along its second.
    torchrun sets LOCAL_WORLD_SIZE, the ranks of one node."""
    from torch.distributed.device_mesh import init_device_mesh

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    if env.world_size % per_node:
        raise ConfigError(f"train.parallel=hsdp: the world size {env.world_size} is not a "
                          f"multiple of the ranks per node ({per_node})")
    return init_device_mesh(device.type, (env.world_size // per_node, per_node),
                            mesh_dim_names=("replicate", "shard"))


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def to_float(value) -> float:
    """A scalar tensor (or DTensor, e.g. the grad norm under FSDP) as a Python float."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# -- checkpoints -------------------------------------------------------------------------------
# A checkpoint always holds the full, unsharded model and the optimizer state in the format of
# `torch.optim.Optimizer.state_dict()` (parameters numbered group by group), so
# runs resume under any parallelism. Under FSDP these are gathered on rank 0 (a collective: all
# ranks call it) and the other ranks get empty dicts.


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if not is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def _names_in_optimizer_order(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order Optimizer.state_dict() numbers them: group by group."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    if not is_fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    if not by_name:  # ranks other than 0
        return {}
    index = {name: i for i, name in enumerate(_names_in_optimizer_order(model, opt))}
    return {"state": {index[k]: v for k, v in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]}
                             for g in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Load a full optimizer state (Optimizer.state_dict() format) on every rank."""
    if not is_fsdp(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names_in_optimizer_order(model, opt)
    by_name = {"state": {names[i]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=_options())


class FullStateView:
    """What checkpoint.save_checkpoint / load_weights see of a model: its full state dict, and
    loading a full state dict into it (sharding it under FSDP)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None):
        self.model, self._state = model, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        # under FSDP, the sharded parameters are DTensors whose shapes are the full shapes
        return self._state if self._state is not None else self.model.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        if not is_fsdp(self.model):
            self.model.load_state_dict(weights)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, weights, options=_options())


# -- the end -------------------------------------------------------------------------------------


def finish(code: int, wait: bool = True) -> NoReturn:
    """End a distributed process: barrier (unless a failure makes the ranks' paths differ),
    destroy the process group, flush, and os._exit. Exiting through the interpreter's normal
    teardown aborts now and then under gloo ("terminate called without an active exception")."""
    try:
        if dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
    except Exception as e:  # a peer died: say so, and do not exit 0
        print(f"error: distributed shutdown failed: {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
