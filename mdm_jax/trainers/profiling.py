"""A ``jax.profiler`` trace of a window of training steps (``config.profile``).

``profile.start_step = N`` and ``profile.num_steps = K`` trace steps N .. N+K-1 (numbered
as the progress line numbers them) into ``WORKDIR/profile``, which TensorBoard's profile
plugin and XProf open (docs/outputs.md).  Every process writes its own trace.  Each
training step is wrapped in a ``StepTraceAnnotation`` so the trace viewer and XProf's step
view split the timeline by step.  Pick a window after compilation (N > 1) unless the
compile is what you want to see.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Callable, Optional

import jax

from mdm_jax.core import paths


class StepProfiler:
  """Starts the trace before step ``start_step`` and stops it after ``num_steps`` steps."""

  def __init__(self, profile_config, workdir: str, first_step: int,
               log: Optional[Callable[[str], None]] = None):
    cfg = profile_config or {}
    self.start = int(cfg.get("start_step", 0) or 0)
    self.num_steps = max(int(cfg.get("num_steps", 5) or 5), 1)
    self.directory = paths.join(workdir, "profile")
    self._local = self.directory
    self.log = log or (lambda msg: None)
    self.active = False
    self._t0 = 0.0
    if self.start and first_step >= self.start:
      self.log(f"profile: the run resumes at step {first_step + 1}, after profile.start_step="
               f"{self.start}; no trace is taken.")
      self.start = 0

  @property
  def last(self) -> int:
    return self.start + self.num_steps - 1

  def step(self, step_number: int):
    """A context around training step ``step_number`` (1-based): starts the trace before
    the window's first step and annotates the step."""
    if self.start and not self.active and step_number == self.start:
      # A bucket workdir: traced into a local folder, copied up when the trace stops.
      self._local = (tempfile.mkdtemp(prefix="mdm_jax_profile_")
                     if paths.is_remote(self.directory) else self.directory)
      os.makedirs(self._local, exist_ok=True)
      jax.profiler.start_trace(self._local)
      self.active, self._t0 = True, time.time()
    if not self.active:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step_number)

  def after(self, step_number: int, state: Any) -> None:
    """After step ``step_number``: waits for it and stops the trace at the window's end."""
    if self.active and step_number >= self.last:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    if self._local != self.directory:
      paths.upload_tree(self._local, self.directory)
    self.log(f"profile: traced steps {self.start}-{self.last} ({time.time() - self._t0:.1f} s) "
             f"into {self.directory}; open it with: tensorboard --logdir {self.directory} "
             "(tensorboard-plugin-profile) or xprof --logdir " + self.directory)
