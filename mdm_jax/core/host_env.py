"""Host-process settings that must be in place before the process starts: glibc malloc on CPU.

On a CPU-only Linux host, glibc's malloc serves every request above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on ``free``.  The
default text job allocates several [batch, length, vocab] float32 buffers per step
(16 x 128 x 4096 x 4 B = 32 MiB each: logits, their gradient, the loss's soft-max), so
every step page-faults ~8k fresh pages per buffer: an ``exp`` over such an array took
22.8 ms with the default malloc and 4.0 ms with the settings below (BENCHMARKS.md).

glibc reads these settings once, when the process starts, so ``python -m mdm_jax.main``
re-executes itself with them (``reexec_with_tuned_malloc``) before anything else is
imported, and the test suite's ``conftest.py`` puts them in the environment its worker
processes inherit.  They are applied only where they help and cannot surprise:

* Linux with glibc, and no accelerator in sight (``JAX_PLATFORMS`` unset or ``cpu``, and
  no ``/dev/nvidia0``, ``/dev/accel0`` or ``/dev/vfio`` device); on GPU and TPU hosts
  the big arrays live in device memory.
* Not when the user has set any ``MALLOC_*`` variable already, or ``MDM_JAX_TUNE_MALLOC=0``.

What they do: ``MALLOC_MMAP_MAX_=0`` serves large blocks from the heap instead of
``mmap``; ``MALLOC_TRIM_THRESHOLD_`` (64 GiB) keeps freed heap memory for reuse instead
of returning it after every step; ``MALLOC_TOP_PAD_`` (64 MiB) grows the heap in large
steps.  The cost is that the process keeps its peak heap size until it exits.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from typing import Callable, Dict, Mapping, Optional, Sequence

TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(64 << 20),
}
OPT_OUT = "MDM_JAX_TUNE_MALLOC"          # "0" disables the tuning
_MARKER = "MDM_JAX_MALLOC_TUNED"         # set in the re-executed process (no second exec)
ACCELERATOR_PATHS = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio")


def malloc_env(environ: Mapping[str, str], *,
               exists: Callable[[str], bool] = os.path.exists,
               system: Optional[str] = None,
               libc: Optional[str] = None) -> Optional[Dict[str, str]]:
  """The variables to add to ``environ`` for the tuned malloc, or None where it does not apply."""
  system = platform.system() if system is None else system
  libc = platform.libc_ver()[0] if libc is None else libc
  if system != "Linux" or libc != "glibc":
    return None
  if environ.get(OPT_OUT, "1") == "0" or environ.get(_MARKER):
    return None
  if any(k.startswith("MALLOC_") for k in environ):    # the user's own settings win
    return None
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms and platforms != "cpu":
    return None
  if not platforms and any(exists(p) for p in ACCELERATOR_PATHS):
    return None
  return dict(TUNED_MALLOC_ENV)


def reexec_with_tuned_malloc(python_args: Sequence[str]) -> None:
  """Replaces this process by ``sys.executable *python_args`` with the tuned malloc.

  Returns (doing nothing) where ``malloc_env`` says the tuning does not apply.  Call it
  before any output or thread exists: ``os.execve`` keeps the PID, the working
  directory, the open files and the rest of the environment.
  """
  extra = malloc_env(os.environ)
  if extra is None:
    return
  env = dict(os.environ)
  env.update(extra)
  env[_MARKER] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *python_args], env)


def _no_tpu_chip():
  raise RuntimeError("no TPU chip on this host")


def skip_absent_tpu(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Keeps JAX from starting libtpu's runtime on a host without a TPU chip.

  With ``libtpu`` installed (the test set-up installs it, to compile for TPU without one:
  ``mdm_jax.benchmarks.tpu_compile``), JAX's automatic platform choice tries the TPU
  runtime first; on a CPU or GPU host that attempt fails quietly for JAX but libtpu
  prints warnings about ``TPU_ACCELERATOR_TYPE`` and ``TPU_WORKER_HOSTNAMES`` and an
  ``E0000`` line.  Where no platform was asked for (``JAX_PLATFORMS`` and
  ``jax_platforms`` unset, no ``JAX_FORCE_TPU_INIT``), JAX sees no TPU chip and no
  backend has started yet, the TPU runtime is dropped from the candidates; compile-only
  TPU devices (``jax.experimental.topologies``) still load libtpu themselves.
  Returns whether it was dropped.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_PLATFORMS") or environ.get("JAX_FORCE_TPU_INIT") is not None:
    return False
  try:
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import hardware_utils, xla_bridge  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  if jax.config.jax_platforms:
    return False
  try:
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return False
    if xla_bridge.backends_are_initialized():
      return False
    factories = getattr(xla_bridge, "_backend_factories", None)
    if isinstance(factories, dict) and "tpu" in factories:
      # The platform stays known (Pallas registers its TPU lowerings under that name, for
      # compile-only devices), but starting it fails quietly, before libtpu is loaded.
      factories["tpu"] = dataclasses.replace(factories["tpu"], factory=_no_tpu_chip,
                                             fail_quietly=True)
      return True
  except Exception:  # pylint: disable=broad-except  (a JAX without these internals: no change)
    pass
  return False
