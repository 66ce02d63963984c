"""FLOP, parameter and state accounting for any config, and every cross-layer method on it.

    python -m looped flops model=3b                       # the paper's 3B decoder
    python -m looped flops model=1.5b context=4096 bytes=2
    python -m looped flops loop=8                         # the main job's looped model

Arguments are config overrides as for train.py, plus `context` (tokens each token attends over;
default model.max_seq_len) and `bytes` (bytes per element of activations and cache; default 2,
bf16). `loop` defaults to 1 here (a plain decoder, the paper's setting) unless given.

Conventions (looped.training.flops, what training's MFU uses too): forward FLOPs per token =
2 x (weights used) + attention 4 x H x D x context per depth position (QK^T and AV over the full
context, as Kaplan et al. and torch's FlopCounterMode count them); norms and activations are
left out. Extra FLOPs of Depth-Attention and of each
cross-layer method count all their arithmetic (mixing, scores, softmax, norms) as a percentage of
that forward. KV bytes are per token over all depth positions. Extra state is what a method must
hold per token while the token goes through depth, beyond the KV cache and the one residual
vector of a vanilla model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import torch

from looped import build_model, load_config
from looped.components import component_config
from looped.errors import ConfigError, cli_main
from looped.model.cross_layer import CROSS_LAYER_METHODS
from looped.training.flops import depth_attention_flops, forward_flops_per_token

TOOL_KEYS = ("context", "bytes")
# Attention Residuals' block variant: about 8 blocks over the depth (the paper's recommendation)
ATTN_RES_BLOCKS = 8


@dataclass
class MethodCost:
    name: str
    params: int
    flops: float  # per token
    state_bytes: float  # per token


@dataclass
class Accounting:
    params: int
    embedding_params: int
    n_positions: int
    context: int
    forward_flops: float  # per token, vanilla
    kv_bytes: int  # per token
    depth_attention: MethodCost
    attention: str  # model.attention
    methods: list[MethodCost]


def account(cfg, context: int, bytes_per: int) -> Accounting:
    with torch.device("meta"):
        model = build_model(cfg)
    c = model.cfg
    positions = model.layout().n_positions
    kind = model.attention_kind
    da = MethodCost("depth_attention", 0, depth_attention_flops(model), 0.0)
    alternatives = []
    if c.attention == "mla":  # the depth-score ablation (looped.model.mla)
        da.name += f" (mla.depth_keys={c.mla.depth_keys})"
        other = "own" if c.mla.depth_keys == "absorbed" else "absorbed"
        alternatives.append(MethodCost(
            f"depth_attention (mla.depth_keys={other})", 0,
            depth_attention_flops(model, cfg=replace(c, mla=replace(c.mla, depth_keys=other))),
            0.0))
        # decoding with the attention in latent space, the absorbed query is already there
        alternatives.append(MethodCost(
            f"depth_attention (mla.depth_keys={c.mla.depth_keys}, absorbed-attention decode)",
            0, depth_attention_flops(model, absorbed_attention=True), 0.0))

    n_slots = model.layout(model.param_loops).n_positions
    heads, k_dim, v_dim = kind.cache_geometry(c)
    kv_dim = heads * v_dim
    methods = alternatives
    for name, extra in _method_variants(n_slots):
        mcfg = component_config("model.cross_layer", name, **extra)
        with torch.device("meta"):
            m = CROSS_LAYER_METHODS[name](mcfg, c.d_model, n_slots, kv_dim)
        m.injected_before = model.injection_slots()
        label = name + "".join(f" {k}={v}" for k, v in extra.items())
        methods.append(MethodCost(label, sum(p.numel() for p in m.parameters()),
                                  m.extra_flops_per_token(),
                                  m.extra_state_per_token() * bytes_per))
    embedding = model.embed.weight.numel() + (0 if model.pos_embed is None
                                              else model.pos_embed.weight.numel())
    return Accounting(params=sum(p.numel() for p in model.parameters()),
                      embedding_params=embedding, n_positions=positions, context=context,
                      forward_flops=forward_flops_per_token(model, context=context),
                      kv_bytes=positions * heads * (k_dim + v_dim) * bytes_per,
                      depth_attention=da, methods=methods, attention=c.attention)


def _method_variants(n_slots: int) -> list[tuple[str, dict]]:
    out = []
    for name in CROSS_LAYER_METHODS:
        if name == "none":
            continue
        out.append((name, {}))
        if name == "attn_res":
            out.append((name, {"block_size": math.ceil(n_slots / ATTN_RES_BLOCKS)}))
        if name == "value_residual":
            out.append((name, {"learnable": True}))
    return out


def format_table(title: str, a: Accounting) -> str:
    lines = [f"## {title}",
             "",
             f"parameters {a.params / 1e6:,.1f}M (embedding {a.embedding_params / 1e6:,.1f}M), "
             f"{a.n_positions} depth positions, context {a.context}, attention {a.attention}",
             f"forward FLOPs per token {a.forward_flops / 1e9:,.3f} G; "
             f"KV cache {a.kv_bytes / 1024:,.1f} KiB per token",
             "",
             "| method | extra params | extra FLOPs / token | extra FLOPs % | "
             "extra state / token (beyond the KV cache) |",
             "|---|---:|---:|---:|---:|"]
    for m in [a.depth_attention] + a.methods:
        lines.append(f"| {m.name} | {m.params:,} | {m.flops:,.0f} | "
                     f"{100 * m.flops / a.forward_flops:.4f}% | {_bytes(m.state_bytes)} |")
    return "\n".join(lines)


def _bytes(n: float) -> str:
    return "0" if n == 0 else f"{n / 1024:,.1f} KiB"


def help_text(argv: list[str] = ()) -> str:
    return __doc__.strip() + "\n\nKeys: every train.py config key (see `looped train --help`), " \
        "plus context and bytes."


def parse(argv: list[str]) -> tuple[list[str], int | None, int]:
    overrides, context, bytes_per = [], None, 2
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in TOOL_KEYS:
            try:
                number = int(value)
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got '{value}'") from None
            if number < 1:
                raise ConfigError(f"{key} must be >= 1, got {number}")
            if key == "context":
                context = number
            else:
                bytes_per = number
        else:
            overrides.append(item)
    if not any(o.startswith("loop=") for o in overrides):
        overrides.insert(0, "loop=1")
        overrides.insert(1, "train.loop_sampling.sampler=fixed")
    return overrides, context, bytes_per


def main(argv: list[str]) -> int:
    overrides, context, bytes_per = parse(argv)
    cfg = load_config(overrides)
    a = account(cfg, context or cfg.model.max_seq_len, bytes_per)
    print(format_table(" ".join(argv) or "defaults", a))
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
