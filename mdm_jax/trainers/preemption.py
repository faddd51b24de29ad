"""Stopping cleanly when the machine is taken away: SIGTERM -> save this step -> exit 75.

Spot/preemptible TPU VMs and GPU nodes get SIGTERM shortly before they go; SLURM's
``--signal`` warning reaches the program as SIGTERM through ``launch/slurm_gpu.sbatch``.
``Preemption.requested(step)`` is checked after every train step: the step in flight
finishes, the loop saves that step, waits for the commit and raises ``Preempted``; the
command line then exits with ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again"),
which the launchers requeue on.  Re-running the same command resumes with zero steps
lost.

With several processes, JAX's preemption service (started by
``jax.distributed.initialize``) catches the signal and agrees on one step for every
process, so all of them save the same step; Orbax's ``reached_preemption`` asks it.
A single process installs its own handler.
"""

from __future__ import annotations

import signal
import threading
import jax

PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Training stopped at ``step`` after saving it, because the process was told to stop."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted (SIGTERM): stopped after step {step} and saved it in "
                     f"{directory}; re-run the same command to resume.")
    self.step = step


class Preemption:
  """Watches for SIGTERM for the life of a training loop (a context manager)."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = signals
    self._flag = threading.Event()
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> "Preemption":
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous.clear()

  def _handler(self, signum, frame) -> None:
    del frame
    self._flag.set()
    self.signal_name = signal.Signals(signum).name

  def requested(self, step: int, checkpointer=None) -> bool:
    """True once a stop was asked for (every process agrees on the step when several run;
    ``checkpointer`` is the run's ``Checkpointer``, whose Orbax manager asks JAX)."""
    if self._multi:
      return checkpointer is not None and bool(checkpointer.reached_preemption(step))
    return self._flag.is_set()
