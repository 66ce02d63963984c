"""Old import paths that users may have written still import the moved modules themselves."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("old,new", [
    ("looped.hf.export", "looped.integrations.hf.export"),
    ("looped.hf.modeling_looped", "looped.integrations.hf.modeling_looped"),
    ("looped.hf.configuration_looped", "looped.integrations.hf.configuration_looped"),
    ("looped.hf.tokenization_looped", "looped.integrations.hf.tokenization_looped"),
    ("looped.lm_eval_model", "looped.integrations.lm_eval_model"),
])
def test_old_path_is_the_moved_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
