#!/usr/bin/env bash
# Device check: the probes measured on one device, and the reference step at three widths
# (host-bound → compute-bound) against the prediction from those probes; a table, CSV and JSON.
#
#   bash benchmarks/device_check.sh                     # one GPU (NVIDIA: --device cuda), ≤ 8 min
#   bash benchmarks/device_check.sh --device cpu        # this CPU at CPU sizes, ~3 min on 2 cores
#   bash benchmarks/device_check.sh --help              # every flag (python -m benchmarks.device_check)
#
# Runs with the project's Python: activate its virtual environment first, or set PYTHON
# (PYTHON=.venv/bin/python bash benchmarks/device_check.sh). It runs from the repository root
# whatever the current directory, so a relative --out is relative to the repository root.
# Where the host name does not resolve to a local address, export MASTER_ADDR=127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" -m benchmarks.device_check "$@"
