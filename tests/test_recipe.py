"""The training objective and recipe, pinned against hand computations: the final and
per-iteration losses (which hop target each iteration is scored against), the exit-gate loss, the
learning-rate schedule at chosen steps, the AdamW parameter groups, and eval.loops following
`loop`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model

from looped import build_model, load_config
from looped.training.scoring import default_eval_loops, eval_loops
from looped.data.tasks import IGNORE, Batch
from looped.errors import ConfigError
from looped.training.losses import compute_loss
from looped.model.lm import LMOutput
from looped.training.optim import decayed_parameter_names, lr_at, param_groups

V = 5  # vocabulary of the hand-made logits


def nll(logits_row: list[float], target: int) -> float:
    """-log softmax(logits_row)[target], by hand."""
    top = max(logits_row)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits_row))
    return log_z - logits_row[target]


class IdentityHead:
    """compute_loss reads intermediate logits through model.head(state); with this stub the
    states *are* the logits, so the test controls every iteration's logits."""

    @staticmethod
    def head(x):
        return x


def hand_batch(R: int, n_hops: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = IGNORE  # a prompt position
    hops = torch.randint(0, V, (n_hops, B, T), generator=g) if n_hops else None
    if hops is not None:
        hops[:, 0, 0] = IGNORE
        hops[0, 1, 2] = IGNORE  # the 1-hop answer of one position is undefined
    logits = [torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(R)]
    out = LMOutput(logits=logits[-1], layout=None, states=logits[:-1] + [torch.zeros(B, T, V)])
    return Batch(torch.zeros(B, T, dtype=torch.long), targets, hops), out, logits


def hand_loss(batch: Batch, logits: list[torch.Tensor], kind: str) -> float:
    final = batch.targets.tolist()
    n = sum(t != IGNORE for row in final for t in row)
    R = len(logits)
    if kind == "final":
        chosen = [(R, final)]
    else:  # iteration r (1-based) answers hop r; past the last hop target, the final answer
        chosen = [(r, batch.hop_targets[r - 1].tolist()
                   if batch.hop_targets is not None and r <= batch.hop_targets.shape[0]
                   else final) for r in range(1, R + 1)]
    total = 0.0
    for r, tgt in chosen:
        lg = logits[r - 1].tolist()
        for b, row in enumerate(tgt):
            for t, y in enumerate(row):
                if y != IGNORE:
                    total += nll(lg[b][t], y)
    return total / n / len(chosen)


@pytest.mark.parametrize("R,n_hops", [(3, 2), (2, 3), (3, 0), (1, 1)])
@pytest.mark.parametrize("kind", ["final", "per_iteration"])
def test_loss_equals_hand_computation(R, n_hops, kind):
    batch, out, logits = hand_batch(R, n_hops)
    got = compute_loss(IdentityHead(), batch, out, kind, gate_beta=0.0)
    assert got.item() == pytest.approx(hand_loss(batch, logits, kind), rel=1e-6)


def test_per_iteration_scores_iteration_r_against_hop_r():
    """Swap two hop targets: the loss must change (an off-by-one would score another hop)."""
    batch, out, logits = hand_batch(3, 2, seed=1)
    loss = compute_loss(IdentityHead(), batch, out, "per_iteration", 0.0).item()
    swapped = Batch(batch.inputs, batch.targets, batch.hop_targets.flip(0))
    assert compute_loss(IdentityHead(), swapped, out, "per_iteration", 0.0).item() != \
        pytest.approx(loss, rel=1e-6)
    assert loss == pytest.approx(hand_loss(batch, logits, "per_iteration"), rel=1e-6)


@pytest.mark.parametrize("kind", ["final", "per_iteration"])
def test_gate_loss_adds_the_expected_loss_minus_beta_entropy(kind):
    R, beta = 3, 0.25
    batch, out, logits = hand_batch(R, 2, seed=2)
    g = torch.Generator().manual_seed(3)
    out.gate_logits = torch.randn(R, 2, 3, generator=g, dtype=torch.float64)
    got = compute_loss(IdentityHead(), batch, out, kind, gate_beta=beta).item()
    lm = hand_loss(batch, logits, kind)
    # per token: p_r = sigmoid(g_r) prod_{j<r} (1 - sigmoid(g_j)), the rest on the last; L_r is
    # the per-iteration loss against hop r under per_iteration, the final answer under final
    terms = []
    for b in range(2):
        for t in range(3):
            if batch.targets[b, t] == IGNORE:
                continue
            lam = [1 / (1 + math.exp(-out.gate_logits[r, b, t].item())) for r in range(R)]
            lam[-1] = 1.0
            p, survive = [], 1.0
            for r in range(R):
                p.append(lam[r] * survive)
                survive *= 1 - lam[r]
            losses = []
            for r in range(1, R + 1):
                hop = (batch.hop_targets[r - 1] if kind == "per_iteration"
                       and r <= batch.hop_targets.shape[0] else batch.targets)
                y = int(hop[b, t])
                losses.append(0.0 if y == IGNORE else nll(logits[r - 1][b, t].tolist(), y))
            expected = sum(pr * lr for pr, lr in zip(p, losses))
            entropy = -sum(pr * math.log(max(pr, 1e-12)) for pr in p)
            terms.append(expected - beta * entropy)
    assert got == pytest.approx(lm + sum(terms) / len(terms), rel=1e-6)


# -- the learning-rate schedule ------------------------------------------------------------------


def sched(**kw):
    base = dict(lr=1.0, steps=100, warmup_steps=10, warmup_fraction=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("step,expected", [
    (0, 0.1), (4, 0.5), (9, 1.0),  # warmup: (step + 1) / 10
    (10, 1.0),  # the cosine starts at the peak
    (55, 0.1 + 0.9 * 0.5),  # halfway through the 90 cosine steps: midway between 1 and 0.1
    (100, 0.1), (150, 0.1),  # the end, and past it: 10% of the peak
])
def test_schedule_values(step, expected):
    assert lr_at(step, sched()) == pytest.approx(expected, abs=1e-12)


def test_warmup_fraction_sets_the_warmup_and_wins_over_steps():
    t = sched(steps=250, warmup_steps=100, warmup_fraction=0.02)  # 5 warmup steps
    assert lr_at(0, t) == pytest.approx(0.2)
    assert lr_at(4, t) == pytest.approx(1.0)
    assert lr_at(5, t) == pytest.approx(1.0)
    assert lr_at(5 + 245 // 2, t) < 0.6
    assert lr_at(0, sched(warmup_fraction=0.0)) == pytest.approx(1.0)  # no warmup
    with pytest.raises(ConfigError, match="warmup_fraction"):
        load_config(["train.warmup_fraction=1.5"])


# -- parameter groups ------------------------------------------------------------------------------


def test_only_weight_matrices_are_decayed():
    model = make_model(loop=2, **{"n_prelude": 1, "n_coda": 1, "pos_embedding": "true",
                                  "exit_gate": "true"})
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    for n in decayed:  # projections, embeddings, the gate's weight
        assert n.endswith(("_proj.weight", "gate.weight", "up.weight", "down.weight",
                           "embed.weight", "exit_gate.weight")), n
    for n in kept:  # every norm gain (incl. the QK-norms) and the gate's bias
        assert n.endswith(("norm.weight", "exit_gate.bias")), n
    assert any("q_norm" in n for n in kept) and "exit_gate.bias" in kept
    assert "pos_embed.weight" in decayed and "embed.weight" in decayed


@pytest.mark.parametrize("method,expected_decayed", [
    ("denseformer", set()), ("value_residual", set()), ("attn_res", set()),
    ("hyper_connections", {"cross_layer.phi"}), ("mhc", {"cross_layer.phi"}),
])
def test_cross_layer_scalars_and_vectors_are_not_decayed(method, expected_decayed):
    extra = [f"model.cross_layer.method={method}", "model.depth_attention.enabled=false"]
    if method == "value_residual":
        extra.append("model.cross_layer.learnable=true")
    cfg = load_config(["recipe=roots_staircase", "loop=1", "model.n_layers=3"] + extra)
    model = build_model(cfg)
    own = {n for n, _ in model.named_parameters() if n.startswith("cross_layer.")}
    assert own, method
    assert decayed_parameter_names(model) & own == expected_decayed


def test_trainer_optimizer_uses_the_groups(tmp_path):
    from looped.training.trainer import Trainer

    cfg = load_config(["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                       "model.head_dim=16", "model.ffn_dim=64", "train.weight_decay=0.3"])
    trainer = Trainer(cfg, tmp_path)
    decay, no_decay = trainer.opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])


# -- evaluation loop counts ------------------------------------------------------------------------


def test_eval_loops_follow_loop():
    assert default_eval_loops(1) == [1]
    assert default_eval_loops(4) == [1, 2, 3, 4, 6, 8]
    assert default_eval_loops(8) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]
    assert default_eval_loops(16) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    roots = "recipe=roots_staircase"  # the main job's recipe sets eval.loops itself
    assert eval_loops(load_config([roots, "loop=1", "model.n_layers=8"])) == [1]
    assert eval_loops(load_config([roots, "loop=3", "eval.loops=[2,5]"])) == [2, 5]
