# Two commands set up and run everything on a fresh machine:
#   make demo   - the built-in demo (CPU is fine)
#   make test   - the test suite (fast tier, then the slow end-to-end tier)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_FLAGS ?= -q -p no:cacheprovider

.PHONY: install demo test test-fast test-slow bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Keep an existing torch (e.g. your CUDA build); otherwise take the pinned one.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rlhf run

test: test-fast test-slow

# Our stages vs plain TRL, PPO one-base vs full, matmul peak and MFU: a table and runs/bench/bench.json
bench: install
	$(PY) tests/bench/bench.py $(BENCH_FLAGS)

test-fast: install
	$(PY) -m pytest $(PYTEST_FLAGS)

test-slow: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m slow

clean:
	rm -rf runs .pytest_cache
