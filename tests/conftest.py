"""Test set-up: 8 simulated CPU devices (for sharding tests), repo root on sys.path.

The suite is dominated by XLA compilation on CPU (tiny models, few steps), so:
* in-process programs are compiled at LLVM optimisation level 0 (compiles about 2x faster;
  results are the same programs, just less optimised machine code);
* compiled programs go to a persistent cache in ``.cache/jax_tests`` (git-ignored), shared
  by the test workers and the command-line runs the tests start, so a program that several
  tests build (the tiny configs' train step, say) is compiled once.  A fresh checkout
  starts with an empty cache.
* glibc malloc keeps large freed blocks for reuse (``mdm_jax/core/host_env.py``).
None of these changes what a test checks.  Subprocesses that pop XLA_FLAGS get XLA's defaults.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024 ** 3))
sys.path.insert(0, ROOT)
# The tuned glibc malloc of mdm_jax/core/host_env.py, for the test workers and their subprocesses.
from mdm_jax.core import host_env  # noqa: E402  pylint: disable=g-import-not-at-top
os.environ.update(host_env.malloc_env(os.environ) or {})
