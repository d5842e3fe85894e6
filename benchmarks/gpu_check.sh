#!/usr/bin/env bash
# On a machine with a CUDA GPU: every trainer a few steps with and without --amp, then analyze_scan.py;
# prints (and writes to runs/gpu_check/gpu_check.md) seconds and peak GPU memory per step.
# Usage: bash benchmarks/gpu_check.sh [--out DIR] [--device cuda:N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
exec "$PY" -m benchmarks.gpu_check "$@"
