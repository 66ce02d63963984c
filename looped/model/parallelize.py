"""How a LoopedLM is sharded under FSDP2: the trainer asks the model's own plan, so the training
code never names the model's parts.

Each prelude and coda block is a unit; the core is one unit when its weights are shared (the
same blocks run in each of the R iterations, so they all-gather once per forward and stay
gathered across the iterations); the unrolled baseline's untied copies are one unit each; the
root (embeddings, final norm, head) is the last unit.
"""

from __future__ import annotations

from torch import nn

from looped.errors import ConfigError


def apply_fsdp(model: nn.Module, mesh=None, mixed_precision: bool = False) -> nn.Module:
    """Shard `model` (a LoopedLM) in place with FSDP2's fully_shard; returns it. mesh: a 1-D
    mesh (shard over all ranks, the default) or a 2-D (replicate, shard) mesh for HSDP.
    mixed_precision: compute in bf16 and reduce gradients in fp32 (GPU training)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    for block in model.prelude:
        fully_shard(block, **kw)
    if model.cfg.share_weights:
        fully_shard(list(model.core), reshard_after_forward=False, **kw)
    else:
        for copy in model.core:
            fully_shard(list(copy), **kw)
    for block in model.coda:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


CHECKPOINTING_MODES = ("none", "iteration", "block")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Make training forwards of `model` (a LoopedLM) recompute activations in backward:
    `iteration` keeps one state per loop iteration (Huginn checkpoints each recurrence step),
    `block` one input per layer; `none` keeps everything. The plain residual path only: a
    cross-layer method's stream is state across layers that a recompute would change."""
    if mode not in CHECKPOINTING_MODES:
        raise ConfigError(f"unknown activation checkpointing mode '{mode}'; choose one of: "
                         f"{', '.join(CHECKPOINTING_MODES)}")
    if mode != "none" and model.cfg.cross_layer.method != "none":
        raise ConfigError(f"activation checkpointing needs the plain residual stream; "
                         f"cross_layer.method={model.cfg.cross_layer.method} keeps its own")
    model.checkpointing = mode
    return model


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile the parts of each block that do not depend on the depth position: its two
    norms and its SwiGLU MLP (about two thirds of a block's FLOPs, and most of its elementwise
    work). A whole-model graph unrolls the R iterations and so recompiles for every R the
    sampler draws (past dynamo's recompile limit the rest run eagerly); these compile once per
    input shape and grad mode, whatever R. Attention, Depth-Attention's sources and the store
    stay eager: their shapes change with the number of sources."""
    blocks = [b for group in (model.prelude, model.coda) for b in group]
    cores = model.core if model.cfg.share_weights else [b for copy in model.core for b in copy]
    for block in [*blocks, *cores]:
        for part in (block.attn_norm, block.mlp_norm, block.mlp):
            part.compile(backend=backend, dynamic=False)
    return model
