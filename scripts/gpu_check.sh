#!/usr/bin/env bash
# GPU check of the vLLM backend (a few minutes on one CUDA GPU, no hub): installs the CUDA build
# of vLLM 0.32, runs the vLLM and bf16 tests, then scripts/gpu_check.py (timings and 3 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
make install-vllm
.venv/bin/python -m pytest -q -p no:cacheprovider tests/rollout/test_vllm_engine.py tests/model/test_precision.py
.venv/bin/python scripts/gpu_check.py
