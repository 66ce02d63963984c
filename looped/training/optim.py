"""The optimizer recipe: AdamW on two parameter groups, linear warmup, cosine decay to 10%.

Weight decay rule: only weight *matrices* are decayed, i.e. the `weight` of every nn.Linear and
nn.Embedding, plus the stacked projection matrices a module lists in its class attribute
`weight_matrices` (hyper-connections' per-slot `phi`). Nothing else is: not the RMSNorm gains
(the QK-norm gains set how sharp the depth softmax can get, and decaying them pulls it towards
uniform), not biases, and not the scalar and vector parameters of the cross-layer methods
(DenseFormer's alphas, value-residual lambdas, Attention Residuals' pseudo-queries, the
hyper-connection biases and scales). This is the rule of nanoGPT and of Hugging Face's Trainer,
which the Depth-Attention authors trained with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETAS = (0.9, 0.95)
FINAL_LR_FRACTION = 0.1  # the cosine ends at 10% of the peak


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of the parameters that get weight decay."""
    names = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = ["weight"] if isinstance(module, (nn.Linear, nn.Embedding)) else []
        for p_name in own + list(getattr(module, "weight_matrices", ())):
            if getattr(module, p_name, None) is not None:
                names.add(prefix + p_name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices with `weight_decay`, everything else with 0. Tied
    parameters appear once (named_parameters deduplicates them)."""
    decayed = decayed_parameter_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    """AdamW; fused (one kernel for all parameters) when every parameter is on CUDA, where it
    is faster than the default for-each implementation; the same arithmetic elsewhere."""
    groups = param_groups(model, train_cfg.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=BETAS, fused=fused)


def warmup_steps(train_cfg) -> int:
    """train.warmup_fraction of train.steps when set, else train.warmup_steps."""
    if train_cfg.warmup_fraction is not None:
        return round(train_cfg.warmup_fraction * train_cfg.steps)
    return train_cfg.warmup_steps


def lr_at(step: int, train_cfg) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from lr / warmup to
    lr over the warmup steps, then a cosine from lr at step `warmup` to FINAL_LR_FRACTION * lr at
    step `steps`."""
    t, warm = train_cfg, warmup_steps(train_cfg)
    if step < warm:
        return t.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, t.steps - warm))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)
