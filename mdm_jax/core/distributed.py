"""Multi-process start-up on JAX's own distributed runtime."""

from __future__ import annotations

import faulthandler
import os
import signal

import jax
import numpy as np
from absl import logging

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE")

# The environment variable that jax's config reads for the CPU collectives flag.
_CPU_COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"


def _cpu_is_the_platform() -> bool:
  """True when this process will compute on the CPU backend.

  Decided from the environment only (nothing may touch a backend before
  ``jax.distributed.initialize``): ``JAX_PLATFORMS`` names ``cpu`` first, or
  it is unset and no accelerator plug-in is installed.
  """
  platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  import importlib.util  # pylint: disable=import-outside-toplevel
  accel = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
           "libtpu")
  return not any(importlib.util.find_spec(m) is not None for m in accel)


def enable_cpu_collectives() -> bool:
  """Selects gloo for cross-process collectives of the CPU backend.

  Without a CPU collectives implementation a multi-process CPU run fails at
  its first cross-process all-reduce.  jax 0.10+ already defaults to gloo;
  older releases default to none, so we set it explicitly.  An explicit
  ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` (e.g. ``mpi``) is respected.  Must
  run before the CPU backend is created.  Returns True if gloo is in force.
  """
  if os.environ.get(_CPU_COLLECTIVES_ENV):
    return os.environ[_CPU_COLLECTIVES_ENV] == "gloo"
  current = getattr(jax.config, "jax_cpu_collectives_implementation", None)
  if current in (None, "none", ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  return True


def dump_stacks_on_signal(signum: int = signal.SIGUSR1) -> None:
  """``kill -USR1 PID`` then writes every thread's Python stack to stderr and the job goes on.

  A multi-process job that hangs (one process waiting in a collective or a
  barrier the others never reach) prints nothing by itself; the stacks of all
  processes show where each one waits.  ``launch/local_multiprocess.py`` sends
  the signal when its ``--timeout`` expires.  On SLURM: ``scancel --signal=USR1
  JOBID``; on a TPU pod: ``pkill -USR1 -f mdm_jax.main`` on every worker.
  """
  if hasattr(signal, "SIGUSR1"):      # not on Windows
    faulthandler.register(signum, all_threads=True, chain=False)


def _local_device_ids():
  """MDM_JAX_LOCAL_DEVICE_IDS=0,1,2,3 -> [0, 1, 2, 3] (one process driving several GPUs)."""
  raw = os.environ.get("MDM_JAX_LOCAL_DEVICE_IDS", "").strip()
  return [int(x) for x in raw.split(",") if x.strip()] if raw else None


def maybe_initialize() -> None:
  """Calls ``jax.distributed.initialize()`` when the environment has several processes.

  * Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (set by
    launch/local_multiprocess.py, or by hand on any cluster).
  * Otherwise JAX's own cluster detection (Cloud TPU pod, SLURM, Open MPI) is
    used when SLURM_NTASKS / OMPI_COMM_WORLD_SIZE / TPU_WORKER_HOSTNAMES show
    more than one process, or when MDM_JAX_DISTRIBUTED=1 forces it (set by
    launch/tpu_pod.sh: a TPU VM's ssh shell need not export TPU_* variables,
    and JAX finds the pod through the metadata server).
  * MDM_JAX_DISTRIBUTED=0 never initializes (e.g. a single-task srun inside an
    allocation with several tasks).
  * MDM_JAX_LOCAL_DEVICE_IDS=0,1,... is passed as ``local_device_ids`` (one
    SLURM task per node driving all its GPUs; JAX's SLURM default is one GPU,
    number SLURM_LOCALID, per task).

  When several processes run on the CPU backend (a local multi-process run, or
  a CPU-only SLURM job), gloo collectives are switched on first.
  """
  force = os.environ.get("MDM_JAX_DISTRIBUTED", "").strip().lower()
  if force in ("0", "false", "no"):
    return
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    nproc = int(os.environ["JAX_NUM_PROCESSES"])
    pid = int(os.environ["JAX_PROCESS_ID"])
    if nproc > 1:
      if _cpu_is_the_platform():
        enable_cpu_collectives()
      jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid,
                                 local_device_ids=_local_device_ids())
      logging.info("jax.distributed: process %d of %d (coordinator %s)", pid, nproc, addr)
    return
  multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
           or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
           or force in ("1", "true", "yes"))
  if multi:
    if _cpu_is_the_platform():
      enable_cpu_collectives()
    jax.distributed.initialize(local_device_ids=_local_device_ids())
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def host_arrays(tree):
  """``tree`` with every ``jax.Array`` turned into a NumPy array on this host.

  An array that spans other processes' devices (FSDP or tensor sharding across hosts)
  cannot be read by one process alone; it is gathered with
  ``multihost_utils.process_allgather``, which is a collective: **every process must call
  this with the same tree**, or the job waits forever.  Arrays this process can read
  whole (local, or replicated on its devices) are copied without communication.  Leaves
  that are not jax arrays pass through unchanged.
  """
  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def exit_without_barrier(code: int) -> None:
  """Exits at once with ``code`` when a multi-process job must stop on an error.

  ``jax.distributed`` ends each process with a shutdown barrier that waits for all the
  others; after an error on one process the others are usually waiting in a collective
  that will never complete, so the barrier only times out minutes later.  Flushing the
  output and leaving with ``os._exit`` lets the launcher (or the cluster scheduler) see
  the failure and stop the job straight away.  A single process exits normally.
  """
  import sys  # pylint: disable=import-outside-toplevel
  if jax.process_count() <= 1 or code == 0:
    sys.exit(code)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  logging.flush()
  os._exit(code)  # pylint: disable=protected-access
