"""Audit: seven plausible one-line bugs ("mutants") that survived the suite, each pinned here:
phop's per-row hop count reaching `hops`; the difficulty grid's "seeds reaching 0.9" counting a
score of exactly 0.9; the trainer pricing a step's FLOPs at the loop count it sampled; the MLA
`depth_keys=own` FLOP count at loop > 1 (a looped core's earlier iterations are its own layer);
the FLOPs of the matmul that measures a CPU's peak; activation checkpointing refusing a
cross-layer stream in every mode, through the Python API; and lm-eval's greedy flag requiring
every continuation token to be the argmax.

Each test names the bug it catches in its docstring. Everything is tiny and in-process.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import (LOOPED_MODEL, VOCAB, continuation_log_likelihood, make_model, randomize_,
                      tiny_cfg)

from looped import build_model, load_config
from looped.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


# -- 1. phop: each row's p ~ U{min_hops..hops}, hops included -----------------------------------


def test_phop_rows_draw_every_hop_count_up_to_hops():
    """Bug caught: phop drawing each row's p with `randint(min_hops, hops)` (the upper bound
    exclusive) instead of `hops + 1`: no row would ever train at the largest hop count."""
    from looped.data import build_task

    cfg = load_config(["task.name=phop", "task.hops=4", "task.min_hops=2", "task.length=32",
                       "task.alphabet=4", "task.loops_per_hop=1"])
    task = build_task(cfg.task)
    batch = task.sample(64, torch.Generator().manual_seed(3))
    # loops_per_hop=1: a row's loop count is its p
    assert set(batch.loops.tolist()) == {2, 3, 4}
    # the deepest rows answer after 4 hops: their 3rd and 4th hop targets differ somewhere
    deep = batch.loops == 4
    hop3, hop4 = batch.hop_targets[2, deep, -1], batch.hop_targets[3, deep, -1]
    assert torch.equal(batch.targets[deep, -1], hop4) and bool((hop3 != hop4).any())


# -- 2. difficulty grid: a seed reaches a level at a best accuracy of at least 0.9 ----------------


def test_seed_table_counts_a_best_accuracy_of_exactly_0_9_as_reaching():
    """Bug caught: the difficulty grid's "seeds >= 0.9" column counting a seed as reaching a
    level only when its best accuracy is strictly above 0.9 (`>` for `>=`)."""
    from looped.tools.difficulty_grid import SOLVED_AT, GridRun, seed_table

    assert SOLVED_AT == 0.9

    def run(name, by_r):
        return GridRun(name, 4, 8, {8: {r: {"accuracy": a} for r, a in by_r.items()}})

    # best accuracies 0.9 (exactly, at R=8), 0.95, 0.89: two of three seeds reach it
    lines = seed_table([run("v/seed0", {4: 0.5, 8: 0.9}), run("v/seed1", {4: 0.95, 8: 0.6}),
                        run("v/seed2", {4: 0.89, 8: 0.1})], "length")
    assert lines[0] == "## v: mean (min..max) over 3 seeds"
    assert lines[4].endswith("| 2/3 |"), lines[4]


# -- 3. trainer: a step's FLOPs at the loop count it sampled -----------------------------------

TRAIN_RUN = ["recipe=roots_staircase", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
             "model.head_dim=16",
             "model.ffn_dim=64", "model.vocab_size=12", "model.max_seq_len=16", "device=cpu",
             "task=roots", "task.n_chains=2", "task.chain_len=3", "task.n_queries=3",
             "loop=4", "train.loop_sampling.sampler=uniform", "train.batch_size=4",
             "train.steps=20"]


def test_trainer_prices_a_step_at_its_sampled_loop_count(tmp_path):
    """Bug caught: the trainer pricing a step's FLOPs (the logged `flops`, what MFU divides) at
    cfg.loop instead of the step's sampled R."""
    from looped.training.flops import train_flops_per_token
    from looped.training.loop_sampling import sample_loops
    from looped.training.trainer import Trainer

    cfg = load_config(TRAIN_RUN)
    trainer = Trainer(cfg, tmp_path)
    # a step whose sampled R is not cfg.loop (and not 1, whose pricing is degenerate elsewhere)
    step = next(s for s in range(100)
                if sample_loops(cfg.train.loop_sampling, cfg.loop, cfg.seed, s) in (2, 3))
    r = sample_loops(cfg.train.loop_sampling, cfg.loop, cfg.seed, step)
    trainer.step = step
    row = trainer.train_step()
    assert row["loops"] == r != cfg.loop
    b, t = cfg.train.batch_size, trainer.task.seq_len
    assert row["tokens"] == b * t
    grad_loops = cfg.train.grad_loops or None
    want = train_flops_per_token(trainer.model, r, grad_loops, t) * b * t
    wrong = train_flops_per_token(trainer.model, cfg.loop, grad_loops, t) * b * t
    assert want < 0.9 * wrong  # guard: the two prices are far apart
    assert row["flops"] == pytest.approx(want, rel=1e-12)


