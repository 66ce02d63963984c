"""Paper-scale presets (built on the meta device) and the accounting of `python -m looped flops`:
parameter counts from a closed formula, forward FLOPs equal to torch's FlopCounterMode on real
tiny models, the methods' extra parameters equal to the built models', and the paper's claim
that Depth-Attention adds under 0.01% FLOPs at 1.5B and 3B."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from conftest import cli_in_process

from looped import build_model, load_config
from looped.tools.flops import account

# preset -> (nominal size, n_layers, d_model, n_heads, n_kv_heads, ffn_dim)
PRESETS = {
    "360m": (360e6, 32, 960, 15, 5, 2560),
    "1.5b": (1.5e9, 48, 1536, 24, 6, 5184),
    "3b": (3.0e9, 48, 2048, 32, 8, 6912),
}
VOCAB, HEAD_DIM = 50304, 64
MLA_TINY = ["model.attention=mla", "model.mla.kv_rank=24", "model.mla.rope_dim=8",
            "model.mla.nope_dim=16", "model.mla.v_dim=12", "train.loop_sampling.sampler=fixed"]


def paper_cfg(preset: str, *extra: str):
    return load_config(["recipe=roots_staircase", f"model={preset}", "loop=1", "train.loop_sampling.sampler=fixed", *extra])


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_on_meta_with_their_parameter_count(preset):
    nominal, layers, d, h, h_kv, ffn = PRESETS[preset]
    with torch.device("meta"):
        model = build_model(paper_cfg(preset))
    per_layer = (d * h * HEAD_DIM * 2 + d * h_kv * HEAD_DIM * 2  # q, o; k, v
                 + 3 * d * ffn  # SwiGLU
                 + 2 * HEAD_DIM + 2 * d)  # QK-norms, the two block norms
    expected = VOCAB * d + layers * per_layer + d  # tied embedding, final norm
    got = sum(p.numel() for p in model.parameters())
    assert got == expected
    assert abs(got / nominal - 1) < 0.15  # 2.65B for "3B" (tied), 363M, 1.51B
    assert model.cfg.depth_attention.stride == layers // 2


@pytest.mark.parametrize("extra", [
    ["loop=1", "model.n_layers=3"],
    ["loop=3", "model.n_layers=2", "model.n_prelude=1", "model.n_coda=1",
     "model.injection=concat", "model.init_state=embed"],
    ["loop=1", "model.n_layers=3", *MLA_TINY],
    ["loop=1", "model.n_layers=2", "model.mla.q_rank=20", *MLA_TINY],
    ["loop=2", "model.n_layers=2", "model.n_prelude=1", *MLA_TINY],
])
def test_forward_flops_equal_the_flop_counter(extra):
    """Eager attention is matmuls the counter sees, so the counts must agree exactly."""
    cfg = load_config(extra + ["train.loop_sampling.sampler=fixed", "model.kernel=eager",
                               "model.depth_attention.enabled=false"])
    model = build_model(cfg).eval()
    t = 48
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, cfg.model.vocab_size, (1, t)))
    assert account(cfg, context=t, bytes_per=2).forward_flops * t == counter.get_total_flops()


@pytest.mark.parametrize("preset", ["1.5b", "3b"])
def test_depth_attention_adds_under_a_hundredth_of_a_percent(preset):
    a = account(paper_cfg(preset), context=2048, bytes_per=2)
    assert 0 < a.depth_attention.flops < 1e-4 * a.forward_flops
    assert a.depth_attention.params == 0 and a.depth_attention.state_bytes == 0


def test_method_rows_match_built_models():
    """Extra parameters in the table equal those of the model built with the method; the
    state rows follow the documented sizes."""
    cfg = paper_cfg("360m")
    a = account(cfg, context=2048, bytes_per=2)
    with torch.device("meta"):
        vanilla = sum(p.numel() for p in build_model(cfg).parameters())
    rows = {m.name: m for m in a.methods}
    d, s = 960, 32
    for name in ("denseformer", "attn_res", "mhc", "hyper_connections"):
        with torch.device("meta"):
            model = build_model(paper_cfg("360m", f"model.cross_layer.method={name}"))
        assert sum(p.numel() for p in model.parameters()) - vanilla == rows[name].params, name
    assert rows["mhc"].state_bytes == 3 * d * 2  # 4 streams: 3 more vectors of d, bf16
    assert rows["denseformer"].state_bytes == s * d * 2  # embedding + every output, less one
    assert rows["attn_res"].state_bytes == s * d * 2
    assert rows["value_residual"].state_bytes == 0  # V_1 is the cache's position-0 value
    assert a.kv_bytes == 2 * s * 5 * HEAD_DIM * 2


def test_cli_prints_the_table():
    from looped.tools.cli import main

    proc = cli_in_process(main, ["flops", "model=3b"])
    assert proc.returncode == 0, proc.stderr
    for row in ("depth_attention", "denseformer", "value_residual", "attn_res", "mhc",
                "hyper_connections", "KV cache"):
        assert row in proc.stdout
    bad = cli_in_process(main, ["flops", "context=many"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "context must be an integer" in bad.stderr


class _ArithmeticCounter(TorchDispatchMode):
    """Counts the arithmetic torch actually executes in elementwise ops and reductions (which
    FlopCounterMode ignores): one per output element of mul/add/sub/div, two of addcmul (a
    product and a sum), numel(in) - numel(out) per sum, SOFTMAX per softmax element. Matmuls
    are left to FlopCounterMode."""

    SOFTMAX = 5
    ELEMENTWISE = {"mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_"}
    FUSED_MULTIPLY_ADD = {"addcmul", "addcmul_"}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.ELEMENTWISE:
            self.total += out.numel()
        elif name in self.FUSED_MULTIPLY_ADD:
            self.total += 2 * out.numel()
        elif name == "sum":
            self.total += args[0].numel() - out.numel()
        elif name == "_softmax":
            self.total += self.SOFTMAX * out.numel()
        return out


def _arithmetic(model, ids) -> int:
    with _ArithmeticCounter() as counter, torch.no_grad():
        model(ids)
    return counter.total


@pytest.mark.parametrize("extra", [
    ["loop=1", "model.n_layers=6", "model.depth_attention.sources=strided"],
    ["loop=1", "model.n_layers=4", "model.depth_attention.sources=dense"],
    ["loop=3", "model.n_layers=2", "model.n_prelude=1", "model.n_coda=1"],  # same_layer
])
def test_depth_attention_flops_equal_the_executed_arithmetic(extra):
    """The accounting's Depth-Attention FLOPs against the arithmetic a real forward executes,
    measured as the difference between the model and its vanilla twin (same weights). The
    accounting counts a dot product of length D as 2D (multiply-add convention); executed, it is
    2D - 1, and a weighted sum of n vectors is (2n - 1) D: per position with n = S + 1 sources
    and per KV head, the accounting is n + D higher."""
    cfg = load_config(extra + ["train.loop_sampling.sampler=fixed"])
    vanilla_cfg = load_config(extra + ["train.loop_sampling.sampler=fixed",
                                       "model.depth_attention.enabled=false"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    twin = build_model(vanilla_cfg).eval()
    twin.load_state_dict(model.state_dict())
    t = 16
    ids = torch.randint(0, cfg.model.vocab_size, (1, t))
    executed = _arithmetic(model, ids) - _arithmetic(twin, ids)
    m = cfg.model
    sources = model.depth_sources(model.loop)
    convention = sum(m.n_kv_heads * (len(s) + 1 + m.head_dim) for s in sources if s)
    assert any(sources) and executed > 0
    assert account(cfg, context=t, bytes_per=2).depth_attention.flops * t == \
        executed + convention * t



@pytest.mark.parametrize("keys", ["absorbed", "own"])
def test_mla_depth_attention_matmuls_equal_the_flop_counter(keys):
    """Depth-Attention's matmuls under MLA are the latent queries W_UK^T q: one per position
    with sources (absorbed), plus one per other source layer (own). The counter sees exactly
    those on top of the vanilla twin."""
    extra = ["loop=1", "model.n_layers=5", "model.depth_attention.sources=strided",
             "model.depth_attention.stride=2", f"model.mla.depth_keys={keys}", *MLA_TINY]
    cfg = load_config(extra)
    twin_cfg = load_config(extra + ["model.depth_attention.enabled=false"])
    model, twin = build_model(cfg).eval(), build_model(twin_cfg).eval()
    twin.load_state_dict(model.state_dict())
    t = 8
    ids = torch.randint(0, cfg.model.vocab_size, (1, t))
    counts = []
    for m in (model, twin):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(ids)
        counts.append(counter.get_total_flops())
    c, sources = cfg.model, model.depth_sources(1)
    per_projection = 2 * c.n_heads * c.mla.nope_dim * c.mla.kv_rank
    projections = sum(1 + (len(s) if keys == "own" else 0) for s in sources if s)
    assert counts[0] - counts[1] == projections * per_projection * t


def test_mla_cache_bytes_and_presets():
    for preset, layers in (("360m", 32), ("1.5b", 48), ("3b", 48)):
        gqa = account(paper_cfg(preset), context=2048, bytes_per=2)
        mla = account(paper_cfg(preset + "_mla"), context=2048, bytes_per=2)
        assert mla.kv_bytes == layers * (256 + 32) * 2  # (d_c + d_rope) bf16 per layer
        assert mla.kv_bytes < gqa.kv_bytes
        assert mla.depth_attention.params == 0 and mla.depth_attention.state_bytes == 0
        decode = next(m for m in mla.methods if "absorbed-attention decode" in m.name)
        own = next(m for m in mla.methods if "depth_keys=own" in m.name)
        assert decode.flops < 1e-3 * mla.forward_flops < mla.depth_attention.flops < own.flops
