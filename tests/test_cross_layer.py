"""Cross-layer baselines (looped.model.cross_layer), in plain and looped models:

- at their identity initialisation (denseformer, mhc, hyper_connections; value_residual at
  lambda = (1, 0)) they equal vanilla with the same weights;
- away from it they equal references written here from the papers' formulas;
- cached decode equals the full forward; a gradient reaches every parameter;
- the extra parameter counts equal the documented formulas;
- the loop limits of per-position parameters, and the errors around them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (CLI_TINY_MODEL, LOOPED_MODEL, VOCAB, cli_in_process, decode_logits,
                      make_model, max_diff, rand_ids)

from looped import ConfigError, LoopedLM, load_config
from looped.components import component_config
from looped.errors import ShapeError
from looped.model.attention import DepthContext, DepthPosition
from looped.model.cache import ActivationStore
from looped.model.cross_layer import CROSS_LAYER_METHODS, sinkhorn
from looped.model.exit import build_exit

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
CL = "model.cross_layer"

# name -> (method, extra dotlist)
METHODS = {
    "denseformer": ("denseformer", ()),
    "denseformer_d2p2": ("denseformer", (f"{CL}.dilation=2", f"{CL}.period=2")),
    "value_residual": ("value_residual", ()),
    "value_residual_learned": ("value_residual", (f"{CL}.learnable=true",)),
    "attn_res": ("attn_res", ()),
    "attn_res_block": ("attn_res", (f"{CL}.block_size=3",)),
    "mhc": ("mhc", ()),
    "hyper_connections": ("hyper_connections", ()),
}
SHAPES = {"plain": dict(loop=1), "looped": dict(loop=3, **LOOPED_MODEL)}


def method_model(name: str, shape: str = "plain", seed: int = 0, perturb: bool = True,
                 extra: tuple[str, ...] = (), **kw):
    """A tiny model with random O(1) block weights; the method's own parameters at their init,
    or perturbed away from it (perturb=True)."""
    method, preset = METHODS[name]
    kw = {**SHAPES[shape], **kw}
    model = make_model(seed, extra=(f"{CL}.method={method}",) + preset + extra, **kw)
    model.cross_layer.reset_parameters()
    if perturb:
        perturb_(model.cross_layer, seed)
    return model


def vanilla_like(model) -> torch.nn.Module:
    """A model without the method holding the same block weights."""
    plain = component_config("model.cross_layer", "none")
    vanilla = LoopedLM(dataclasses.replace(model.cfg, cross_layer=plain),
                       loop=model.loop).eval()
    missing, unexpected = vanilla.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("cross_layer.") for k in unexpected)
    return vanilla


def perturb_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in module.parameters():
            fan = p.shape[1] if p.dim() == 3 else p.shape[-1]
            p.add_(0.5 * torch.randn(p.shape, generator=g) / math.sqrt(fan))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Identity initialisation == vanilla


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("da", [True, False], ids=["da", "noda"])
@pytest.mark.parametrize("injection", ["add", "none"])
@pytest.mark.parametrize("name", ["denseformer", "denseformer_d2p2", "mhc", "hyper_connections"])
def test_identity_init_equals_vanilla(name, shape, da, injection):
    init = "zeros" if injection == "add" else "embed"
    model = method_model(name, shape, seed=1, perturb=False, enabled=da, injection=injection,
                         init_state=init)
    ids = rand_ids(2, 10, seed=1)
    with torch.no_grad():
        assert max_diff(model(ids).logits, vanilla_like(model)(ids).logits) <= TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_value_residual_at_lambda_one_zero_equals_vanilla(shape):
    model = method_model("value_residual_learned", shape, seed=2, perturb=False)
    with torch.no_grad():
        model.cross_layer.lambdas[:, 0] = 1.0
        model.cross_layer.lambdas[:, 1] = 0.0
        ids = rand_ids(2, 10, seed=2)
        assert max_diff(model(ids).logits, vanilla_like(model)(ids).logits) <= TOL


# ---------------------------------------------------------------------------------------------
# References from the formulas (plain decoder, Depth-Attention off: the blocks are then plain
# functions of their input; the methods' mixing is what is checked)


def _layers(model, ids):
    """x0 and per depth position a function running its block (plain, no Depth-Attention)."""
    x0 = model.embed(ids)
    if model.pos_embed is not None:
        x0 = x0 + model.pos_embed(torch.arange(ids.shape[1]))
    ctx = DepthContext(ActivationStore(), model.rope)
    calls = []
    for p, block in enumerate(model.core):
        def call(x, block=block, p=p, branch=False):
            return (block.branch if branch else block)(x, ctx, DepthPosition(p))
        calls.append(call)
    return x0, calls


def test_denseformer_matches_its_formula():
    model = method_model("denseformer_d2p2", seed=3, enabled=False)
    ids = rand_ids(2, 10, seed=3)
    x0, calls = _layers(model, ids)
    cl = model.cross_layer
    xs, y = [x0], x0
    with torch.no_grad():
        for i, call in enumerate(calls):
            n = i + 1
            xs.append(call(y))
            if n % 2:  # period 2: no average after odd blocks
                y = xs[n]
            else:  # dilation 2: j = n, n-2, ..., in increasing order as stored
                js = [j for j in range(n + 1) if (n - j) % 2 == 0]
                alpha = cl.alpha[cl.alpha_index[i]]
                y = sum(alpha[k] * xs[j] for k, j in enumerate(js))
        assert max_diff(model(ids).logits, model.head(y)) <= TOL


@pytest.mark.parametrize("name", ["attn_res", "attn_res_block"])
def test_attn_res_matches_its_formula(name):
    model = method_model(name, seed=4, enabled=False)
    block = model.cfg.cross_layer.block_size
    ids = rand_ids(2, 10, seed=4)
    x0, calls = _layers(model, ids)
    w = model.cross_layer.queries

    def attend(vs, q):
        keys = torch.stack([v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for v in vs])
        a = torch.softmax(torch.einsum("nbtd,d->nbt", keys, q), dim=0)
        return torch.einsum("nbt,nbtd->btd", a, torch.stack(vs))

    with torch.no_grad():
        outs = [x0]  # v_0, then each layer's branch output
        for l, call in enumerate(calls):
            if not block:
                sources = outs
            else:  # finished blocks' sums, then the open block's partial sum
                done = len(outs[1:]) // block * block
                sources = [x0] + [sum(outs[1 + i:1 + i + block]) for i in range(0, done, block)]
                if done < len(outs) - 1:
                    sources.append(sum(outs[1 + done:]))
            h = attend(sources, w[l - 1]) if l > 0 else x0  # position 0 reads only v_0
            outs.append(call(h, branch=True))
        if not block:
            final = outs
        else:
            final = [x0] + [sum(outs[1 + i:1 + i + block]) for i in range(0, len(outs) - 1, block)]
        assert max_diff(model(ids).logits, model.head(attend(final, w[-1]))) <= TOL


@pytest.mark.parametrize("name", ["mhc", "hyper_connections"])
def test_hyper_connections_match_their_formula(name):
    model = method_model(name, seed=5, enabled=False)
    cl = model.cross_layer
    n = cl.n
    ids = rand_ids(2, 10, seed=5)
    x0, calls = _layers(model, ids)
    with torch.no_grad():
        streams = [x0.clone() for _ in range(n)]
        for l, call in enumerate(calls):
            flat = torch.cat(streams, dim=-1)
            flat = flat / flat.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            dyn = flat @ cl.phi[l]
            b, (a_pre, a_post, a_res) = cl.bias[l], cl.scale[l]
            if name == "mhc":
                pre = torch.sigmoid(b[:n] + a_pre * dyn[..., :n])
                post = 2 * torch.sigmoid(b[n:2 * n] + a_post * dyn[..., n:2 * n])
                m = torch.exp(b[2 * n:] + a_res * dyn[..., 2 * n:]).unflatten(-1, (n, n))
                for _ in range(cl.cfg.sinkhorn_iters):
                    m = m / m.sum(-1, keepdim=True)
                    m = m / m.sum(-2, keepdim=True)
                res = m
            else:
                pre = b[:n] + a_pre * torch.tanh(dyn[..., :n])
                post = b[n:2 * n] + a_post * torch.tanh(dyn[..., n:2 * n])
                res = (b[2 * n:] + a_res * torch.tanh(dyn[..., 2 * n:])).unflatten(-1, (n, n))
            h = sum(pre[..., m:m + 1] * streams[m] for m in range(n))
            out = call(h, branch=True)
            streams = [sum(res[..., i, j:j + 1] * streams[j] for j in range(n))
                       + post[..., i:i + 1] * out for i in range(n)]
        final = sum(streams) / n
        assert max_diff(model(ids).logits, model.head(final)) <= TOL


@pytest.mark.parametrize("learnable", [False, True])
def test_value_residual_matches_a_hooked_vanilla_model(learnable):
    """Vanilla with forward hooks on v_proj that apply V'_n = l1 V_n + l2 V_1 equals the model."""
    model = method_model("value_residual_learned" if learnable else "value_residual", seed=6)
    vanilla = vanilla_like(model)
    first = {}
    lambdas = model.cross_layer.lambdas

    def hook(n):
        def fn(module, inputs, out):
            if n == 0:
                first["v"] = out
                return out
            l1, l2 = (lambdas[n - 1] if learnable else (0.5, 0.5))
            return l1 * out + l2 * first["v"]
        return fn

    for n, block in enumerate(vanilla.core):
        block.attn.v_proj.register_forward_hook(hook(n))
    ids = rand_ids(2, 10, seed=6)
    with torch.no_grad():
        assert max_diff(model(ids).logits, vanilla(ids).logits) <= TOL
        assert max_diff(model(ids).logits, vanilla_like(model)(ids).logits) > 1e-3