# -- 4. MLA depth_keys=own FLOPs at loop > 1 ---------------------------------------------------

MLA = ("model.attention=mla", "model.mla.kv_rank=12", "model.mla.nope_dim=6",
       "model.mla.rope_dim=4", "model.mla.v_dim=5")


def test_mla_own_keys_flops_leave_out_the_positions_own_layer_at_loop_3():
    """Bug caught: looped.training.flops.other_layers counting position p's own layer among its
    source layers. Under depth_keys=own a source of p's own layer (an earlier iteration of a
    looped core) uses p's own W_UK, whose latent query is already computed: no extra
    projection. Invisible at loop=1 (no source is then p's own layer); here at loop=3 with dense
    sources, the extra projections `own` runs (torch's FlopCounterMode, against the same
    weights under `absorbed`) equal the flops module's, and a count by hand from the layout."""
    from torch.utils.flop_counter import FlopCounterMode

    from looped.training.flops import depth_attention_flops, other_layers

    loops, t = 3, 8
    kw = dict(loop=loops, policy="dense", **LOOPED_MODEL)  # prelude 1, core 2 x 3, coda 1
    own = make_model(seed=4, extra=(*MLA, "model.mla.depth_keys=own"), **kw)
    absorbed = build_model(tiny_cfg(extra=(*MLA, "model.mla.depth_keys=absorbed"), **kw)).eval()
    absorbed.load_state_dict(own.state_dict())
    ids = torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(4))
    counts = []
    for m in (own, absorbed):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(ids)
        counts.append(counter.get_total_flops())

    # by hand: the layer of each depth position, then the other layers among p's sources
    c = own.cfg
    n_pre, n_core = c.n_prelude, c.n_layers

    def layer(q):
        if q < n_pre:
            return ("prelude", q)
        if q < n_pre + n_core * loops:
            return ("core", (q - n_pre) % n_core)
        return ("coda", q - n_pre - n_core * loops)

    sources = own.depth_sources(loops)
    assert len(sources) == n_pre + n_core * loops + c.n_coda == 8
    hand = [len({layer(j) for j in s} - {layer(p)}) for p, s in enumerate(sources)]
    # guard: dense sources at loop 3 do read the position's own layer, at every core position
    # of the 2nd and 3rd iterations
    assert sum(layer(p) in {layer(j) for j in s} for p, s in enumerate(sources)) == 4
    assert [other_layers(own, p, s, loops) for p, s in enumerate(sources)] == hand
    per_projection = 2 * c.n_heads * c.mla.nope_dim * c.mla.kv_rank
    assert counts[0] - counts[1] == sum(hand) * per_projection * t
    extra = depth_attention_flops(own, loops) - depth_attention_flops(absorbed, loops)
    assert extra * t == counts[0] - counts[1]


# -- 5. the measured CPU peak counts 2 n^3 FLOPs per matmul -----------------------------------


def test_measured_cpu_peak_counts_two_n_cubed_flops_per_matmul(monkeypatch):
    """Bug caught: the measured CPU peak (looped.training.throughput.measured_cpu_peak, the
    matmul peak MFU divides by on CPU) counting n**3 FLOPs for an (n x n) @ (n x n) matmul
    instead of 2 * n**3. The clock is faked, so every timed matmul takes exactly 0.5 s."""
    from looped.training import throughput

    clock = iter(0.5 * i for i in range(1000))  # each reading 0.5 s after the previous one
    monkeypatch.setattr(throughput, "time",
                        types.SimpleNamespace(perf_counter=lambda: next(clock)))
    measure = getattr(throughput.measured_cpu_peak, "__wrapped__",
                      throughput.measured_cpu_peak)  # past its functools.cache
    n = 16
    peak = measure(1, n=n, repeats=3)
    assert peak == pytest.approx(2 * n ** 3 / 0.5, rel=1e-12)


