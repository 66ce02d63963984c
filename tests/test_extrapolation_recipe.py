"""The loop-extrapolation recipe, pinned: the prefix_sums task against an independent solver,
the progressive loss against a hand composition of its two forwards, per-row loop counts against
one forward per row, the state normalisation, and the `solved` score."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, max_diff, rand_ids, tiny_cfg

from looped import build_model, load_config
from looped.data import build_task
from looped.data.base import IGNORE, Batch
from looped.data.prefix_sums import PrefixSumsTask
from looped.errors import ConfigError, ShapeError
from looped.training.losses import LOSSES, ProgressiveLoss, Step, build_objective, final_loss
from looped.model.lm import LMOutput
from looped.training.scoring import task_accuracy

pytestmark = pytest.mark.usefixtures("single_thread")


# -- prefix_sums ----------------------------------------------------------------------------


def solve_prefix_sums(bits: list[int]) -> list[int]:
    """The running parity, one bit at a time (no tensors)."""
    out, acc = [], 0
    for b in bits:
        acc ^= b
        out.append(acc)
    return out


@pytest.mark.parametrize("min_length", [0, 3])
def test_prefix_sums_targets_equal_an_independent_solver(min_length):
    task = PrefixSumsTask(length=12, min_length=min_length)
    batch = task.sample(64, torch.Generator().manual_seed(5))
    assert batch.inputs.shape == (64, 13) and task.vocab_size == 4 and task.seq_len == 13
    assert batch.inputs[:, 0].eq(task.BOS).all() and batch.targets[:, 0].eq(IGNORE).all()
    lengths = set()
    for row_in, row_t in zip(batch.inputs[:, 1:].tolist(), batch.targets[:, 1:].tolist()):
        n = row_in.index(task.PAD) if task.PAD in row_in else len(row_in)
        lengths.add(n)
        assert all(b in (0, 1) for b in row_in[:n]) and set(row_in[n:]) <= {task.PAD}
        assert row_t[:n] == solve_prefix_sums(row_in[:n])
        assert set(row_t[n:]) <= {IGNORE}
    assert lengths == ({12} if min_length == 0 else lengths) and min(lengths) >= max(min_length, 1)
    if min_length:
        assert len(lengths) > 3  # lengths really vary


def test_prefix_sums_last_answers_the_parity_at_the_end_only():
    task = PrefixSumsTask(length=9, min_length=2, answer="last", bos=False)
    batch = task.sample(32, torch.Generator().manual_seed(6))
    for row_in, row_t in zip(batch.inputs.tolist(), batch.targets.tolist()):
        n = row_in.index(task.PAD) if task.PAD in row_in else len(row_in)
        want = [IGNORE] * 9
        want[n - 1] = sum(row_in[:n]) % 2
        assert row_t == want


def test_prefix_sums_asks_loops_proportional_to_length():
    task = PrefixSumsTask(length=10, min_length=1, loops_per_bit=1.5)
    batch = task.sample(40, torch.Generator().manual_seed(7))
    n = (batch.inputs[:, 1:] != task.PAD).sum(1)
    assert batch.loops.tolist() == [math.ceil(1.5 * v) for v in n.tolist()]
    assert PrefixSumsTask(length=10).sample(2, torch.Generator()).loops is None
    assert batch.rows(3, 5).loops.tolist() == batch.loops[3:5].tolist()


def test_prefix_sums_held_out_split_is_longer():
    cfg = load_config(["task=prefix_sums", "task.length=8", "task.eval.length=32",
                       "model.vocab_size=4", "model.max_seq_len=33"])
    assert build_task(cfg.task).seq_len == 9 and build_task(cfg.task, split="eval").seq_len == 33
    assert build_task(cfg.task, split="eval").sample(2, torch.Generator()).inputs.shape == (2, 33)


@pytest.mark.parametrize("bad,fragment", [
    ("task.length=0", "length must be >= 1"),
    ("task.min_length=9", "min_length must be in [0, length=8]"),
    ("task.answer=first", "answer must be one of all, last"),
    ("task.loops_per_bit=-1", "loops_per_bit must be >= 0"),
    ("task.eval.min_length=20", "held-out split"),
])
def test_prefix_sums_bad_knobs_are_one_line_errors(bad, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(["task=prefix_sums", "task.length=8", "model.vocab_size=4", bad])
    assert fragment in str(err.value) and "\n" not in str(err.value)


# -- the progressive loss -------------------------------------------------------------------


def test_progressive_draw_covers_its_support_uniformly():
    """n ~ U{0..m-1}, then k ~ U{1..m-n}: every (n, k) with n + k <= m, n < m occurs."""
    g = torch.Generator().manual_seed(0)
    m = 4
    draws = [ProgressiveLoss.draw(m, g) for _ in range(4000)]
    assert {d for d in draws} == {(n, k) for n in range(m) for k in range(1, m - n + 1)}
    for n in range(m):  # P(n) = 1/m
        assert sum(d[0] == n for d in draws) / len(draws) == pytest.approx(1 / m, abs=0.03)


class Recorder:
    """A forward stub: records each (loops, grad_loops) call; the logits are a fixed random
    function of the loop count, so the test can compose the loss by hand."""

    def __init__(self, batch: Batch, vocab: int = 3):
        self.calls, self.batch, self.vocab = [], batch, vocab

    def logits(self, loops: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + loops)
        return torch.randn(*self.batch.targets.shape, self.vocab, generator=g)

    def __call__(self, loops, grad_loops):
        self.calls.append((loops, grad_loops))
        return LMOutput(self.logits(loops), layout=None, states=[])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_progressive_loss_equals_its_hand_composition(alpha):
    batch = PrefixSumsTask(length=6).sample(4, torch.Generator().manual_seed(1))
    fwd = Recorder(batch)
    m, seed = 7, 11
    got = ProgressiveLoss(alpha)(Step(None, fwd, batch, m, torch.Generator().manual_seed(seed)))
    n, k = ProgressiveLoss.draw(m, torch.Generator().manual_seed(seed))
    ce = lambda r: F.cross_entropy(fwd.logits(r).flatten(0, 1), batch.targets.flatten())  # noqa
    want = alpha * ce(n + k) + (1 - alpha) * ce(m)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # the progressive forward runs n + k iterations with gradient through the last k only;
    # L_m's forward (absent at alpha = 1) follows the run's own truncation
    assert fwd.calls[0] == (n + k, k)
    assert fwd.calls[1:] == ([] if alpha == 1 else [(m, None)])


def test_progressive_loss_gradient_skips_the_first_n_iterations():
    """Through the real model: the loss's gradient equals that of a model whose first n
    iterations ran under no_grad (and differs from the full-gradient one when n > 0)."""
    model = make_model(seed=3, loop=4, n_layers=1).train()
    ids = rand_ids(batch=2, tokens=8, seed=3)
    batch = Batch(ids, rand_ids(batch=2, tokens=8, seed=4))
    seed = next(s for s in range(100)  # a draw with n > 0
                if ProgressiveLoss.draw(4, torch.Generator().manual_seed(s))[0] > 0)
    n, k = ProgressiveLoss.draw(4, torch.Generator().manual_seed(seed))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fwd = lambda r, g: model(ids, loops=r, grad_loops=g, return_states=True)  # noqa: E731
    got = grads(ProgressiveLoss(1.0)(Step(model, fwd, batch, 4,
                                          torch.Generator().manual_seed(seed))))
    want = grads(final_loss(batch, model(ids, loops=n + k, grad_loops=k)))
    full = grads(final_loss(batch, model(ids, loops=n + k)))
    assert max_diff(got, want) <= 1e-6 and max_diff(got, full) > 1e-6


def test_objectives_are_chosen_by_name_with_their_knobs():
    assert {"final", "per_iteration", "progressive"} <= set(LOSSES)
    cfg = load_config(["train.objective.loss=progressive", "train.objective.alpha=0.25"])
    objective = build_objective(cfg.train.objective)
    assert isinstance(objective, ProgressiveLoss) and objective.alpha == 0.25
    for bad, fragment in [(["train.objective.loss=progressive", "train.objective.alpha=2"],
                           "alpha must be in [0, 1]"),
                          (["train.objective.loss=nope"], "unknown loss 'nope'"),
                          (["train.loss=final"], "is now 'train.objective.loss'"),
                          (["train.objective.loss=final", "train.objective.alpha=0.5"],
                           "train.objective.alpha")]:
        with pytest.raises(ConfigError) as err:
            load_config(bad)
        assert fragment in str(err.value), str(err.value)


# -- per-row loop counts --------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_row_loops_equal_one_forward_per_row(enabled):
    """A row run with row_loops = r_b gives what that row alone gives at loops = r_b: its tokens
    freeze after r_b iterations, and nothing leaks between rows."""
    model = make_model(seed=8, loop=5, n_layers=2, enabled=enabled, policy="same_layer"
                       if enabled else None)
    ids = rand_ids(batch=4, tokens=10, seed=8)
    row_loops = torch.tensor([3, 5, 1, 4])
    with torch.no_grad():
        out = model(ids, row_loops=row_loops)
        for b, r in enumerate(row_loops.tolist()):
            alone = model(ids[b:b + 1], loops=r)
            assert max_diff(out.logits[b:b + 1], alone.logits) <= 1e-5
    assert out.iterations.tolist() == [[r] * 10 for r in row_loops.tolist()]


def test_row_loops_bad_shapes_are_one_line_errors():
    model = make_model(seed=0, loop=3)
    ids = rand_ids(batch=2, tokens=4)
    for row_loops, loops, fragment in [(torch.tensor([1, 2, 3]), None, "must be (batch,)"),
                                       (torch.tensor([0, 2]), None, "must be >= 1"),
                                       (torch.tensor([2, 3]), 2, "fewer than the largest")]:
        with pytest.raises(ShapeError) as err:
            model(ids, loops=loops, row_loops=row_loops)
        assert fragment in str(err.value)


def test_training_with_per_row_loops_runs_and_needs_a_task_that_gives_them(tmp_path):
    from looped.training.trainer import Trainer

    base = ["recipe=roots_staircase", "task=prefix_sums", "task.length=6", "task.min_length=2", "model.vocab_size=4",
            "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
            "model.head_dim=8", "model.ffn_dim=32", "model.max_seq_len=16", "loop=4",
            "train.loop_sampling.sampler=task", "train.batch_size=8"]
    trainer = Trainer(load_config(base + ["task.loops_per_bit=1.0"]), tmp_path / "a")
    row = trainer.train_step()
    assert math.isfinite(row["loss"]) and 2 <= row["loops"] <= 6
    with pytest.raises(ConfigError, match="gives no per-row loop counts"):
        Trainer(load_config(base), tmp_path / "b")


# -- state normalisation, and the solved score ------------------------------------------------


def test_state_norm_hands_on_states_of_its_gain():
    """Each iteration's state is RMS-normalised times the learned gain; a fresh model's gain is
    init_std (the embedding's scale)."""
    model = make_model(seed=2, loop=3, state_norm="true")
    plain = make_model(seed=2, loop=3)
    ids = rand_ids(batch=2, tokens=6, seed=2)
    with torch.no_grad():
        gain = torch.rand(model.cfg.d_model, generator=torch.Generator().manual_seed(2)) + 0.5
        model.state_norm.weight.copy_(gain)
        states = model(ids, return_states=True).states
        assert max_diff(model(ids).logits, plain(ids).logits) > 1e-3
    for s in states:
        rms = (s / gain).pow(2).mean(-1).sqrt()
        assert max_diff(rms, torch.ones_like(rms)) <= 1e-4
    torch.manual_seed(0)
    fresh = build_model(tiny_cfg(loop=3, state_norm="true"))
    assert bool((fresh.state_norm.weight == fresh.cfg.init_std).all())


def test_state_norm_refuses_a_cross_layer_method():
    with pytest.raises(ConfigError, match="state_norm"):
        tiny_cfg(loop=2, state_norm="true", extra=("model.cross_layer.method=denseformer",))


class Oracle(torch.nn.Module):
    """Predicts prefix sums perfectly except at position `wrong` of every other row."""

    def __init__(self, wrong: int):
        super().__init__()
        self.wrong, self.dummy = wrong, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, loops=None, exit=None, logits=True):
        sums = torch.where(ids <= 1, ids, 0).cumsum(1) % 2
        sums[::2, self.wrong] ^= 1
        scores = F.one_hot(sums, 4).float()
        # logits=False: scoring runs head() on the hidden state, here the logits themselves
        return LMOutput(scores if logits else None, None, iterations=torch.ones_like(ids),
                        hidden=None if logits else scores)

    def head(self, hidden):
        return hidden


