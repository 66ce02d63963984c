"""Built-in tasks: every answer recomputed by an independent solver written from the task
descriptions (plain Python over token lists), determinism, answer positions, hop targets, and
held-out difficulty through the config (task.eval.*)."""

from __future__ import annotations

import pytest
import torch

from looped import ConfigError, load_config
from looped.data import IGNORE, build_task

N_SAMPLES = 300


def sample_lists(task, n=N_SAMPLES, seed=0):
    batch = task.sample(n, torch.Generator().manual_seed(seed))
    hops = None if batch.hop_targets is None else batch.hop_targets.tolist()
    return batch, batch.inputs.tolist(), batch.targets.tolist(), hops


# ---------------------------------------------------------------------------------------------
# Independent solvers: (tokens) -> {position: [answer after 1 step, 2 steps, ..., final]}
# (a single-element list where the task has no intermediate steps).


def solve_roots(tokens, n_nodes):
    parent = tokens[:n_nodes]
    assert tokens[n_nodes] == n_nodes  # SEP
    out = {}
    for pos in range(n_nodes + 1, len(tokens)):
        node, steps = tokens[pos], []
        while parent[node] != node:
            node = parent[node]
            steps.append(node)
        assert steps, "a query must not be a root"
        out[pos] = steps
    return out


def solve_chain(tokens, n_consts=5):
    eq, semi, query = 0, 1, 2
    assert tokens[-2] == query
    body = tokens[:-2]
    assert len(body) % 4 == 0
    value = {}
    for k in range(0, len(body), 4):
        lhs, e, rhs, s = body[k:k + 4]
        assert (e, s) == (eq, semi)
        assert lhs >= 3 + n_consts and lhs not in value, "each variable is assigned once"
        value[lhs] = rhs
    node, steps = tokens[-1], []
    while node in value:
        node = value[node]
        steps.append(node)
    assert 3 <= node < 3 + n_consts, "a chain ends in a constant"
    return {len(tokens) - 1: steps}


def solve_phop(tokens, hops):
    for a, b in zip(tokens, tokens[1:]):
        assert a != b, "no two adjacent tokens are equal"
    i, steps = len(tokens) - 1, []
    for _ in range(hops):
        j = i - 1
        while j >= 0 and tokens[j] != tokens[i]:
            j -= 1
        assert j >= 0, "every hop has a previous occurrence"
        i = j + 1
        steps.append(tokens[i])
    return {len(tokens) - 1: steps}


