"""Metrics to JSONL and TensorBoard, and a progress line with rates and ETA."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional

from absl import logging


class MetricsWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard event files.

  ``resume_step``: the step the run continues from.  Lines of ``metrics.jsonl`` written
  after it (by the interrupted run, for steps that are now trained again) get
  ``"superseded": true``, so a reader keeps the others and sees every step once;
  TensorBoard purges them.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self.superseded = 0
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      self.superseded = mark_superseded(path, resume_step)
      if self.superseded:
        logging.info("metrics.jsonl: %d lines after step %d marked superseded (replayed).",
                     self.superseded, resume_step)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step or None)
    except ImportError:  # optional
      logging.warning("tensorboardX is not installed; writing metrics.jsonl only.")

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    rec = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def mark_superseded(path: str, last_step: int) -> int:
  """Marks the lines of a metrics file with ``step > last_step`` as ``"superseded": true``
  (they came from an interrupted run and those steps are trained again); a torn last line
  (a crash mid-write) is dropped.  Atomic; returns how many lines were newly marked."""
  out, marked, changed = [], 0, False
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
        step = int(rec.get("step", 0))
      except (ValueError, TypeError, AttributeError):
        changed = True
        continue
      if step > last_step and not rec.get("superseded"):
        rec["superseded"] = True
        marked += 1
        changed = True
        line = json.dumps(rec) + "\n"
      out.append(line if line.endswith("\n") else line + "\n")
  if changed:
    with open(path + ".tmp", "w") as f:
      f.writelines(out)
    os.replace(path + ".tmp", path)
  return marked


def format_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """A progress line: bar, step, loss, steps/s, tokens/s and ETA."""

  def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True,
               stream=None):
    self.total, self.start, self.tokens_per_step = total, start, tokens_per_step
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self._t0: Optional[float] = None
    self._step0 = start
    self._last = (start, time.time())
    self._rate = 0.0

  def rates(self) -> Dict[str, float]:
    return {"perf/steps_per_sec": self._rate,
            "perf/tokens_per_sec": self._rate * self.tokens_per_step}

  def update(self, step: int, metrics: Dict[str, float]) -> None:
    now = time.time()
    if self._t0 is None:   # the first report includes compilation; rates start after it
      self._t0, self._step0 = now, step
      self._rate = 0.0
    else:
      self._rate = (step - self._step0) / max(now - self._t0, 1e-9)
    if not self.enabled:
      return
    frac = step / max(self.total, 1)
    bar = "#" * int(25 * frac) + "." * (25 - int(25 * frac))
    eta = (self.total - step) / self._rate if self._rate > 0 else float("nan")
    parts = [f"[{bar}] {step}/{self.total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    if self._rate > 0:
      parts += [f"{self._rate:.2f} steps/s", f"{self._rate * self.tokens_per_step:,.0f} tok/s",
                f"ETA {format_time(eta)}"]
    else:
      parts += ["(compiling / warming up)"]
    self.message(" | ".join(parts))

  def message(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)
