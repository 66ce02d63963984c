# Two commands on a fresh machine with only Python:
#   make train   # set up .venv if needed, then run the main job: python train.py loop=8
#   make test    # set up .venv if needed, then run the tests: python -m pytest -q -n 2 (xdist)
# Without an NVIDIA GPU, torch comes from PyTorch's CPU index (no multi-GB CUDA build); where
# that index cannot be reached, from the configured package index.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: train test setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "$(TORCH)"; \
	else \
		$(PY) -m pip install --quiet --timeout 10 --retries 0 --index-url $(TORCH_CPU_INDEX) "$(TORCH)" \
			2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py loop=8

test: $(STAMP)
	HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

clean-venv:
	rm -rf $(VENV)
