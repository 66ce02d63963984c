"""How a LoopedLM is sharded under FSDP2: the trainer asks the model's own plan, so the training
code never names the model's parts.

Each prelude and coda block is a unit; the core is one unit when its weights are shared (the
same blocks run in each of the R iterations, so they all-gather once per forward and stay
gathered across the iterations); the unrolled baseline's untied copies are one unit each; the
root (embeddings, final norm, head) is the last unit.
"""

from __future__ import annotations

from torch import nn


def apply_fsdp(model: nn.Module) -> nn.Module:
    """Shard `model` (a LoopedLM) in place with FSDP2's fully_shard; returns it."""
    from torch.distributed.fsdp import fully_shard

    for block in model.prelude:
        fully_shard(block)
    if model.cfg.share_weights:
        fully_shard(list(model.core), reshard_after_forward=False)
    else:
        for copy in model.core:
            fully_shard(list(copy))
    for block in model.coda:
        fully_shard(block)
    fully_shard(model)
    return model
