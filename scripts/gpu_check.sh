#!/usr/bin/env bash
# The prepared GPU check (issue 14; bench/gpu_check.py says what it measures): on one GPU, in at
# most 8 minutes and without network, it prints the environment and writes
# bench/results/gpu-<gpu>.json. Extra arguments go to bench/gpu_check.py (e.g. --dry-run on a
# CPU machine, --only paper-llm, --steps 40).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
# no hub: models come from the repo's size presets and the offline embedding package
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_SECONDS:-480}" "$PY" bench/gpu_check.py "$@"
