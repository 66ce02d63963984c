"""Config resolution: presets, dotlist overrides, typed values, and one-line errors."""

import pytest
from omegaconf import OmegaConf

from looped import ConfigError, load_config


def test_defaults_resolve_and_validate():
    cfg = load_config([])
    assert cfg.loop >= 1 and cfg.model.d_model > 0


def test_dotlist_override_and_preset_order():
    cfg = load_config(["model=small", "model.d_model=64", "loop=3"])
    assert cfg.model.d_model == 64  # dotlist beats preset
    assert cfg.model.n_layers == 2  # from configs/model/small.yaml
    assert cfg.loop == 3


def test_values_are_typed():
    cfg = load_config(["train.lr=0.01", "model.depth_attention.enabled=false"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 0.01
    assert cfg.model.depth_attention.enabled is False


def test_struct_mode_rejects_new_keys_after_loading():
    cfg = load_config([])
    with pytest.raises(Exception):
        cfg.model.not_a_key = 1


@pytest.mark.parametrize("overrides, fragment", [
    (["model.d_modle=64"], "did you mean model.d_model"),
    (["lop=3"], "did you mean loop"),
    (["model.d_model=abc"], "model.d_model=abc"),
    (["loop=0"], "loop must be >= 1"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["model.n_heads=6", "model.n_kv_heads=4"], "divisible"),
    (["model.kernel=flash"], "choose one of: sdpa, eager, xformers"),
    (["model.depth_attention.sources=everything"], "choose one of"),
    (["model.depth_attention.mix=half"], "mixed, raw"),
    (["model=huge"], "unknown model preset 'huge'"),
    (["loop"], "key=value"),
    (["model.injection=none", "model.init_state=zeros"], "only zeros"),
    (["model.head_dim=7"], "even"),
    # each component's knobs are checked against its own dataclass
    (["task=chain", "task.n_chains=3"],
     "unknown config key 'task.n_chains' (task 'chain' has knobs: hops, n_distractors, "
     "statements, min_hops, loops_per_hop)"),
    (["task=chain", "task.eval.n_chains=3"], "task.eval.n_chains"),
    (["exit.criterion=kl", "exit.after=3"], "exit criterion 'kl' has knobs: threshold"),
    (["loop=4", "model.depth_attention.sources=same_layer", "model.depth_attention.window=1"],
     "policy 'same_layer' has knobs: none"),
    # a plain decoder's default policy is strided: its knobs are checked without naming it
    (["loop=1", "model.depth_attention.window=-1"], "window must be >= 0, got -1"),
    (["task.name=nope", "task.hops=3"], "unknown config key 'task.hops'; did you mean"),
    (["model.cross_layer.method=attn_res", "model.cross_layer.streams=2"],
     "cross-layer method 'attn_res' has knobs: block_size"),
    (["train.loop_sampling.sampler=fixed", "train.loop_sampling.min_loops=2"],
     "'fixed' has knobs: none"),
    (["exit.criterion=max_loops", "exit.after=0"], "exit.after must be >= 1"),
    (["task=nothing"], "or a registered task: roots, chain"),
    # renamed keys point at their new names
    (["model.cross_layer.max_loops=8"], "is now 'model.cross_layer.param_loops'"),
    (["train.loops.max_loops=8"], "is now 'train.loop_sampling.cap'"),
    (["train.loops.sampler=uniform"], "is now 'train.loop_sampling.sampler'"),
    (["exit.max_loops=2"], "is now 'exit.after'"),
    (["train.checkpoint_format=zip"], "choose one of: full, sharded"),
    (["train.async_checkpoint=true"], "needs train.checkpoint_format=sharded"),
])
def test_bad_input_is_one_line_config_error(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_a_components_knobs_join_its_node():
    cfg = load_config(["task=phop", "task.eval.hops=8", "exit.criterion=kl",
                       "train.loop_sampling.sampler=poisson_lognormal",
                       "train.loop_sampling.cap=12"])
    assert dict(cfg.task) == {"name": "phop", "hops": 4, "length": 64, "alphabet": 4,
                              "min_hops": 0, "loops_per_hop": 0,
                              "eval": {"hops": 8, "length": None, "alphabet": None,
                                       "min_hops": None, "loops_per_hop": None}}
    assert dict(cfg.exit) == {"criterion": "kl", "drop_rows_from": 16, "threshold": 1e-3}
    cross = load_config(["recipe=roots_staircase", "model.cross_layer.method=denseformer",
                         "model.cross_layer.dilation=2"])
    assert dict(cross.model.cross_layer) == {"method": "denseformer", "param_loops": 0,
                                             "dilation": 2, "period": 1}
    assert dict(cfg.train.loop_sampling) == {"sampler": "poisson_lognormal", "min_loops": 1,
                                             "mean": 0.0, "sigma": 0.5, "cap": 12}
    # the last selection wins, and only its knobs are in the node
    assert dict(load_config(["task=chain", "task=roots"]).task)["name"] == "roots"


OLD_RUN_CONFIG = """
loop: 4
model:
  depth_attention: {enabled: true, sources: strided, stride: 2, window: 1, mix: mixed}
  cross_layer: {method: none, max_loops: 0, dilation: 1, period: 1, learnable: false,
                block_size: 0, streams: 4, sinkhorn_iters: 20}
train:
  loops: {sampler: uniform, min_loops: 2, mean: 0.0, sigma: 0.5, max_loops: 0}
task: {name: chain, n_chains: 4, chain_len: 6, n_queries: 8, hops: 3, n_distractors: 2,
       length: 64, alphabet: 4, digits: 5, corpus: shakespeare, text_field: text, seq_len: 256,
       tokenizer: byte, bpe_vocab: 1024, held_out: 0.05,
       eval: {chain_len: null, hops: 6, digits: null, length: null}}
exit: {criterion: entropy, threshold: null, max_loops: 1}
"""


def test_a_run_saved_with_the_flat_knobs_of_older_versions_loads_unchanged(tmp_path):
    from looped.config import load_config_file

    (tmp_path / "config.yaml").write_text(OLD_RUN_CONFIG)
    old = load_config_file(tmp_path / "config.yaml")
    new = load_config(["recipe=roots_staircase", "loop=4", "model.depth_attention.sources=strided",
                       "model.depth_attention.stride=2", "model.depth_attention.window=1",
                       "train.loop_sampling.min_loops=2", "task=chain", "task.hops=3",
                       "task.eval.hops=6", "exit.criterion=entropy"])
    for node in ("model.depth_attention", "model.cross_layer", "train.loop_sampling", "task",
                 "exit"):
        assert OmegaConf.select(old, node) == OmegaConf.select(new, node), node


def test_the_main_job_is_pinned():
    """`python train.py loop=8`: prefix sums from the final answer only (the progressive loss),
    8-bit strings at R = 8, a difficulty x R grid reaching 2x and 4x the trained length."""
    cfg = load_config(["loop=8"])
    assert cfg.loop == 8
    assert (cfg.task.name, cfg.task.length, cfg.task.eval.length) == ("prefix_sums", 8, 16)
    assert cfg.train.objective.loss == "progressive"  # no intermediate targets
    assert cfg.train.loop_sampling.sampler == "fixed" and cfg.train.steps == 600
    m = cfg.model
    assert (m.d_model, m.n_layers, m.attn_window, m.injection, m.state_norm) == \
        (64, 1, 2, "add", True)
    assert m.depth_attention.enabled and m.depth_attention.sources is None  # the looped default
    assert (cfg.eval.grid.knob, list(cfg.eval.grid.levels)) == ("length", [8, 16, 32])
    assert max(cfg.eval.loops) == 8 * cfg.loop


def test_a_recipe_replaces_the_defaults():
    cfg = load_config(["recipe=roots_staircase", "loop=8", "train.steps=7"])
    assert (cfg.task.name, cfg.task.chain_len) == ("roots", 6)
    assert cfg.train.objective.loss == "per_iteration" and cfg.train.steps == 7
    assert cfg.model.attn_window == 0 and list(cfg.eval.grid.levels) == []
    # the same keys, whatever the order of the recipe among the overrides
    assert load_config(["loop=8", "train.steps=7", "recipe=roots_staircase"]) == cfg


@pytest.mark.parametrize("overrides, fragment", [
    (["recipe=nope"], "unknown recipe 'nope'; choose one of: roots_staircase"),
    (["recipe=roots_staircase", "recipe=main"], "recipe= names 2 recipes"),
])
def test_bad_recipe_is_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)