def test_sinkhorn_is_doubly_stochastic():
    """Columns sum to 1 after the last (column) step; rows converge with the iterations (mHC's
    20 leave about 1e-2 at logits of scale 2)."""
    logits = 2.0 * torch.randn(6, 4, 4)
    for iters, row_tol in ((20, 1e-2), (500, 1e-5)):
        m = sinkhorn(logits, iters=iters)
        assert (m >= 0).all()
        assert max_diff(m.sum(-2), torch.ones(6, 4)) <= 1e-6
        assert max_diff(m.sum(-1), torch.ones(6, 4)) <= row_tol


# ---------------------------------------------------------------------------------------------
# Cached decode, gradients, parameter counts


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", METHODS)
def test_cached_decode_equals_full_forward(name, shape):
    model = method_model(name, shape, seed=7)
    ids = rand_ids(2, 12, seed=7)
    with torch.no_grad():
        full = model(ids).logits
        assert max_diff(decode_logits(model, ids, chunks=(5,)), full) <= TOL
        if shape == "looped":  # fewer iterations than the slots: the coda keeps its own
            assert max_diff(decode_logits(model, ids, chunks=(4,), loops=2),
                            model(ids, loops=2).logits) <= TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", METHODS)
def test_gradient_reaches_every_parameter(name, shape):
    """Checked per depth position's slice. Away from init: at init hyper-connections' scales
    get no gradient until phi moves (phi starts at 0), as in the papers."""
    model = method_model(name, shape, seed=8)
    ids, targets = rand_ids(2, 8, seed=8), rand_ids(2, 8, seed=9)
    F.cross_entropy(model(ids).logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        rows = p.grad.reshape(p.shape[0], -1) if pname.startswith("cross_layer.") and \
            p.dim() > 1 else p.grad.reshape(1, -1)
        assert (rows.abs().amax(dim=1) > 0).all(), pname  # every slot's slice is used


def expected_extra_params(name: str, s: int, d: int, n_streams: int = 4) -> int:
    """The documented counts, for S depth positions of width d."""
    if name == "denseformer":
        return s * (s + 3) // 2
    if name == "denseformer_d2p2":
        return sum(n // 2 + 1 for n in range(2, s + 1, 2))
    if name == "value_residual":
        return 0
    if name == "value_residual_learned":
        return 2 * (s - 1)
    if name.startswith("attn_res"):
        return d * s
    maps = 2 * n_streams + n_streams ** 2
    return s * (n_streams * d * maps + maps + 3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", METHODS)
def test_extra_parameter_count(name, shape):
    model = method_model(name, shape, perturb=False)
    s = model.layout().n_positions
    assert s == (4 if shape == "plain" else 8)
    got = n_params(model) - n_params(vanilla_like(model))
    assert got == expected_extra_params(name, s, model.cfg.d_model)


# ---------------------------------------------------------------------------------------------
# Loop limits and errors


def test_position_slots_keep_the_coda_slots():
    model = method_model("attn_res", "looped")  # prelude 1, core 2 x 3, coda 1
    assert model.position_slots(3) == list(range(8))
    assert model.position_slots(2) == [0, 1, 2, 3, 4, 7]


def test_fewer_loops_use_the_slots_of_the_iterations_they_run():
    """At loops=2 of 3 the positions use slots 0-4 and the coda's slot 7: changing the unused
    slots 5-6 leaves the output alone, changing slot 7 or 4 does not."""
    model = method_model("denseformer", "looped", seed=10)
    cl = model.cross_layer
    ids = rand_ids(2, 8, seed=10)
    with torch.no_grad():
        base = model(ids, loops=2).logits
        for slot, used in ((5, False), (6, False), (7, True), (4, True)):
            alpha = cl.alpha[cl.alpha_index[slot]]
            alpha.add_(0.5)
            changed = max_diff(model(ids, loops=2).logits, base) > 1e-4
            alpha.sub_(0.5)
            assert changed == used, slot


def test_per_position_methods_run_up_to_param_loops():
    model = method_model("denseformer", "looped")
    ids = rand_ids(1, 6)
    with pytest.raises(ShapeError, match="up to 3 iterations"):
        model(ids, loops=4)
    assert not model.supports_loops(4) and model.supports_loops(2)
    wider = method_model("denseformer", "looped", extra=(f"{CL}.param_loops=5",))
    assert wider.param_loops == 5 and wider(ids, loops=5).logits.shape == (1, 6, VOCAB)
    # without per-position parameters any loop count runs
    fixed = method_model("value_residual", "looped")
    assert fixed(ids, loops=7).logits.shape == (1, 6, VOCAB)


def test_exit_with_a_cross_layer_method_is_refused():
    model = method_model("mhc", "looped")
    with pytest.raises(ConfigError, match="adaptive exit"):
        model(rand_ids(1, 6), exit=build_exit(load_config(["exit.criterion=kl"]).exit))
    with pytest.raises(ConfigError, match="adaptive exit"):
        load_config(["recipe=roots_staircase", f"{CL}.method=mhc", "exit.criterion=kl"])


@pytest.mark.parametrize("overrides,fragment", [
    ([f"{CL}.method=densformer"], "choose one of: none, denseformer"),
    ([f"{CL}.method=mhc", f"{CL}.streams=1"], "streams must be in [2, 64]"),
    ([f"{CL}.method=attn_res", "train.loop_sampling.sampler=poisson_lognormal"],
     "set model.cross_layer.param_loops=16"),
    ([f"{CL}.param_loops=3"], "param_loops must be 0 (= loop) or >= loop=8"),
    ([f"{CL}.param_loops=9", "model.share_weights=false", "train.loop_sampling.sampler=fixed"],
     "param_loops must be 0 or 8"),
])
def test_bad_cross_layer_configs(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=roots_staircase", *overrides])
    assert fragment in str(e.value)


def test_registry_lists_every_method():
    assert set(CROSS_LAYER_METHODS) == {"none", "denseformer", "value_residual", "attn_res",
                                        "mhc", "hyper_connections"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(CROSS_LAYER_METHODS) - {"none"}))
def test_trains_through_the_cli_with_one_key(method, tmp_path):
    """train.py's and `looped eval`'s mains, in this process (the subprocess start is what the
    CLI tests elsewhere pin)."""
    from looped.tools.cli import main as looped_main
    from looped.tools.train import main as train_main

    proc = cli_in_process(train_main, [*CLI_TINY_MODEL, f"{CL}.method={method}", "train.steps=2",
                                       "train.batch_size=8", "eval.n_samples=8",
                                       "eval.loops=[1,2,4]", f"out_dir={tmp_path}", "name=run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "ckpt" / "latest").exists()
    if method == "denseformer":  # sweeps skip the R its per-position parameters cannot run
        sweep = cli_in_process(looped_main, ["eval", f"ckpt={tmp_path / 'run'}", "loops=[1,2,4]",
                                             "n_samples=8", f"out={tmp_path / 'sweep'}",
                                             "threads=1"])
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        assert "skipping loops [4]" in sweep.stdout
        rows = (tmp_path / "sweep" / "loop_sweep.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[2]) for r in rows] == [1, 2]


# ---------------------------------------------------------------------------------------------
# References in looped models (prelude, core x R with the input injection, coda), away from the
# identity init: the slots, the injection and the order of depth positions are what is checked


def _depth_blocks(model, ids):
    """x0 and, in depth order (prelude, core per iteration, coda), a function running each
    position's block (Depth-Attention off)."""
    x0 = model.embed(ids)
    ctx = DepthContext(ActivationStore(), model.rope)
    blocks = list(model.prelude) + [model.core_block(r, j) for r in range(model.loop)
                                    for j in range(model.cfg.n_layers)] + list(model.coda)

    def runner(p, block):
        def call(x, branch=False):
            return (block.branch if branch else block)(x, ctx, DepthPosition(p))
        return call
    return x0, [runner(p, b) for p, b in enumerate(blocks)]


def test_attn_res_in_a_looped_model_matches_its_formula():
    """h_p = softmax-attention over v_0, the earlier branch outputs and, before iterations
    r >= 1, the injected increment (state + e) - read; queries indexed by depth position."""
    model = method_model("attn_res", "looped", seed=8, enabled=False, injection="add",
                         init_state="zeros")
    w, c = model.cross_layer.queries, model.cfg
    ids = rand_ids(2, 9, seed=8)
    x0, calls = _depth_blocks(model, ids)

    def attend(vs, q):
        if len(vs) == 1:
            return vs[0]
        keys = torch.stack([v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for v in vs])
        a = torch.softmax(torch.einsum("nbtd,d->nbt", keys, q), dim=0)
        return torch.einsum("nbt,nbtd->btd", a, torch.stack(vs))

    with torch.no_grad():
        values, p = [x0], 0

        def layer():
            nonlocal p
            h = attend(values, w[p - 1]) if p > 0 else attend(values, None)
            values.append(calls[p](h, branch=True))
            p += 1

        for _ in range(c.n_prelude):
            layer()
        e = attend(values, w[-1])
        state = torch.zeros_like(e)
        for r in range(model.loop):
            if r > 0:  # iteration 0 reads e itself: nothing new to add
                values.append((state + e) - attend(values, w[-1]))
            for _ in range(c.n_layers):
                layer()
            state = attend(values, w[-1])
        for _ in range(c.n_coda):
            layer()
        want = model.head(attend(values, w[-1]))
        assert max_diff(model(ids).logits, want) <= TOL
        assert max_diff(want, vanilla_like(model)(ids).logits) > 1e-3


@pytest.mark.parametrize("da", [False, True], ids=["noda", "da"])
def test_value_residual_in_a_looped_model_matches_a_hooked_vanilla_model(da):
    """Every layer application (depth position p >= 1, counted in forward order through the
    prelude, each iteration of the shared core and the coda) mixes in position 0's value with
    its own lambdas: V'_p = l1[p] V_p + l2[p] V_0."""
    model = method_model("value_residual_learned", "looped", seed=9, enabled=da)
    vanilla = vanilla_like(model)
    lambdas = model.cross_layer.lambdas
    seen = {"p": 0}

    def hook(module, inputs, out):
        p = seen["p"]
        seen["p"] += 1
        if p == 0:
            seen["v0"] = out
            return out
        return lambdas[p - 1, 0] * out + lambdas[p - 1, 1] * seen["v0"]

    for block in {id(b): b for b in vanilla.modules() if hasattr(b, "v_proj")}.values():
        block.v_proj.register_forward_hook(hook)
    ids = rand_ids(2, 9, seed=9)
    with torch.no_grad():
        want = vanilla(ids).logits
        assert seen["p"] == model.layout().n_positions  # one value per depth position
        assert max_diff(model(ids).logits, want) <= TOL
        assert max_diff(want, vanilla_like(model)(ids).logits) > 1e-3
