# Two commands on a fresh machine: `make demo` and `make test`. Both run `setup` first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean
setup: $(STAMP)

# Re-install only when the package's requirements change, so repeated runs take seconds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/distcls demo

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
