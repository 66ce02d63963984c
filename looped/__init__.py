"""looped: looped (recurrent-depth) Transformers with Depth-Attention.

Public API:
    cfg = load_config(["loop=8", "model.d_model=256"])   # resolves exactly as train.py does
    model = build_model(cfg)
    out = model(input_ids, return_depth_weights=True)     # out.logits, out.depth_weights
"""

from looped.config import load_config
from looped.errors import ConfigError, LoopedError
from looped.model import KVCache, LMOutput, LoopedLM


def build_model(cfg) -> LoopedLM:
    """Build the model described by a config from `load_config` (or its `model` node + loop)."""
    return LoopedLM(cfg.model, loop=cfg.loop)


__all__ = ["load_config", "build_model", "LoopedLM", "LMOutput", "KVCache", "LoopedError",
           "ConfigError"]