def solve_addition(tokens, digits):
    d = digits
    a, plus, b, eq, c = tokens[:d], tokens[d], tokens[d + 1:2 * d + 1], tokens[2 * d + 1], \
        tokens[2 * d + 2:]
    assert (plus, eq) == (10, 11) and len(c) == d + 1
    number = lambda ds: sum(x * 10 ** k for k, x in enumerate(ds))  # noqa: E731
    total = number(a) + number(b)
    expect = [(total // 10 ** k) % 10 for k in range(d + 1)]
    assert c == expect, "the input holds the true sum"
    # next-token answers: the target at '=' is c_0, at c_k it is c_{k+1}
    return {2 * d + 1 + k: [expect[k]] for k in range(d + 1)}


SOLVERS = {
    "roots": lambda task, toks: solve_roots(toks, task.n_nodes),
    "chain": lambda task, toks: solve_chain(toks),
    "phop": lambda task, toks: solve_phop(toks, task.hops),
    "addition": lambda task, toks: solve_addition(toks, task.digits),
}

# (name, knobs) at the config defaults, the presets, and harder settings
CASES = [
    ("roots", dict(n_chains=4, chain_len=6, n_queries=8)),
    ("roots", dict(n_chains=3, chain_len=9, n_queries=5)),
    ("chain", dict(hops=4, n_distractors=2)),
    ("chain", dict(hops=1, n_distractors=0)),
    ("chain", dict(hops=13, n_distractors=1)),  # 26 variables: the pool grows past 24
    ("chain", dict(hops=4, statements=16, min_hops=1, loops_per_hop=2)),  # rows' own hops
    ("chain", dict(hops=8, statements=16)),  # twice the hops at the same length
    ("chain", dict(hops=3, statements=3)),  # no distractor
    ("phop", dict(hops=4, length=32, alphabet=8)),  # many rows need the fallback
    ("phop", dict(hops=4, length=64, alphabet=4)),
    ("phop", dict(hops=6, length=8, alphabet=3)),  # the tightest: length = hops + 2
    ("addition", dict(digits=5)),
    ("addition", dict(digits=1)),
]


def make(name, knobs):
    """The task as build_task makes it: it receives every TaskConfig knob (text's included)."""
    return build_task(load_config([f"task.name={name}"]
                                  + [f"task.{k}={v}" for k, v in knobs.items()]).task)


@pytest.mark.parametrize("name,knobs", CASES, ids=lambda v: str(v))
def test_answers_match_an_independent_solver(name, knobs):
    task = make(name, knobs)
    batch, inputs, targets, hops = sample_lists(task)
    n, t = len(inputs), task.seq_len
    assert batch.inputs.shape == batch.targets.shape == (n, t)
    assert batch.inputs.dtype == batch.targets.dtype == torch.long
    assert 0 <= batch.inputs.min() and batch.inputs.max() < task.vocab_size
    n_hops = None if hops is None else len(hops)
    for row in range(n):
        answers = SOLVERS[name](task, inputs[row])
        # answer positions are exactly the positions whose target is not IGNORE
        assert sorted(answers) == [p for p in range(t) if targets[row][p] != IGNORE]
        for pos, steps in answers.items():
            assert targets[row][pos] == steps[-1]
            assert 0 <= steps[-1] < task.vocab_size
            if hops is None:
                continue
            for r in range(n_hops):  # hop r + 1: the value after r + 1 steps (final if fewer)
                assert hops[r][row][pos] == steps[min(r, len(steps) - 1)]
        if hops is not None:
            for r in range(n_hops):
                assert all(hops[r][row][p] == IGNORE for p in range(t) if p not in answers)
    if name in ("chain", "phop"):
        assert n_hops == task.hops  # one intermediate target per reasoning step
    if name == "addition":
        assert batch.hop_targets is None


@pytest.mark.parametrize("name", ["roots", "chain", "phop", "addition"])
def test_same_generator_seed_same_batch(name):
    task = make(name, dict(CASES[[c[0] for c in CASES].index(name)][1]))
    a = task.sample(64, torch.Generator().manual_seed(7))
    b = task.sample(64, torch.Generator().manual_seed(7))
    c = task.sample(64, torch.Generator().manual_seed(8))
    torch.manual_seed(123)  # the global RNG must play no part
    d = task.sample(64, torch.Generator().manual_seed(7))
    for x in (b, d):
        assert torch.equal(a.inputs, x.inputs) and torch.equal(a.targets, x.targets)
        if a.hop_targets is not None:
            assert torch.equal(a.hop_targets, x.hop_targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_answers_are_varied():
    """No task gives away its answer by a constant: answers spread over several values."""
    for name, knobs in CASES[::2]:
        task = make(name, knobs)
        batch = task.sample(256, torch.Generator().manual_seed(1))
        answers = batch.targets[batch.targets != IGNORE]
        assert answers.unique().numel() >= 3, name


def test_phop_hop_distances_are_not_degenerate():
    """With room to spare the fallback is unused: the final hop lands well inside the sequence."""
    task = make("phop", dict(hops=4, length=64, alphabet=4))
    _, inputs, _, _ = sample_lists(task, n=200)
    lands = []
    for toks in inputs:
        i = len(toks) - 1
        for _ in range(task.hops):
            j = i - 1
            while toks[j] != toks[i]:
                j -= 1
            i = j + 1
        lands.append(i)
    assert min(lands) > task.hops + 1 and max(lands) - min(lands) > 10


@pytest.mark.parametrize("preset,key,value,grows", [
    ("roots", "chain_len", 7, "chain_len"),
    ("chain", "hops", 8, "hops"),
    ("phop", "hops", 8, "hops"),
    ("phop", "length", 128, "length"),
    ("addition", "digits", 10, "digits"),
])
def test_eval_difficulty_from_config(preset, key, value, grows):
    cfg = load_config([f"task={preset}", f"task.eval.{key}={value}"])
    assert cfg.task.name == preset
    train, held_out = build_task(cfg.task), build_task(cfg.task, split="eval")
    assert getattr(held_out, grows) == value != getattr(train, grows)
    if (preset, key) == ("phop", "hops"):  # same length, deeper answers
        assert held_out.seq_len == train.seq_len
        a = train.sample(200, torch.Generator().manual_seed(0)).targets[:, -1]
        b = held_out.sample(200, torch.Generator().manual_seed(0)).targets[:, -1]
        assert (a != b).float().mean() > 0.3
    else:
        assert held_out.seq_len > train.seq_len
    if preset != "roots":  # roots names nodes by index, so its vocabulary grows with them
        assert held_out.vocab_size == train.vocab_size
    batch = held_out.sample(100, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (100, held_out.seq_len)
    for row in batch.inputs.tolist()[:50]:  # the harder sequences are still solved correctly
        SOLVERS[preset](held_out, row)
    if key == "hops":  # one intermediate target per step, up to the held-out depth
        assert batch.hop_targets.shape[0] == value
    # the training split ignores task.eval
    assert train.sample(4, torch.Generator().manual_seed(0)).inputs.shape[1] == train.seq_len


@pytest.mark.parametrize("preset", ["roots", "chain", "phop", "addition"])
def test_presets_fit_the_default_model(preset):
    cfg = load_config(["recipe=roots_staircase", f"task={preset}"])
    for split in ("train", "eval"):
        task = build_task(cfg.task, split=split)
        assert task.vocab_size <= cfg.model.vocab_size
        assert task.seq_len <= cfg.model.max_seq_len


@pytest.mark.parametrize("overrides", [
    ["task=chain", "task.hops=0"],
    ["task=chain", "task.n_distractors=-1"],
    ["task=phop", "task.length=5", "task.hops=4"],
    ["task=phop", "task.alphabet=1"],
    ["task=addition", "task.digits=0"],
])
def test_bad_knobs_raise_config_error(overrides):
    with pytest.raises(ConfigError):
        build_task(load_config(overrides).task)


def test_held_out_scoring_matches_a_recompute_by_hand():
    """task_accuracy's accuracy and loss equal argmax/cross-entropy over the answer tokens of the
    same held-out batch, recomputed here from the model's logits."""
    from looped import build_model
    from looped.training.scoring import HELD_OUT_SEED_OFFSET, task_accuracy

    cfg = load_config(["recipe=roots_staircase", "loop=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                       "model.head_dim=16", "model.ffn_dim=64"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    task = build_task(cfg.task, split="eval")
    got = task_accuracy(model, task, loops=2, n_samples=24, batch_size=24, seed=cfg.seed)
    batch = task.sample(24, torch.Generator().manual_seed(cfg.seed + HELD_OUT_SEED_OFFSET))
    with torch.no_grad():
        logits = model(batch.inputs, loops=2).logits
    mask = batch.targets != IGNORE
    want_acc = (logits.argmax(-1)[mask] == batch.targets[mask]).float().mean().item()
    want_loss = torch.nn.functional.cross_entropy(logits[mask], batch.targets[mask]).item()
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-12)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["iterations"] == 2.0


class _PointerFollower(torch.nn.Module):
    """A stand-in model for scoring: at each query it follows `loops` parent pointers (so it is
    right exactly for queries of depth <= loops) and puts probability 0.9 on that node, the rest
    spread evenly over the other tokens."""

    P_TOP = 0.9

    def __init__(self, task):
        super().__init__()
        self.task = task
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives task_accuracy a device

    def head(self, hidden):  # scoring runs head() on the hidden state: here the log-probs
        return hidden

    def forward(self, inputs, loops, exit=None, logits=True):
        from types import SimpleNamespace

        n, vocab = self.task.n_nodes, self.task.vocab_size
        parents = inputs[:, :n]
        node = inputs.clone()
        for _ in range(loops):
            node[:, n + 1:] = parents.gather(1, node[:, n + 1:])
        rest = (1 - self.P_TOP) / (vocab - 1)
        probs = torch.full((*inputs.shape, vocab), rest)
        probs.scatter_(2, node.clamp_max(vocab - 1).unsqueeze(-1), self.P_TOP)
        return SimpleNamespace(logits=probs.log() if logits else None, hidden=probs.log(),
                               iterations=torch.full(inputs.shape, loops, dtype=torch.long))


@pytest.mark.parametrize("loops", [1, 3, 5])
def test_held_out_scoring_over_several_batches_against_an_independent_count(loops):
    """40 held-out sequences in batches of 16, 16 and 8, scored by task_accuracy, against the
    independent solver: accuracy is the fraction of queries of depth <= loops, and the loss is
    -log 0.9 on those and -log(0.1 / (vocab - 1)) on the others."""
    import math

    from looped.training.scoring import HELD_OUT_SEED_OFFSET, task_accuracy

    cfg = load_config(["task=roots"])
    task = build_task(cfg.task, split="eval")
    got = task_accuracy(_PointerFollower(task), task, loops=loops, n_samples=40, batch_size=16,
                        seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + HELD_OUT_SEED_OFFSET)
    depths = []
    for size in (16, 16, 8):  # the same draws, batch by batch
        for row in task.sample(size, gen).inputs.tolist():
            depths += [len(steps) for steps in solve_roots(row, task.n_nodes).values()]
    right = sum(d <= loops for d in depths)
    assert 0 < right < len(depths) or loops == 5
    assert got["accuracy"] == pytest.approx(right / len(depths), abs=1e-12)
    wrong_nll = -math.log(0.1 / (task.vocab_size - 1))
    want_loss = (right * -math.log(0.9) + (len(depths) - right) * wrong_nll) / len(depths)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["iterations"] == loops


def test_phop_with_a_range_of_hops_answers_each_rows_own_depth():
    """min_hops: each row's p ~ U{min_hops..hops}; the answer is solve_phop at that row's p,
    and hop_targets past it repeat the answer. The input does not give p; the row's loop
    count (p * loops_per_hop) does, and min_hops without it is refused."""
    task = make("phop", dict(hops=5, length=48, alphabet=4, min_hops=2, loops_per_hop=3))
    batch, inputs, targets, hops = sample_lists(task)
    depths = set()
    for row in range(len(inputs)):
        steps = solve_phop(inputs[row], task.hops)[len(inputs[row]) - 1]
        fits = [p for p in range(2, 6)
                if targets[row][-1] == steps[p - 1]
                and all(hops[r][row][-1] == steps[min(r + 1, p) - 1] for r in range(5))]
        assert fits, row
        assert int(batch.loops[row]) == 3 * min(fits)
        depths.add(min(fits))
    assert len(depths) >= 3  # rows really differ in depth
    with pytest.raises(ConfigError, match="min_hops must be in"):
        make("phop", dict(hops=3, min_hops=4, loops_per_hop=1))
    with pytest.raises(ConfigError, match="min_hops needs loops_per_hop"):
        make("phop", dict(hops=3, min_hops=2))
    assert make("phop", dict(hops=3)).sample(4, torch.Generator().manual_seed(1)).loops is None


def test_chain_rows_draw_their_hops_and_ask_for_loops_in_proportion():
    task = make("chain", dict(hops=4, statements=16, min_hops=2, loops_per_hop=3))
    batch, inputs, _, _ = sample_lists(task, n=400)
    hops = [len(solve_chain(toks)[task.seq_len - 1]) for toks in inputs]
    assert set(hops) == {2, 3, 4}
    assert batch.loops.tolist() == [3 * h for h in hops]
    assert task.seq_len == 4 * 16 + 2


def test_chain_statements_keep_the_length_and_the_distractors():
    """task.eval.hops=8 after hops=4 with statements=16: sequences of the same length, and the
    queried chain's constant is not the only one (a distractor chain ends in its own)."""
    cfg = load_config(["task=chain", "task.statements=16", "task.hops=4", "task.eval.hops=8"])
    train, held_out = build_task(cfg.task), build_task(cfg.task, split="eval")
    assert train.seq_len == held_out.seq_len == 66
    _, inputs, _, _ = sample_lists(held_out, n=100)
    for toks in inputs:
        assert len(solve_chain(toks)[65]) == 8
        ends = [toks[k + 2] for k in range(0, 64, 4) if 3 <= toks[k + 2] < 8]
        assert len(ends) == 2  # the queried chain's and the one distractor's


@pytest.mark.parametrize("knobs, fragment", [
    (dict(hops=4, statements=3), "statements must be 0 or >= hops=4"),
    (dict(hops=4, min_hops=5), "min_hops must be in [0, hops=4]"),
    (dict(hops=4, loops_per_hop=-1), "loops_per_hop must be >= 0"),
])
def test_chain_bad_knobs_are_one_line(knobs, fragment):
    with pytest.raises(ConfigError) as err:
        make("chain", knobs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
