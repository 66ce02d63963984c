"""Shared tiny configs and helpers for the model tests.

Every model built here is fp32 on CPU, tiny (d_model 32, head_dim 8, vocab 50, 2-4 layers) and
re-initialised with O(1) random weights (`randomize_`): the package's own init (std 0.02, scaled
down residual outputs) leaves every layer close to the identity, which would make Depth-Attention
effects smaller than the tolerances the tests check with.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from looped import build_model, load_config

# The suite runs in two xdist workers on a 2-core machine. torch's default of one thread per
# core would put two OpenMP teams on the same cores, whose spin-waits slow the tiny ops of these
# tests 10-100x (a decode test: 10 s in the cold suite, 0.2 s alone). One thread per worker and
# per process the tests start (they inherit OMP_NUM_THREADS; threads=N still gets N).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# trained BPE tokenizers are cached on disk (looped.data.tokenizers); tests keep theirs apart
# from the user's cache (subprocesses inherit it)
os.environ.setdefault("LOOPED_CACHE", tempfile.mkdtemp(prefix="looped-test-cache-"))

VOCAB = 50

# The base tiny decoder: 4 layers, GQA with 2 query heads per KV head. Every key the tests rely
# on is pinned here, so changes to configs/defaults.yaml do not silently change what is tested.
BASE_MODEL = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_prelude=0, n_coda=0, n_heads=4,
                  n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=32, rope_theta=10000.0,
                  norm_eps=1e-6, tie_embeddings="true", kernel="sdpa", share_weights="true",
                  injection="add", init_state="zeros", exit_gate="false", pos_embedding="false",
                  attn_window=0, state_norm="false")

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
    # the recipe these configs were written on (the prefix-sums main job's progressive loss and
    # state norm refuse unrolled and cross-layer models); a fixed loop count keeps every model
    # buildable (unrolled ones accept no sampler)
    out = ["recipe=roots_staircase", f"loop={loop}", "train.loop_sampling.sampler=fixed"]
    out += [f"model.{k}={v}" for k, v in m.items()]
    da = "model.depth_attention"
    out.append(f"{da}.enabled={'true' if enabled else 'false'}")
    if policy is not None:
        out.append(f"{da}.sources={policy}")
    if stride is not None:
        out.append(f"{da}.stride={stride}")
    if window:  # a knob of the strided policy only
        out.append(f"{da}.window={window}")
    out.append(f"{da}.mix={mix}")
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


# ---------------------------------------------------------------------------------------------
# Looped models: an independent float64 reference (prelude / core x R / coda, injection, untied
# cores, adaptive exit with frozen tokens, truncated backprop), source lists written from the
# policy descriptions, decoding with exit, and unrolled copies of a shared core.


def policy_sources(policy: str, n_prelude: int, n_core: int, loops: int, n_coda: int,
                   window: int = 1, stride: int | None = None):
    """Per depth position, the earlier positions Depth-Attention reads, from the descriptions.
    Prelude position i reads the earlier prelude; coda position c reads the prelude, the last
    iteration's core and the earlier coda (every looped policy). Core (l, r) reads layer l at:
    same_layer: every r' < r, plus the prelude;   anchor: r' = 0 < r, plus the prelude;
    window: r - window <= r' < r;                 anchor_window: anchor's and window's;
    loop_strided: r' < r with r' % s == 0 (s = stride, or loops // 2 but at least 1), plus the
    prelude."""
    n = n_prelude + n_core * loops + n_coda
    if policy == "none":
        return [()] * n
    if policy == "dense":
        return [tuple(range(p)) for p in range(n)]
    s = stride or max(1, loops // 2)
    wanted = {  # policy -> (reads the prelude, is r' read at r)
        "same_layer": (True, lambda rr, r: rr < r),
        "anchor": (True, lambda rr, r: rr == 0 < r),
        "window": (False, lambda rr, r: r - window <= rr < r),
        "anchor_window": (True, lambda rr, r: rr == 0 < r or r - window <= rr < r),
        "loop_strided": (True, lambda rr, r: rr < r and rr % s == 0),
    }
    reads_prelude, reads = wanted[policy]
    pre = tuple(range(n_prelude))
    out = [tuple(range(p)) for p in range(n_prelude)]
    for r in range(loops):
        for layer in range(n_core):
            same = tuple(n_prelude + rr * n_core + layer for rr in range(loops) if reads(rr, r))
            out.append((pre if reads_prelude else ()) + same)
    last = n_prelude + (loops - 1) * n_core
    for c in range(n_coda):
        out.append(pre + tuple(range(last, last + n_core + c)))
    assert len(out) == n
    return out


def _ref_rms(x, w, eps):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _ref_rope(x, pos: int, theta: float):
    """Rotate-half RoPE of x (..., D) sitting at sequence position pos."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-(torch.arange(half, dtype=torch.float64) * 2.0 / d))
    ang = pos * inv_freq
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _ref_softmax(s, dim):
    e = torch.exp(s - s.max(dim, keepdim=True).values)
    return e / e.sum(dim, keepdim=True)


def _ref_block(blk, x, p, srcs, mix, store, cfg, W, alphas, frozen=None, frozen_from=None,
               past=None):
    """One layer application at depth position p, token by token. past: the (unrotated key,
    mixed value) (B, t0, Hkv, D) of t0 earlier tokens that sequence attention also reads; the
    chunk's tokens then sit at positions t0, t0 + 1, ..."""
    import math

    b_sz, t_sz, _ = x.shape
    h_n, kv_n, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    grp, eps = h_n // kv_n, cfg.norm_eps
    a = blk.attn
    h = _ref_rms(x, W(blk.attn_norm.weight), eps)
    q = _ref_rms((h @ W(a.q_proj.weight).T).view(b_sz, t_sz, h_n, d), W(a.q_norm.weight), eps)
    k = _ref_rms((h @ W(a.k_proj.weight).T).view(b_sz, t_sz, kv_n, d), W(a.k_norm.weight), eps)
    v = (h @ W(a.v_proj.weight).T).view(b_sz, t_sz, kv_n, d)

    # Depth-Attention, one token at a time (unrotated q and k: same angle at one token)
    own = tuple(srcs) + (p,)
    src_vals = store["v_mix"] if mix == "mixed" else store["v_raw"]
    mixed, weights = [], []
    for bi in range(b_sz):
        for ti in range(t_sz):
            q_bar = q[bi, ti].reshape(kv_n, grp, d).mean(1)  # (Hkv, D)
            keys = torch.stack([store["k"][j][bi, ti] for j in srcs] + [k[bi, ti]])
            vals = torch.stack([src_vals[j][bi, ti] for j in srcs] + [v[bi, ti]])
            wts = _ref_softmax((keys * q_bar).sum(-1) / math.sqrt(d), 0)  # (S + 1, Hkv)
            mixed.append((wts.unsqueeze(-1) * vals).sum(0))
            weights.append(wts.T)
    v_mix = torch.stack(mixed).view(b_sz, t_sz, kv_n, d)
    alphas[p] = (torch.stack(weights).view(b_sz, t_sz, kv_n, len(own)), own)
    v_raw = v
    if frozen is not None:  # exited tokens keep the entries of the same layer, last iteration
        m = frozen[:, :, None, None]
        k = torch.where(m, store["k"][frozen_from], k)
        v_mix = torch.where(m, store["v_mix"][frozen_from], v_mix)
        v_raw = torch.where(m, store["v_raw"][frozen_from], v_raw)
    store["k"][p], store["v_mix"][p], store["v_raw"][p] = k, v_mix, v_raw

    # causal sequence attention with RoPE, one query token at a time (all heads together)
    theta = cfg.rope_theta
    k_seq, v_seq = (k, v_mix) if past is None else (torch.cat([past[0], k], 1),
                                                    torch.cat([past[1], v_mix], 1))
    t0 = k_seq.shape[1] - t_sz
    outs = []
    for bi in range(b_sz):
        k_rot = [_ref_rope(k_seq[bi, s], s, theta) for s in range(t0 + t_sz)]  # each (Hkv, D)
        for ti in range(t0, t0 + t_sz):
            qr = _ref_rope(q[bi, ti - t0], ti, theta)  # (H, D)
            ks = torch.stack(k_rot[:ti + 1]).repeat_interleave(grp, dim=1)  # (ti+1, H, D)
            vs = v_seq[bi, :ti + 1].repeat_interleave(grp, dim=1)
            wts = _ref_softmax((ks * qr).sum(-1) / math.sqrt(d), 0)  # (ti+1, H)
            outs.append((wts.unsqueeze(-1) * vs).sum(0))
    out = torch.stack(outs).view(b_sz, t_sz, h_n * d)
    x = x + out @ W(a.o_proj.weight).T
    hm = _ref_rms(x, W(blk.mlp_norm.weight), eps)
    gate, up = hm @ W(blk.mlp.gate.weight).T, hm @ W(blk.mlp.up.weight).T
    return x + (gate * torch.sigmoid(gate) * up) @ W(blk.mlp.down.weight).T


class RefExit:
    """The exit criteria re-implemented from their descriptions, in float64."""

    def __init__(self, name: str, threshold: float):
        self.name, self.threshold = name, threshold

    def reset(self):
        self.prev_lp, self.survive = None, None

    def check(self, r, state, prev, head, gate):
        b_t = state.shape[:2]
        if self.name == "max_loops":
            return torch.full(b_t, r + 1 >= self.threshold, dtype=torch.bool)
        if self.name == "latent":
            return ((state - prev).norm(dim=-1) / state.norm(dim=-1)) < self.threshold
        if self.name == "gate":
            lam = torch.sigmoid(gate(state))
            self.survive = (1 - lam) if self.survive is None else self.survive * (1 - lam)
            return 1 - self.survive >= self.threshold
        lp = torch.log_softmax(head(state), dim=-1)
        if self.name == "entropy":
            return -(lp.exp() * lp).sum(-1) < self.threshold
        assert self.name == "kl", self.name
        prev_lp, self.prev_lp = self.prev_lp, lp
        if prev_lp is None:
            return torch.zeros(b_t, dtype=torch.bool)
        return (lp.exp() * (lp - prev_lp)).sum(-1) < self.threshold


def naive_looped(model, ids, *, sources, loops=None, exit: "RefExit | None" = None,
                 no_grad_loops: int = 0, grad: bool = False, past=None):
    """float64 reference forward of any LoopedLM built with init_state zeros|embed.

    Returns a dict: logits, iterations (B, T), states (per iteration), gate_logits (R, B, T) or
    None, alphas {p: (weights (B, T, Hkv, S + 1), sources + own)}, store (each position's key
    and mixed value). grad=True keeps the graph to the model's parameters; the first
    no_grad_loops iterations run under torch.no_grad. past: {p: (k, v_mix)} of earlier tokens
    that sequence attention at p reads before ids (see naive_cached)."""
    import contextlib

    cfg = model.cfg
    loops = model.loop if loops is None else loops
    W = (lambda t: t.double()) if grad else (lambda t: t.detach().double())
    mix, eps = cfg.depth_attention.mix, cfg.norm_eps
    store = {"k": {}, "v_mix": {}, "v_raw": {}}
    alphas = {}
    b_sz, t_sz = ids.shape
    emb = W(model.embed.weight)
    out_w = emb if model.lm_head is None else W(model.lm_head.weight)

    def head(s):
        return _ref_rms(s, W(model.norm.weight), eps) @ out_w.T

    gate = None
    if model.exit_gate is not None:
        def gate(s):
            return (_ref_rms(s, None, eps) @ W(model.exit_gate.weight).T
                    + W(model.exit_gate.bias)).squeeze(-1)

    past = past or {}
    t0 = next(iter(past.values()))[0].shape[1] if past else 0
    x = emb[ids]
    if model.pos_embed is not None:
        x = x + W(model.pos_embed.weight)[t0:t0 + t_sz]
    p = 0
    for blk in model.prelude:
        x = _ref_block(blk, x, p, sources[p], mix, store, cfg, W, alphas, past=past.get(p))
        p += 1
    e = x
    state = {"zeros": torch.zeros_like(e), "embed": e}[cfg.init_state]
    iterations = torch.full((b_sz, t_sz), loops, dtype=torch.long)
    done = torch.zeros(b_sz, t_sz, dtype=torch.bool)
    states, gates = [], []
    if exit is not None:
        exit.reset()
    for r in range(loops):
        ctx = torch.no_grad() if r < no_grad_loops else contextlib.nullcontext()
        with ctx:
            if cfg.injection == "add":
                x = state + e
            elif cfg.injection == "concat":
                x = torch.cat([state, e], dim=-1) @ W(model.adapter.weight).T
            else:
                x = state
            for layer in range(cfg.n_layers):
                blk = model.core[layer] if cfg.share_weights else model.core[r][layer]
                x = _ref_block(blk, x, p, sources[p], mix, store, cfg, W, alphas,
                               frozen=done if bool(done.any()) else None,
                               frozen_from=p - cfg.n_layers, past=past.get(p))
                p += 1
            x = torch.where(done[..., None], state, x)
        prev, state = state, x
        states.append(state)
        if gate is not None:
            gates.append(gate(state))
        if exit is not None:
            stop = exit.check(r, state, prev, head, gate) & ~done
            iterations[stop] = r + 1
            done = done | stop
    x = state
    for blk in model.coda:
        x = _ref_block(blk, x, p, sources[p], mix, store, cfg, W, alphas, past=past.get(p))
        p += 1
    assert p == len(sources)
    return dict(logits=head(x), iterations=iterations, states=states,
                gate_logits=torch.stack(gates) if gates else None, alphas=alphas, store=store)


def naive_cached(model, ids, chunks: tuple[int, ...], *, kv: str, loops=None,
                 exit: "RefExit | None" = None):
    """float64 reference of decoding through a cache of policy kv, from the policies'
    descriptions: the prompt in the given chunks, then one token at a time. Within a chunk the
    tokens read each other at the same depth position. Earlier tokens are read
    - per_iteration: at the same depth position;
    - last: a core layer reads the same layer at the earlier tokens' final iteration (where an
      exited token's frozen entries end up); prelude and coda layers as per_iteration.
    Returns (logits, iterations)."""
    c = model.cfg
    loops = model.loop if loops is None else loops
    sources = model_sources(model, loops)
    core = range(c.n_prelude, c.n_prelude + c.n_layers * loops)
    last_iteration = c.n_prelude + (loops - 1) * c.n_layers

    def read_from(p):
        if kv == "last" and p in core:
            return last_iteration + (p - c.n_prelude) % c.n_layers
        assert kv in ("per_iteration", "last"), kv
        return p

    t = ids.shape[1]
    steps = list(chunks) + [1] * (t - sum(chunks))
    hist, logits, iters, start = {}, [], [], 0
    for n in steps:
        past = {p: hist[read_from(p)] for p in range(len(sources))} if hist else None
        out = naive_looped(model, ids[:, start:start + n], sources=sources, loops=loops,
                           exit=exit, past=past)
        store = out["store"]
        for p in range(len(sources)):
            new = (store["k"][p], store["v_mix"][p])
            hist[p] = new if p not in hist else tuple(torch.cat([h, x], 1)
                                                      for h, x in zip(hist[p], new))
        logits.append(out["logits"])
        iters.append(out["iterations"])
        start += n
    return torch.cat(logits, 1), torch.cat(iters, 1)


def model_sources(model, loops=None):
    """policy_sources for a model's layout and configured policy (and its knobs)."""
    c = model.cfg
    da = c.depth_attention
    unset = "anchor" if model.loop > 1 else "strided"  # the defaults, written out
    policy = "none" if not da.enabled else (da.sources or unset)
    knobs = {k: getattr(da, k) for k in ("window", "stride") if hasattr(da, k)}
    return policy_sources(policy, c.n_prelude, c.n_layers, model.loop if loops is None else loops,
                          c.n_coda, **knobs)


def decode_run(model, ids: torch.Tensor, chunks: tuple[int, ...], *, loops=None, exit=None,
               cache_len: int | None = None, kv: str = "per_iteration"):
    """Like decode_logits, also under an exit criterion and a cache policy:
    (logits, iterations, cache)."""
    b, t = ids.shape
    cache = model.new_cache(b, cache_len or t, loops, kv)
    logits, iters, pos = [], [], 0
    steps = list(chunks) + [1] * (t - sum(chunks))
    for n in steps:
        out = model(ids[:, pos:pos + n], loops=loops, cache=cache, exit=exit)
        logits.append(out.logits)
        iters.append(out.iterations)
        pos += n
    assert cache.length == t
    return torch.cat(logits, dim=1), torch.cat(iters, dim=1), cache


# An unrolled model (share_weights=false) only validates with the fixed loop sampler, whatever
# configs/defaults.yaml picks for training.
FIXED_LOOPS = ("train.loop_sampling.sampler=fixed",)


def unrolled_copy(model, **kw):
    """An unrolled model (share_weights=false) whose `loop` core copies hold the shared core's
    weights; kw: the tiny config `model` was built with."""
    kw["extra"] = tuple(kw.get("extra", ())) + FIXED_LOOPS
    unrolled = build_model(tiny_cfg(share_weights="false", **kw)).eval()
    sd = {}
    for key, val in model.state_dict().items():
        if key.startswith("core."):
            _, layer, rest = key.split(".", 2)
            for r in range(model.loop):
                sd[f"core.{r}.{layer}.{rest}"] = val.clone()
        else:
            sd[key] = val
    unrolled.load_state_dict(sd)
    return unrolled


@pytest.fixture
def single_thread():
    """One torch thread for the test: these tiny models are dominated by per-op overhead, and
    a second thread only contends with whatever else uses the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def to_float64(model):
    """The model in float64, RoPE tables included (the model keeps them in fp32, whose rounding
    alone would dominate a float64 comparison), so comparisons can be ~1e-9 tight. Looped
    models with concat injection amplify fp32 rounding over the iterations (to ~1e-5 at R=4
    with random O(1) weights), so their equivalence tests run here."""
    model = model.double()
    rope = model.rope
    t, d = rope.cos.shape
    inv_freq = model.cfg.rope_theta ** (-(torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    rope.cos, rope.sin = ang.cos(), ang.sin()
    return model


def tol_for(dtype) -> float:
    """Tolerance of an equivalence check at this precision."""
    return 1e-9 if dtype == torch.float64 else 1e-5


# A tiny model for tests that run the real CLI in a subprocess (train.py dotlist arguments), on
# the recipe they were written on (roots; the prefix-sums main job is pinned in test_config).
CLI_TINY_MODEL = ["recipe=roots_staircase", "model.d_model=32", "model.n_heads=2",
                  "model.n_kv_heads=1",
                  "model.head_dim=16", "model.ffn_dim=64", "loop=2", "threads=1"]


def assert_same_checkpoint(a, b) -> None:
    """Two checkpoint directories hold bit-identical weights, optimizer state, RNG and step."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert sa["step"] == sb["step"] and torch.equal(sa["torch_rng"], sb["torch_rng"])
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][i][key]), (i, key)


