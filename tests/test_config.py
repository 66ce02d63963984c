"""Config resolution: presets, dotlist overrides, typed values, and one-line errors."""

import pytest

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
])
def test_bad_input_is_one_line_config_error(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
