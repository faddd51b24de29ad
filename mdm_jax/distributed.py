"""Multi-process start-up on JAX's own distributed runtime."""

from __future__ import annotations

import os

import jax
from absl import logging

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE")


def maybe_initialize() -> None:
  """Calls ``jax.distributed.initialize()`` when the environment has several processes.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (used by
  launch/local_multiprocess.sh).  Otherwise JAX's own cluster detection (TPU pod,
  SLURM, Open MPI) is used when its variables show more than one process.
  """
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    nproc = int(os.environ["JAX_NUM_PROCESSES"])
    pid = int(os.environ["JAX_PROCESS_ID"])
    if nproc > 1:
      jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
      logging.info("jax.distributed: process %d of %d (coordinator %s)", pid, nproc, addr)
    return
  multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
           or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if multi:
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