# -- 6. activation checkpointing refuses a cross-layer stream in every mode --------------------


def test_activation_checkpointing_api_refuses_cross_layer_streams_in_every_mode():
    """Bug caught: apply_activation_checkpointing (looped.model.parallelize) refusing a
    cross-layer method only for mode `block`. Every mode that recomputes (all but `none`) must
    refuse it; load_config's own check hides this from callers of the Python API, so the model
    is built with checkpointing off and the API called directly."""
    from looped.model.parallelize import CHECKPOINTING_MODES, apply_activation_checkpointing

    assert set(CHECKPOINTING_MODES) == {"none", "iteration", "block"}
    model = make_model(seed=6, loop=2, extra=("model.cross_layer.method=denseformer",))
    assert model.cfg.cross_layer.method == "denseformer"
    for mode in ("iteration", "block"):
        with pytest.raises(ConfigError, match="plain residual"):
            apply_activation_checkpointing(model, mode)
        assert model.checkpointing == "none", mode
    assert apply_activation_checkpointing(model, "none").checkpointing == "none"
    plain = make_model(seed=6, loop=2)  # guard: the plain stream takes every mode
    for mode in CHECKPOINTING_MODES:
        assert apply_activation_checkpointing(plain, mode).checkpointing == mode


# -- 7. lm-eval's greedy flag: every continuation token the argmax ----------------------------

LM_RUN = ["task=text", "model.vocab_size=256", "task.seq_len=24", "model.max_seq_len=32",
          "train.objective.loss=final", "train.loop_sampling.sampler=fixed", "loop=2",
          "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
          "model.ffn_dim=64", "model.n_layers=1", "device=cpu"]


@pytest.fixture(scope="module")
def lm_eval_model(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from looped.integrations.lm_eval_model import LoopedEvalLM
    from looped.training.checkpoint import save_checkpoint, save_run_config

    cfg = load_config(LM_RUN)
    run = tmp_path_factory.mktemp("audit_lm_eval") / "run"
    torch.manual_seed(0)
    model = randomize_(build_model(cfg), seed=7)
    save_run_config(run, cfg)
    save_checkpoint(run, 1, model, {"step": 1})
    return LoopedEvalLM(str(run), device="cpu", batch_size=4)


def _greedy(model, context: list[int], n: int, wrong: set[int]) -> list[int]:
    """n continuation tokens: the model's argmax after context + the tokens so far, except at
    the indices in `wrong`, where the runner-up. Every choice has a clear margin."""
    out = []
    for i in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([context + out])).logits[0, -1]
        top = logits.topk(3)
        assert float(top.values[0] - top.values[1]) > 1e-3  # no near-tie at the argmax
        out.append(int(top.indices[1 if i in wrong else 0]))
    return out


def test_lm_eval_greedy_flag_needs_every_continuation_token_to_be_the_argmax(lm_eval_model):
    """Bug caught: lm-eval's greedy flag (LoopedEvalLM._score_batch) set when any continuation
    token is the model's argmax (`.any()`) instead of every one (`.all()`). An untrained
    model's flags are all False either way; here continuations follow the model's own argmax at
    some positions and not at others."""
    lm = lm_eval_model
    g = torch.Generator().manual_seed(17)
    contexts = [torch.randint(0, 256, (k,), generator=g).tolist() for k in (5, 9, 7, 6)]
    n = 4
    cases = [(contexts[0], set(), True),  # all argmax
             (contexts[1], {3}, False),  # all but the last
             (contexts[2], {0}, False),  # all but the first
             (contexts[3], {0, 1, 2, 3}, False)]  # none: False with `.any()` too (a guard)
    requests = [(None, ctx, _greedy(lm.model, ctx, n, wrong)) for ctx, wrong, _ in cases]
    got = lm._loglikelihood_tokens(requests)
    assert [flag for _, flag in got] == [want for _, _, want in cases]
    # and each log-likelihood is that of the model's full forward
    for (_, ctx, cont), (ll, _) in zip(requests, got):
        with torch.no_grad():
            want = continuation_log_likelihood(lm.model, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4)
