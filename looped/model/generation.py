"""Decoding a LoopedLM: teacher-forced logits through a cache, and sampling new tokens, eager
or through a compiled one-token step (looped.model.compiled_decode)."""

from __future__ import annotations

from typing import Optional

import torch

from looped.errors import ConfigError, ShapeError
from looped.model.exit import ExitCriterion


@torch.no_grad()
def cached_forward(model, input_ids: torch.Tensor, *, kv: str = "per_iteration",
                   loops: Optional[int] = None, exit: Optional[ExitCriterion] = None,
                   prefill: int = 0):
    """Teacher-forced logits of input_ids (B, T) as a cached decode computes them: the first
    `prefill` tokens in one chunk, then one token at a time, through a cache of policy kv.
    Under `per_iteration` this equals the full forward; under `last` it shows what the
    approximation costs over whole sequences (prefill=0: every token decoded). Returns an
    LMOutput with logits and iterations."""
    b, t = input_ids.shape
    cache = model.new_cache(b, t, loops, kv)
    bounds = ([0, prefill] if prefill else [0]) + list(range(max(prefill, 1), t + 1))
    outs = [model(input_ids[:, a:z], loops=loops, cache=cache, exit=exit)
            for a, z in zip(bounds, bounds[1:]) if z > a]
    return type(outs[0])(torch.cat([o.logits for o in outs], 1), outs[0].layout,
                         iterations=torch.cat([o.iterations for o in outs], 1))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, use_cache: bool = True, loops: Optional[int] = None,
             exit: Optional[ExitCriterion] = None, generator: Optional[torch.Generator] = None,
             return_iterations: bool = False, kv: str = "per_iteration", compile: bool = False):
    """Append max_new_tokens sampled tokens to input_ids (B, T). temperature=0 is greedy.

    kv: the cache policy (per_iteration, exact; last, one slot per layer).
    compile: decode through a static-shape step that torch.compile captures once per shape
    (model.compiled_decoder); not with exit or use_cache=False.
    With return_iterations, also returns the loop iterations each new token's prediction
    used, (B, max_new_tokens). Under adaptive exit a batch of at least
    exit.drop_rows_from rows drops each row from the iterations after its token exits; a
    smaller batch runs every row until all have exited (it is bound by reading the weights)."""
    b, t = input_ids.shape
    if t + max_new_tokens > model.cfg.max_seq_len:
        raise ShapeError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.max_seq_len={model.cfg.max_seq_len}")
    loops = model._check_loops(loops)
    full = torch.full((b, 1), loops, dtype=torch.long, device=input_ids.device)
    if compile:
        if exit is not None or not use_cache:
            raise ConfigError("compile=True decodes with the cache, without adaptive exit")
        decoder = model.compiled_decoder(b, t + max_new_tokens, loops, kv)
        decoder.reset()

        def first(ids):
            return decoder.prefill(ids)[:, -1], full

        def step(nxt, tokens):
            return decoder.step(nxt)[:, -1], full
    else:
        cache = model.new_cache(b, t + max_new_tokens, loops, kv) if use_cache else None

        def run(ids):
            out = model(ids, loops=loops, cache=cache, exit=exit)
            return out.logits[:, -1], out.iterations[:, -1:]

        def first(ids):
            return run(ids)

        def step(nxt, tokens):
            return run(nxt if cache is not None else tokens)

    tokens, used = input_ids, []
    logits, iterations = first(tokens)
    for i in range(max_new_tokens):
        used.append(iterations[:, -1])
        nxt = sample(logits, temperature, top_k, generator)  # (B, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
        if i < max_new_tokens - 1:
            logits, iterations = step(nxt, tokens)
    if return_iterations:
        return tokens, torch.stack(used, dim=1)
    return tokens


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
