from looped.model import loop_sources  # noqa: F401  (registers the looped models' source policies)
from looped.model.cache import KVCache
from looped.model.depth import SOURCE_POLICIES, DepthLayout, DepthWeights, register_source_policy
from looped.model.lm import LMOutput, LoopedLM

__all__ = ["KVCache", "SOURCE_POLICIES", "DepthLayout", "DepthWeights", "register_source_policy",
           "LMOutput", "LoopedLM"]
