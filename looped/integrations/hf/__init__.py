"""The transformers export (`looped export`): modeling_looped.py, configuration_looped.py and
tokenization_looped.py are copied into every exported directory and import torch and
transformers only; export.py writes that directory and checks it against the run."""
