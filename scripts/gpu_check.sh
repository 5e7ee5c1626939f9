#!/usr/bin/env bash
# GPU check of the vLLM backend (a few minutes on one CUDA GPU, no hub): installs the CUDA build
# of vLLM 0.32, runs the vLLM (in-process and server) and bf16 tests, then scripts/gpu_check.py (generation
# timings, then 3 training steps per vLLM mode: colocated full / LoRA adapter / LoRA merged sync,
# a server on the same GPU, and 2 ranks when 2 GPUs are present).
set -euo pipefail
cd "$(dirname "$0")/.."
make install-vllm
.venv/bin/python -m pytest -q -p no:cacheprovider tests/rollout/test_vllm_engine.py tests/rollout/test_vllm_server.py tests/rollout/test_vllm_transfer.py tests/model/test_precision.py
.venv/bin/python scripts/gpu_check.py