def write_offline_tasks(root, rows: list[dict], tasks: dict[str, dict]) -> list[str]:
    """lm-eval tasks over a JSONL file of `rows` written into root (one YAML per task, from its
    spec beside the shared dataset keys), for scoring offline; their names."""
    import json

    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test"}
    for name, spec in tasks.items():  # JSON is YAML
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **spec}))
    return list(tasks)


def continuation_log_likelihood(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) under model's full forward, in float64: what lm-eval's
    models must reproduce."""
    import torch.nn.functional as F

    ids = torch.tensor([context + continuation])
    lp = F.log_softmax(model(ids).logits[0, :-1].double(), -1)[-len(continuation):]
    return float(lp.gather(1, ids[0, -len(continuation):, None]).sum())


# ---------------------------------------------------------------------------------------------
# A command in this process, as its own process would run it: the bad-input tests fail before
# anything trains, and a subprocess per case would pay the interpreter's and torch's start
# (~2 s) each time. Each command keeps one test through a real subprocess.

# Python's default warning filters (no -W, no PYTHONWARNINGS): what a user's terminal shows
DEFAULT_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"),
                           ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""),
                           ("ignore", ImportWarning, ""), ("ignore", ResourceWarning, ""))


def cli_in_process(main, argv):
    """`cli_main(main, argv)` in this process: (exit code, stdout, stderr) as a
    CompletedProcess. A warning the command raises is written to stderr, as a terminal would
    show it; torch's thread count (threads=...) is restored after."""
    import contextlib
    import io
    import subprocess
    import warnings

    from looped.errors import cli_main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.resetwarnings()
        for action, category, module in reversed(DEFAULT_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        try:
            cli_main(main, [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            torch.set_num_threads(threads)
    stderr = err.getvalue() + "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), stderr)
