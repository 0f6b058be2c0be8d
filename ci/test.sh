#!/usr/bin/env bash
# CI: install into a fresh virtual environment and run the README's test command.
# CPU torch is pinned by ci/constraints-cpu.txt (the package itself asks for a range).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$(mktemp -d)/venv}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# --- the README's test command (keep the two in step) ---
pip install -q -c ci/constraints-cpu.txt -e ".[test,local]"
# The real Megatron-DeepSpeed (issue 11): only where the vendored archives lie beside the
# repository. DS_BUILD_OPS=0: DeepSpeed compiles the one CPU op it needs at first launch.
if [ -d ../shared/vendor ]; then
    DS_BUILD_OPS=0 pip install -q -c ci/constraints-cpu.txt -e ".[test,local,megatron]"
    python -m full_model.megatron install --vendor ../shared/vendor
else
    echo "ci: ../shared/vendor absent: the Megatron-DeepSpeed tests will skip"
fi
export MASTER_ADDR=127.0.0.1
python -m pytest -q
