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


def load_run(path, overrides: list[str] | None = None):
    """(cfg, model) of a trained run: a run directory or one of its checkpoint directories.
    The model is in eval mode, with the weights of the latest (or the given) checkpoint."""
    from looped.config import load_run_config
    from looped.training.checkpoint import load_weights, resolve_checkpoint, run_dir_of

    ckpt = resolve_checkpoint(path)
    cfg = load_run_config(run_dir_of(ckpt), overrides)
    model = build_model(cfg)
    load_weights(model, ckpt)
    return cfg, model.eval()


__all__ = ["load_config", "build_model", "load_run", "LoopedLM", "LMOutput", "KVCache", "LoopedError",
           "ConfigError"]