def test_solved_counts_sequences_with_every_answer_right():
    task = PrefixSumsTask(length=8)  # position 3 is the third bit (after BOS)
    res = task_accuracy(Oracle(wrong=3), task, loops=1, n_samples=64, batch_size=16, seed=0)
    assert res["solved"] == pytest.approx(0.5)
    assert res["accuracy"] == pytest.approx(1 - 0.5 / 8)


# -- sliding-window sequence attention ------------------------------------------------------


def test_attn_window_bounds_the_receptive_field_to_loops_times_layers():
    """With window w, one layer application lets a token read w - 1 tokens back; R iterations of
    an L-layer core reach R * L * (w - 1) back, and no further."""
    model = make_model(seed=4, loop=3, n_layers=1, attn_window=2)
    ids = rand_ids(batch=1, tokens=12, seed=4)
    i, reach = 10, 3  # position 10 reads back to 10 - 3 = 7
    with torch.no_grad():
        base = model(ids).logits[0, i]
        for j, changes in ((i - reach - 1, False), (i - reach, True)):
            other = ids.clone()
            other[0, j] = (other[0, j] + 1) % 16
            diff = max_diff(model(other).logits[0, i], base)
            assert (diff > 1e-4) == changes, (j, diff)


def test_attn_window_covering_the_sequence_is_full_attention():
    ids = rand_ids(batch=2, tokens=10, seed=5)
    with torch.no_grad():
        full = make_model(seed=5, loop=2)(ids).logits
        wide = make_model(seed=5, loop=2, attn_window=10)(ids).logits
    assert max_diff(full, wide) <= 1e-6


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_attn_window_cached_decode_equals_the_full_forward(kernel):
    from conftest import decode_logits

    model = make_model(seed=6, loop=3, n_layers=2, attn_window=3, kernel=kernel)
    ids = rand_ids(batch=2, tokens=11, seed=6)
    with torch.no_grad():
        full = model(ids).logits
        assert max_diff(decode_logits(model, ids, (4,)), full) <= 1e-5
    ref = make_model(seed=6, loop=3, n_layers=2, attn_window=3, kernel="eager")
    with torch.no_grad():
        assert max_diff(ref(ids).logits, full) <= 1e-5
