"""torch.compile per block: twenty distinct loop counts, as a sampler draws them, compile each
compiled part at most twice (training and evaluation), and the compiled model computes what the
eager one does."""

from __future__ import annotations

from collections import Counter

import torch

from conftest import rand_ids
from looped import build_model, load_config
from looped.model.parallelize import apply_compile

SMALL = ["loop=4", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
         "model.head_dim=16", "model.ffn_dim=64", "model.n_layers=1", "model.n_prelude=1",
         "model.n_coda=1", "model.vocab_size=32", "model.max_seq_len=32",
         "model.depth_attention.enabled=true"]


def test_twenty_loop_counts_compile_each_part_at_most_twice():
    """A whole-model graph unrolls the loop and compiles once per R (20 here, past dynamo's
    recompile limit of 8); per-block parts see the same shapes whatever R."""
    torch._dynamo.reset()
    compiled = Counter()

    def counting(gm: torch.fx.GraphModule, example_inputs):
        compiled[len(example_inputs)] += 1  # one call per graph dynamo compiles
        return gm.forward

    torch.manual_seed(0)
    model = build_model(load_config(SMALL))
    eager = build_model(load_config(SMALL))
    eager.load_state_dict(model.state_dict())
    apply_compile(model, backend=counting)
    ids = rand_ids(2, 16, vocab=32)
    loops = list(range(1, 21))
    for r in torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist():
        out = model(ids, loops=loops[r])
        out.logits.float().square().mean().backward()
        want = eager(ids, loops=loops[r]).logits
        assert (out.logits - want).abs().max() < 1e-5
    # one graph per compiled kind of part (RMSNorm, SwiGLU), its parameters graph inputs: the
    # prelude, core and coda instances and all twenty R share them
    assert 0 < sum(compiled.values()) <= 2, compiled
    with torch.no_grad():  # evaluation: another grad mode, compiled once more, also for any R
        for r in (3, 11, 17):
            model(ids, loops=r)
    assert sum(compiled.values()) <= 4, compiled
