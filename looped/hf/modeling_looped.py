"""Moved to looped.integrations.hf.modeling_looped; this name is kept for old imports."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("looped.integrations.hf.modeling_looped")
