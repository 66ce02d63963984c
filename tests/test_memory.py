"""Memory at scale: activation checkpointing, the chunked head, gradient accumulation.

Each saving is pinned twice: it computes the same thing (gradients to 1e-6 of the plain path)
and it saves what it claims (bytes held for backward, counted with saved_tensors_hooks).
"""

from __future__ import annotations

import pytest
import torch

from conftest import rand_ids
from looped import build_model, load_config
from looped.data.base import IGNORE
from looped.errors import ConfigError
from looped.model.head_scores import head_ce, head_scores
from looped.model.parallelize import apply_activation_checkpointing
from looped.training.losses import token_ce
from looped.training.trainer import Trainer

SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.ffn_dim=128", "model.n_layers=2", "model.n_prelude=1", "model.n_coda=1",
         "model.vocab_size=64", "model.max_seq_len=64"]
B, T = 4, 64


def _model(*overrides: str, loop: int = 4):
    torch.manual_seed(0)
    return build_model(load_config([f"loop={loop}", *SMALL, *overrides]))


def _grads(model, ids, targets, **kw) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(ids, **kw)
    token_ce(out.logits, targets).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("overrides", [
    ["model.depth_attention.enabled=true"],
    ["model.depth_attention.enabled=false", "model.injection=concat", "model.state_norm=true"],
    ["model.depth_attention.enabled=true", "model.attention=mla"],
], ids=["da", "concat_state_norm", "mla"])
@pytest.mark.parametrize("mode", ["iteration", "block"])
def test_checkpointing_gives_the_same_gradients(overrides, mode):
    """The recompute walks the same depth positions and Depth-Attention sources: a recompute
    that read a later iteration's store entries, or restarted at the wrong position, changes
    the gradients."""
    model = _model(*overrides)
    ids, targets = rand_ids(B, T, 64), rand_ids(B, T, 64)
    for kw in ({"loops": 5}, {"loops": 6, "grad_loops": 3}):
        apply_activation_checkpointing(model, "none")
        want = _grads(model, ids, targets, **kw)
        apply_activation_checkpointing(model, mode)
        got = _grads(model, ids, targets, **kw)
        assert _max_diff(want, got) < 1e-6, (mode, kw)


def _saved_bytes(model, ids, loops: int) -> int:
    """Bytes of distinct storages autograd saves for backward in one training forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, loops=loops, return_states=True, logits=False)
    return sum(seen.values())


def test_per_iteration_checkpointing_keeps_one_state_per_iteration():
    """Saved bytes from R = 4 to R = 16: with per-iteration checkpointing each extra iteration
    holds at most one state (B, T, d) plus 10%; without, many times that (every layer's
    activations). The model is the prefix-sums recipe's kind (no Depth-Attention: with it, each
    iteration's keys and mixed values are the depth state later iterations read, kept by
    design, as a KV cache keeps them)."""
    model = _model("model.depth_attention.enabled=false", "model.state_norm=true")
    ids = rand_ids(B, T, 64)
    state = B * T * model.cfg.d_model * 4
    growth = {}
    for mode in ("none", "iteration", "block"):
        apply_activation_checkpointing(model, mode)
        growth[mode] = (_saved_bytes(model, ids, 16) - _saved_bytes(model, ids, 4)) / 12 / state
    assert growth["iteration"] <= 1.1
    # one input per layer, plus what the recurrence's own ops between blocks save (the state norm)
    assert growth["block"] <= model.cfg.n_layers + 2.1
    assert growth["none"] > 10 * growth["iteration"]  # about 40 states per iteration here


def test_checkpointing_refuses_cross_layer_streams():
    with pytest.raises(ConfigError, match="plain residual"):
        load_config(["recipe=roots_staircase", "train.activation_checkpointing=iteration",
                     "model.cross_layer.method=denseformer"])
    with pytest.raises(ConfigError, match="unknown train.activation_checkpointing"):
        load_config(["train.activation_checkpointing=layer"])


def test_chunked_head_equals_full_logits():
    """Values and gradients of the chunked, checkpointed head equal the full logits' (a chunk
    boundary that dropped or repeated a token, or a scatter to the wrong rows, would not). In
    float64, so that the sums' different order stays far below the tolerance."""
    model = _model().double()
    hidden = torch.randn(B, T, model.cfg.d_model, dtype=torch.float64, requires_grad=True)
    targets = rand_ids(B, T, 64)
    targets[:, : T // 3] = IGNORE  # ragged answers: some rows' tokens do not count
    targets[0, T // 2:] = IGNORE
    full = token_ce(model.head(hidden), targets)
    grads_full = torch.autograd.grad(full.sum(), [hidden, model.embed.weight])
    chunked = head_ce(model.head, hidden, targets, chunk=37)
    grads_chunked = torch.autograd.grad(chunked.sum(), [hidden, model.embed.weight])
    assert (full - chunked).abs().max() < 1e-6
    for a, b in zip(grads_full, grads_chunked):
        assert (a - b).abs().max() < 1e-6
    with torch.no_grad():
        ce, right = head_scores(model.head, hidden, targets, chunk=37)
        logits = model.head(hidden)
    mask = targets != IGNORE
    assert (ce - full.detach()).abs().max() < 1e-6
    assert torch.equal(right, (logits.argmax(-1) == targets) & mask)


def _trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = load_config(["recipe=roots_staircase", "imports=[tests/plugins/ragged_task.py]", "task.name=ragged",
                       "loop=3",
                       "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                       "model.head_dim=16", "model.ffn_dim=64", "model.n_prelude=1",
                       "model.n_coda=1", "train.batch_size=8", "train.lr=1e-2",
                       "train.warmup_steps=0", "train.grad_clip=0", "threads=1", *overrides])
    return Trainer(cfg, tmp_path)


@pytest.mark.parametrize("objective", [
    ["train.objective.loss=per_iteration"],
    ["train.objective.loss=progressive", "train.objective.alpha=0.5",
     "model.exit_gate=true"],
    ["train.objective.loss=final", "train.activation_checkpointing=iteration"],
], ids=["per_iteration", "progressive_gate", "final_checkpointed"])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, objective):
    """4 micro-batches of 2 rows give the gradient and loss of one batch of 8 rows, on a task
    whose rows hold different numbers of answer tokens (a per-micro-batch mean left unweighted
    would not), and with the progressive loss, whose (n, k) is drawn once per step (a draw per
    micro-batch would not)."""
    full = _trainer(tmp_path / "full", *objective)
    accumulated = _trainer(tmp_path / "micro", *objective, "train.micro_batch_size=2")
    for trainer in (full, accumulated):
        trainer.grads = []
        for _ in range(2):  # the second step starts from weights the first one moved
            row = trainer.train_step()
            trainer.grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                  if p.grad is not None})
            trainer.loss = row["loss"]
    for want, got in zip(full.grads, accumulated.grads):
        assert _max_diff(want, got) < 1e-6
    assert abs(full.loss - accumulated.loss) < 1e-6


def test_micro_batch_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="must divide"):
        _trainer(tmp_path, "train.micro_batch_size=3")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(["train.micro_batch_size=-1"])
