"""The tuned glibc malloc (mdm_jax/core/host_env.py): when it applies, that the re-exec sets it."""

import os
import subprocess
import sys

import pytest

from mdm_jax.core import host_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CPU_LINUX = dict(system="Linux", libc="glibc", exists=lambda p: False)


def test_applies_on_a_cpu_only_glibc_linux_host():
  assert host_env.malloc_env({}, **_CPU_LINUX) == host_env.TUNED_MALLOC_ENV
  assert host_env.malloc_env({"JAX_PLATFORMS": "cpu"}, **_CPU_LINUX) == host_env.TUNED_MALLOC_ENV


@pytest.mark.parametrize("environ, kw", [
    ({}, dict(system="Darwin")),                                   # not Linux
    ({}, dict(libc="")),                                           # musl / unknown libc
    ({"JAX_PLATFORMS": "cuda"}, {}),                               # an accelerator asked for
    ({"JAX_PLATFORMS": "tpu,cpu"}, {}),
    ({}, dict(exists=lambda p: p == "/dev/nvidia0")),              # a GPU host
    ({}, dict(exists=lambda p: p == "/dev/vfio")),                 # a TPU VM
    ({"MALLOC_ARENA_MAX": "2"}, {}),                               # the user's own malloc settings
    ({"MDM_JAX_TUNE_MALLOC": "0"}, {}),                            # opted out
    ({"MDM_JAX_MALLOC_TUNED": "1"}, {}),                           # already re-executed
])
def test_does_not_apply(environ, kw):
  assert host_env.malloc_env(environ, **{**_CPU_LINUX, **kw}) is None


def test_an_explicit_cpu_platform_ignores_device_files():
  assert host_env.malloc_env({"JAX_PLATFORMS": "cpu"}, **{**_CPU_LINUX, "exists": lambda p: True})


@pytest.mark.skipif(host_env.malloc_env({"JAX_PLATFORMS": "cpu"}) is None,
                    reason="the tuning does not apply to this host (not glibc Linux)")
def test_reexec_runs_the_program_with_the_tuned_environment():
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  probe = ("import os; print(os.getpid(), *(os.environ.get(k) for k in "
           "('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MDM_JAX_MALLOC_TUNED')))")
  code = ("import os, sys; print(os.getpid(), flush=True); from mdm_jax.core import host_env; "
          f"host_env.reexec_with_tuned_malloc(['-c', {probe!r}]); print('not re-executed')")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  pid_before, pid_after, mmap_max, trim, marker = out
  assert pid_before == pid_after                     # exec, not a child process
  assert (mmap_max, trim, marker) == ("0", host_env.TUNED_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"], "1")
