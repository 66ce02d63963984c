"""Shared tiny configs and helpers for the model tests.

Every model built here is fp32 on CPU, tiny (d_model 32, head_dim 8, vocab 50, 2-4 layers) and
re-initialised with O(1) random weights (`randomize_`): the package's own init (std 0.02, scaled
down residual outputs) leaves every layer close to the identity, which would make Depth-Attention
effects smaller than the tolerances the tests check with.
"""

from __future__ import annotations

import pytest
import torch

from looped import build_model, load_config

VOCAB = 50

# The base tiny decoder: 4 layers, GQA with 2 query heads per KV head. Every key the tests rely
# on is pinned here, so changes to configs/defaults.yaml do not silently change what is tested.
BASE_MODEL = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_prelude=0, n_coda=0, n_heads=4,
                  n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=32, rope_theta=10000.0,
                  norm_eps=1e-6, tie_embeddings="true", kernel="sdpa", share_weights="true",
                  injection="add", init_state="zeros", exit_gate="false")

HEADS = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mha": dict(n_heads=4, n_kv_heads=4),
}

# Depth-Attention variants by name. "vanilla" switches the feature off entirely.
VARIANTS = {
    "vanilla": dict(enabled=False),
    "none": dict(policy="none"),
    "dense": dict(policy="dense"),
    "strided": dict(policy="strided", stride=2),
    "strided_w1": dict(policy="strided", stride=2, window=1),
}

# A looped model: 1 prelude layer, a 2-layer core run 3 times, 1 coda layer = 8 depth positions.
LOOPED_MODEL = dict(n_layers=2, n_prelude=1, n_coda=1)


def overrides(*, loop: int = 1, enabled: bool = True, policy: str | None = None,
              stride: int | None = None, window: int = 0, mix: str = "mixed",
              extra: tuple[str, ...] = (), **model) -> list[str]:
    """The dotlist for a tiny config; `model` keys override BASE_MODEL."""
    m = dict(BASE_MODEL)
    m.update(model)
    out = [f"loop={loop}"] + [f"model.{k}={v}" for k, v in m.items()]
    da = "model.depth_attention"
    out.append(f"{da}.enabled={'true' if enabled else 'false'}")
    if policy is not None:
        out.append(f"{da}.sources={policy}")
    if stride is not None:
        out.append(f"{da}.stride={stride}")
    out += [f"{da}.window={window}", f"{da}.mix={mix}"]
    return out + list(extra)


def tiny_cfg(**kw):
    return load_config(overrides(**kw))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with O(1) random values (norm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def make_model(seed: int = 0, **kw):
    """A tiny model in eval mode with random O(1) weights; kw as for `overrides`."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(**kw))
    return randomize_(model, seed).eval()


def rand_ids(batch: int = 2, tokens: int = 12, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab, (batch, tokens), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def decode_logits(model, ids: torch.Tensor, chunks: tuple[int, ...], *, loops=None,
                  cache_len: int | None = None) -> torch.Tensor:
    """Logits of ids computed through a KV cache: prefill chunks of the given lengths, then
    the remaining tokens one at a time."""
    b, t = ids.shape
    cache = model.new_cache(b, cache_len or t, loops)
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(ids[:, pos:pos + n], loops=loops, cache=cache).logits)
        pos += n
    while pos < t:
        outs.append(model(ids[:, pos:pos + 1], loops=loops, cache=cache).logits)
        pos += 1
    assert cache.length == t
    return torch.cat(outs, dim=1)


@pytest.fixture(autouse=True)
def _fixed_seed_and_threads():
    torch.manual_seed(0)
    yield
