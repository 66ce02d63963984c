"""Cross-layer baselines: how hidden states travel between depth positions, chosen by
`model.cross_layer.method`. One file per method; add one by subclassing `CrossLayer` and adding a
line here."""

from looped.model.cross_layer.attn_res import AttnRes
from looped.model.cross_layer.base import CrossLayer, CrossLayerConfig, LayerCall, exit_conflict
from looped.model.cross_layer.denseformer import DenseFormer
from looped.model.cross_layer.hyper_connections import HyperConnections
from looped.model.cross_layer.mhc import ManifoldHyperConnections, sinkhorn
from looped.model.cross_layer.value_residual import ValueResidual
from looped.registry import Registry

CROSS_LAYER_METHODS = Registry("cross-layer method", path="model.cross_layer", selector="method",
                               base=CrossLayerConfig)
CROSS_LAYER_METHODS.register("none")(CrossLayer)
CROSS_LAYER_METHODS.register("denseformer")(DenseFormer)
CROSS_LAYER_METHODS.register("value_residual")(ValueResidual)
CROSS_LAYER_METHODS.register("attn_res")(AttnRes)
CROSS_LAYER_METHODS.register("mhc")(ManifoldHyperConnections)
CROSS_LAYER_METHODS.register("hyper_connections")(HyperConnections)


def build_cross_layer(cfg, d_model: int, n_slots: int, kv_dim: int) -> CrossLayer:
    return CROSS_LAYER_METHODS.lookup(cfg.method)(cfg, d_model, n_slots, kv_dim)


__all__ = ["CROSS_LAYER_METHODS", "CrossLayer", "CrossLayerConfig", "LayerCall", "build_cross_layer",
           "exit_conflict", "sinkhorn"]
