"""Moved to looped.integrations.lm_eval_model; this name is kept for old imports (and still
registers the lm-eval model "looped")."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("looped.integrations.lm_eval_model")
