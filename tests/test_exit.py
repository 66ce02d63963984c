"""Adaptive exit: the criteria's definitions, cached decoding == full forward under every
criterion (tokens exiting at different iterations, the all-exited early break included), the
float64 reference with frozen tokens, criteria that never fire, the frozen-token cache rule,
the halting distribution and gate loss, and generation with exit.

Thresholds are picked from the per-token statistic of a run without exit: the midpoint of the
widest gap between observed values around the median, so that tokens fall clearly on both sides
and exit at different iterations.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from looped import load_config
from looped.errors import ConfigError
from looped.model.depth_pass import DepthPass
from looped.model.exit import (EXIT_CRITERIA, EntropyExit, ExitCriterion, GateExit,
                               IterationView, KLExit, LatentExit, MaxLoopsExit, build_exit,
                               gate_loss, halting_distribution)

from conftest import (LOOPED_MODEL, RefExit, decode_run, make_model, max_diff, model_sources,
                      naive_looped, rand_ids)

pytestmark = pytest.mark.usefixtures("single_thread")

R = 4
CRITERIA = ["kl", "entropy", "latent", "gate", "max_loops"]
VARIANTS = {  # the looped model under test: R=4, 1 prelude, 2 core layers, 1 coda, exit gate
    "same_layer": dict(policy="same_layer", injection="add", init_state="zeros"),
    "dense-raw": dict(policy="dense", mix="raw", injection="none", init_state="embed"),
}


def exit_model(variant: str, seed: int):
    return make_model(seed=seed, loop=R, exit_gate="true", **VARIANTS[variant], **LOOPED_MODEL)


def make_exit(name: str, threshold: float):
    if name == "max_loops":
        return MaxLoopsExit(after=int(threshold))
    return EXIT_CRITERIA[name](threshold=threshold)


def _head64(model, s):
    eps = model.cfg.norm_eps
    s = s.double()
    normed = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + eps) * model.norm.weight.double()
    return normed @ model.embed.weight.double().T


@torch.no_grad()
def exit_statistics(model, ids, name: str, loops=None) -> torch.Tensor:
    """(R, B, T) float64: the criterion's statistic after each iteration of a no-exit run
    (NaN where it is undefined: KL at the first iteration)."""
    out = model(ids, loops=loops, return_states=True)
    states = [s.double() for s in out.states]
    lps = [torch.log_softmax(_head64(model, s), -1) for s in states]
    init = torch.zeros_like(states[0]) if model.cfg.init_state == "zeros" else None
    stats = []
    for r, s in enumerate(states):
        if name == "entropy":
            stats.append(-(lps[r].exp() * lps[r]).sum(-1))
        elif name == "kl":
            stats.append(torch.full(s.shape[:2], math.nan, dtype=torch.float64) if r == 0 else
                         (lps[r].exp() * (lps[r] - lps[r - 1])).sum(-1))
        elif name == "latent":
            prev = states[r - 1] if r else init
            stats.append(torch.full(s.shape[:2], math.nan, dtype=torch.float64) if prev is None
                         else (s - prev).norm(dim=-1) / s.norm(dim=-1))
        elif name == "gate":
            lam = torch.sigmoid(out.gate_logits.double())
            stats.append(1 - torch.prod(1 - lam[:r + 1], dim=0))
    return torch.stack(stats)


# the iteration whose statistic the threshold splits: the first where the criterion can fire
SPLIT_AT = {"entropy": 0, "gate": 0, "kl": 1, "latent": 1}


def pick_threshold(model, ids, name: str, loops=None) -> float:
    """A threshold that splits the tokens at iteration SPLIT_AT[name] of a no-exit run: the
    midpoint of the widest gap between the observed values from the 30% to the 70% quantile,
    so that decisions there sit far from it."""
    if name == "max_loops":
        return 2
    vals = exit_statistics(model, ids, name, loops)[SPLIT_AT[name]].flatten().sort().values
    n = len(vals)
    seg = vals[int(0.3 * (n - 1)):int(0.7 * (n - 1)) + 1]
    gaps = seg[1:] - seg[:-1]
    j = int(gaps.argmax())
    return float((seg[j] + seg[j + 1]) / 2)


class MarginRecorder(ExitCriterion):
    """Wraps a criterion and records, at every check before the last iteration, the smallest
    |statistic - threshold| over the tokens still running: how far the decisions that matter
    sit from the threshold (fp32 noise between two equivalent runs is ~1e-6)."""

    def __init__(self, name: str, crit: ExitCriterion, loops: int):
        self.name, self.crit, self.loops = name, crit, loops
        self.margins: list[float] = []

    def init(self):
        self.crit.init()
        self.done = self.prev_lp = self.survive = None

    def check(self, it):
        stop = self.crit.check(it)
        stat = None
        if self.name in ("kl", "entropy"):
            lp = torch.log_softmax(it.head(it.state).double(), -1)
            if self.name == "entropy":
                stat = -(lp.exp() * lp).sum(-1)
            elif self.prev_lp is not None:
                stat = (lp.exp() * (lp - self.prev_lp)).sum(-1)
            self.prev_lp = lp
        elif self.name == "latent":
            s, p = it.state.double(), it.prev_state.double()
            stat = (s - p).norm(dim=-1) / s.norm(dim=-1)
        elif self.name == "gate":
            lam = torch.sigmoid(it.gate(it.state).double())
            self.survive = 1 - lam if self.survive is None else self.survive * (1 - lam)
            stat = 1 - self.survive
        running = torch.ones_like(stop) if self.done is None else ~self.done
        if stat is not None and it.r < self.loops - 1 and running.any():
            self.margins.append(float((stat - self.crit.threshold).abs()[running].min()))
        self.done = stop if self.done is None else self.done | stop
        return stop


# ---------------------------------------------------------------------------------------------
# The criteria's definitions, on hand-made iteration views


def _view(r, state, prev, head=None, gate=None):
    return IterationView(r, state, prev, head or (lambda s: s), gate)


def test_entropy_exit_definition():
    g = torch.Generator().manual_seed(60)
    logits = torch.randn(2, 5, 7, generator=g) * torch.tensor([0.1, 3.0]).view(2, 1, 1)
    p = logits.softmax(-1)
    ent = -(p * p.log()).sum(-1)
    crit = EntropyExit(threshold=float(ent.median()))
    crit.init()
    got = crit.check(_view(0, logits, torch.zeros_like(logits)))
    assert torch.equal(got, ent < float(ent.median()))
    assert 0 < got.sum() < got.numel()


def test_kl_exit_definition():
    g = torch.Generator().manual_seed(61)
    a = torch.randn(2, 6, 9, generator=g)
    b = a + torch.randn(2, 6, 9, generator=g) * torch.linspace(0.01, 2.0, 6).view(1, 6, 1)
    kl = (b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum(-1)
    th = float(kl.median())
    crit = KLExit(threshold=th)
    crit.init()
    assert not crit.check(_view(0, a, a)).any()  # nothing to compare with at the first one
    got = crit.check(_view(1, b, a))
    assert torch.equal(got, kl < th) and 0 < got.sum() < got.numel()
    crit.init()  # init forgets the previous distribution
    assert not crit.check(_view(0, b, a)).any()


def test_latent_exit_definition():
    g = torch.Generator().manual_seed(62)
    prev = torch.randn(3, 4, 8, generator=g)
    state = prev + torch.randn(3, 4, 8, generator=g) * torch.rand(3, 4, 1, generator=g)
    rel = (state - prev).norm(dim=-1) / state.norm(dim=-1)
    th = float(rel.median())
    got = LatentExit(threshold=th).check(_view(2, state, prev))
    assert torch.equal(got, rel < th) and 0 < got.sum() < got.numel()


def test_gate_exit_is_cumulative_halting_probability():
    g = torch.Generator().manual_seed(63)
    logits = torch.randn(5, 2, 6, generator=g)  # (R, B, T)
    p = halting_distribution(logits)
    cum = p.cumsum(0)
    th = 0.6
    crit = GateExit(threshold=th)
    crit.init()
    first = torch.full((2, 6), 5)
    state = torch.zeros(2, 6, 3)
    for r in range(5):
        stop = crit.check(_view(r, state, state, gate=lambda s, r=r: logits[r]))
        # the cumulative halting probability after r: sum_{j<=r} p_j (last iteration: forced)
        if r < 4:
            assert torch.equal(stop, cum[r] >= th), r
        first = torch.where(stop & (first == 5), r + 1, first)
    assert len(first.unique()) > 1
    with pytest.raises(ValueError, match="exit_gate"):
        GateExit().check(_view(0, state, state))


def test_max_loops_exit_definition():
    crit = MaxLoopsExit(after=3)
    state = torch.ones(2, 3, 4)
    got = [bool(crit.check(_view(r, state, state)).all()) for r in range(5)]
    assert got == [False, False, True, True, True]


def test_build_exit_from_config():
    def exit_cfg(*overrides):
        return load_config(["model.exit_gate=true", *overrides]).exit

    assert build_exit(exit_cfg()) is None
    crit = build_exit(exit_cfg("exit.criterion=kl", "exit.threshold=0.25"))
    assert isinstance(crit, KLExit) and crit.threshold == 0.25
    assert build_exit(exit_cfg("exit.criterion=entropy")).threshold == EntropyExit().threshold
    assert build_exit(exit_cfg("exit.criterion=max_loops", "exit.after=3")).after == 3
    cfg = OmegaConf.create({"criterion": "nope"})
    with pytest.raises(ConfigError, match="nope"):
        build_exit(cfg)


# ---------------------------------------------------------------------------------------------
# 3. Cached decoding == full forward under every criterion


@pytest.fixture
def skip_calls(monkeypatch):
    """Counts the all-tokens-exited early breaks (`skip_core_iterations`)."""
    calls = []
    original = DepthPass.skip_core_iterations

    def spy(self, last, loops):
        calls.append((last, loops, type(self.ctx.store).__name__))
        return original(self, last, loops)

    monkeypatch.setattr(DepthPass, "skip_core_iterations", spy)
    return calls


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", CRITERIA)
@pytest.mark.parametrize("batch,chunks", [(2, (3, 4)), (1, (3,))], ids=["b2", "b1"])
def test_cached_decode_matches_full_forward_under_exit(variant, name, batch, chunks,
                                                       skip_calls):
    model = exit_model(variant, seed=64)
    ids = rand_ids(batch, 10, seed=64)
    th = pick_threshold(model, ids, name)
    crit = MarginRecorder(name, make_exit(name, th), R)
    with torch.no_grad():
        plain = model(ids)
        full = model(ids, exit=crit)
        logits, iters, _ = decode_run(model, ids, chunks, exit=crit)
    it = full.iterations
    assert it.shape == (batch, 10) and it.dtype == torch.long
    assert ((it >= 1) & (it <= R)).all()
    if name == "max_loops":
        assert torch.equal(it, torch.full((batch, 10), 2))
    else:  # tokens really exit at different iterations
        assert len(it.unique()) > 1 and (it < R).any()
    if name != "max_loops":  # every decision that mattered sat far from the threshold
        assert crit.margins and min(crit.margins) > 1e-4
    assert torch.equal(iters, it)
    assert max_diff(logits, full.logits) <= 1e-5
    # guard: exiting changed the outputs (frozen tokens matter)
    assert max_diff(full.logits, plain.logits) > 1e-4
    decode_iters = it[:, chunks[0]:]
    if batch == 1:
        # single-token decode steps whose token exited early took the all-exited break
        n_early = int((decode_iters < R).sum())
        assert n_early > 0
        assert sum(1 for c in skip_calls if c[2] == "KVCache") >= n_early


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", CRITERIA)
def test_full_forward_under_exit_matches_reference(variant, name):
    model = exit_model(variant, seed=65)
    ids = rand_ids(2, 8, seed=65)
    th = pick_threshold(model, ids, name)
    crit = MarginRecorder(name, make_exit(name, th), R)
    with torch.no_grad():
        out = model(ids, exit=crit, return_states=True)
    if name != "max_loops":
        assert crit.margins and min(crit.margins) > 1e-4
    ref = naive_looped(model, ids, sources=model_sources(model), exit=RefExit(name, th))
    assert torch.equal(out.iterations, ref["iterations"])
    if name != "max_loops":
        assert len(out.iterations.unique()) > 1
    assert max_diff(out.logits, ref["logits"]) <= 1e-5
    for s, rs in zip(out.states, ref["states"]):
        assert max_diff(s, rs) <= 1e-4  # states are O(10)


@pytest.mark.parametrize("name", ["entropy", "gate"])
def test_exit_at_extrapolated_loops_decodes_like_full_forward(name):
    """A loop=2 model run at loops=6 under exit, through a cache made for 6 loops."""
    model = make_model(seed=73, loop=2, exit_gate="true", policy="same_layer", **LOOPED_MODEL)
    ids = rand_ids(1, 10, seed=73)
    th = pick_threshold(model, ids, name, loops=6)
    crit = MarginRecorder(name, make_exit(name, th), 6)
    with torch.no_grad():
        full = model(ids, loops=6, exit=crit)
        logits, iters, cache = decode_run(model, ids, (3,), loops=6, exit=crit)
    assert cache.n_slots == 1 + 2 * 6 + 1
    assert len(full.iterations.unique()) > 1 and (full.iterations < 6).any()
    assert crit.margins and min(crit.margins) > 1e-4
    assert torch.equal(iters, full.iterations)
    assert max_diff(logits, full.logits) <= 1e-5


def test_all_tokens_exit_in_prefill_breaks_early(skip_calls):
    model = exit_model("same_layer", seed=66)
    ids = rand_ids(2, 7, seed=66)
    with torch.no_grad():
        out = model(ids, exit=MaxLoopsExit(after=1), return_states=True)
        one = model(ids, loops=1)
    assert torch.equal(out.iterations, torch.ones(2, 7, dtype=torch.long))
    assert len(out.states) == 1 and skip_calls == [(0, R, "ActivationStore")]
    # the coda reads the last iteration's (copied) positions: as if the model ran one loop
    assert max_diff(out.logits, one.logits) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 4. A criterion that never fires is no exit at all

NEVER = [("kl", -1.0), ("entropy", -1.0), ("latent", -1.0), ("gate", 1.5), ("max_loops", R),
         ("max_loops", R + 3)]


@pytest.mark.parametrize("name,threshold", NEVER, ids=[f"{n}-{t}" for n, t in NEVER])
def test_exit_that_never_fires_is_exactly_no_exit(name, threshold, skip_calls):
    model = exit_model("same_layer", seed=67)
    ids = rand_ids(2, 9, seed=67)
    crit = make_exit(name, threshold)
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, exit=crit)
        logits, iters, _ = decode_run(model, ids, (4,), exit=crit)
        plain_dec, _, _ = decode_run(model, ids, (4,))
    assert torch.equal(out.iterations, torch.full((2, 9), R))
    assert torch.equal(iters, torch.full((2, 9), R))
    assert torch.equal(out.logits, plain.logits)
    assert torch.equal(logits, plain_dec)
    assert skip_calls == []


# ---------------------------------------------------------------------------------------------
# 5. Frozen tokens: later iterations' cache entries repeat those of the exit iteration


@pytest.mark.parametrize("name", ["entropy", "latent"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_frozen_tokens_keep_their_last_cache_entries(name, mode):
    model = exit_model("same_layer", seed=68)
    batch, chunks = (2, (10,)) if mode == "prefill" else (1, (2,))
    ids = rand_ids(batch, 10, seed=68)
    th = pick_threshold(model, ids, name)
    with torch.no_grad():
        _, iters, cache = decode_run(model, ids, chunks, exit=make_exit(name, th))
    n_pre, n_core = model.cfg.n_prelude, model.cfg.n_layers

    def pos(layer, r):
        return n_pre + r * n_core + layer

    assert len(iters.unique()) > 1
    frozen = running = 0
    for b in range(batch):
        for t in range(10):
            it = int(iters[b, t])
            for layer in range(n_core):
                last_k = cache.k[pos(layer, it - 1), b, :, t]
                last_v = cache.v[pos(layer, it - 1), b, :, t]
                for r in range(it, R):
                    assert torch.equal(cache.k[pos(layer, r), b, :, t], last_k), (b, t, r)
                    assert torch.equal(cache.v[pos(layer, r), b, :, t], last_v), (b, t, r)
                    frozen += 1
                if it >= 2:  # guard: while a token runs, its entries change every iteration
                    assert max_diff(last_k, cache.k[pos(layer, it - 2), b, :, t]) > 1e-3
                    assert max_diff(last_v, cache.v[pos(layer, it - 2), b, :, t]) > 1e-3
                    running += 1
    assert frozen > 0 and running > 0


# ---------------------------------------------------------------------------------------------
# 6. The halting distribution and the gate loss


@pytest.mark.parametrize("r_count", [1, 2, 5])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_halting_distribution_is_a_distribution(r_count, scale):
    g = torch.Generator().manual_seed(69 + r_count)
    logits = torch.randn(r_count, 3, 4, generator=g) * scale
    p = halting_distribution(logits)
    assert p.shape == logits.shape
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(3, 4), atol=1e-6, rtol=0)
    lam = torch.sigmoid(logits.double())
    survive = torch.ones(3, 4, dtype=torch.float64)
    for r in range(r_count):
        want = survive if r == r_count - 1 else lam[r] * survive  # the remainder: last one
        assert max_diff(p[r], want) <= 1e-6, r
        survive = survive * (1 - lam[r])


def test_gate_loss_hand_computation():
    logits = torch.tensor([[[0.0, 2.0]], [[1.0, -1.0]], [[-0.5, 0.3]]])  # (R=3, B=1, T=2)
    losses = torch.tensor([[[2.0, 1.0]], [[1.5, 0.5]], [[0.25, 3.0]]])
    beta = 0.1
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    per_token = []
    for t in range(2):
        l0, l1 = sig(float(logits[0, 0, t])), sig(float(logits[1, 0, t]))
        p = [l0, (1 - l0) * l1, (1 - l0) * (1 - l1)]
        assert abs(sum(p) - 1) < 1e-12
        expected = sum(pi * float(losses[r, 0, t]) for r, pi in enumerate(p))
        entropy = -sum(pi * math.log(pi) for pi in p)
        per_token.append(expected - beta * entropy)
    got = gate_loss(logits, losses, beta)
    assert abs(got.item() - sum(per_token) / 2) <= 1e-6
    mask = torch.tensor([[False, True]])
    assert abs(gate_loss(logits, losses, beta, mask).item() - per_token[1]) <= 1e-6
    # guard: beta enters with the right sign (a larger bonus lowers the loss)
    assert gate_loss(logits, losses, 1.0) < got


def test_gate_logits_returned_per_iteration():
    model = exit_model("same_layer", seed=70)
    ids = rand_ids(2, 6, seed=70)
    with torch.no_grad():
        out = model(ids, return_states=True)
        assert model(ids).gate_logits is None
        assert make_model(seed=70, loop=R, **LOOPED_MODEL)(ids, return_states=True) \
            .gate_logits is None
    assert out.gate_logits.shape == (R, 2, 6)
    ref = naive_looped(model, ids, sources=model_sources(model))
    assert max_diff(out.gate_logits, ref["gate_logits"]) <= 1e-5
    assert out.gate_logits.std() > 0.1


# ---------------------------------------------------------------------------------------------
# 11. Generation with exit


@pytest.mark.parametrize("name", ["entropy", "kl", "max_loops"])
def test_generate_with_exit_at_batch_one(name):
    model = exit_model("same_layer", seed=71)
    th = pick_threshold(model, rand_ids(2, 12, seed=71), name)
    prompt = rand_ids(1, 4, seed=72)
    n = 8
    out = {}
    for use_cache in (True, False):
        out[use_cache] = model.generate(prompt, n, temperature=0, use_cache=use_cache,
                                        exit=make_exit(name, th), return_iterations=True)
    (tokens, iters), (tokens_nc, iters_nc) = out[True], out[False]
    assert tokens.shape == (1, 4 + n) and torch.equal(tokens[:, :4], prompt)
    assert iters.shape == (1, n) and iters.dtype == torch.long
    assert ((iters >= 1) & (iters <= R)).all()
    assert torch.equal(tokens, tokens_nc)
    assert torch.equal(iters, iters_nc)
    if name == "max_loops":
        assert torch.equal(iters, torch.full((1, n), 2))
    else:
        assert (iters < R).any()
    # greedy follows the full forward under the same exit, and so do the reported iterations
    with torch.no_grad():
        full = model(tokens[:, :-1], exit=make_exit(name, th))
    assert torch.equal(full.logits[:, 3:].argmax(-1), tokens[:, 4:])
    assert torch.equal(full.iterations[:, 3:], iters)


@pytest.mark.parametrize("name", ["entropy", "kl", "latent", "gate"])
def test_cached_decode_under_exit_with_learned_positions(name):
    model = make_model(seed=81, loop=R, exit_gate="true", pos_embedding="true",
                       **VARIANTS["same_layer"], **LOOPED_MODEL)
    ids = rand_ids(2, 10, seed=81)
    th = pick_threshold(model, ids, name)
    crit = MarginRecorder(name, make_exit(name, th), R)
    with torch.no_grad():
        full = model(ids, exit=crit)
        logits, iters, _ = decode_run(model, ids, (3, 4), exit=crit)
    assert len(full.iterations.unique()) > 1  # tokens exit at different iterations
    assert crit.margins and min(crit.margins) > 1e-4
    assert torch.equal(iters, full.iterations)
    assert max_diff(logits, full.logits) <= 1e-5
    prompt = ids[:1, :4]
    tokens, its = model.generate(prompt, 6, temperature=0, exit=make_exit(name, th),
                                 return_iterations=True)
    with torch.no_grad():
        ref = model(tokens[:, :-1], exit=make_exit(name, th))
    assert torch.equal(ref.logits[:, 3:].argmax(-1), tokens[:, 4:])
    assert torch.equal(ref.iterations[:, 3:], its)
