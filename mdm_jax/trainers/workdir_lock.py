"""One run per workdir: a lock file that names its holder, with stale-lock detection.

Two runs on one workdir delete each other's checkpoints and interleave their metrics.
``WorkdirLock`` creates ``<workdir>/mdm_jax.lock`` atomically (O_EXCL) holding the host,
pid, start time and command of the run; a second run fails at once with that
information.  A lock is stale, and is taken over with a warning, when its process is
gone (same host) or its heartbeat is older than ``stale_after_s`` (another host: the
holder touches the file as it trains).  Only process 0 of a job takes the lock.

In a bucket (``gs://``) the lock is an object holding the same fields and a ``beat`` time
that the holder rewrites as it trains; objects have no O_EXCL, so two runs started within
the same second could both take it (documented in docs/cloud.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

from absl import logging

from mdm_jax.core import paths

LOCK_NAME = "mdm_jax.lock"


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir): ...`` (a no-op when ``enabled`` is False)."""

  def __init__(self, workdir: str, *, enabled: bool = True, stale_after_s: float = 900.0):
    self.path = paths.join(workdir, LOCK_NAME)
    self.remote = paths.is_remote(workdir)
    self.enabled = enabled
    self.stale_after_s = float(stale_after_s)
    self._held = False
    self._last_beat = 0.0

  def _info(self) -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv,
            "beat": time.time()}

  def _read(self) -> Optional[Dict[str, Any]]:
    try:
      with paths.open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _stale(self, info: Optional[Dict[str, Any]]) -> Optional[str]:
    if info is None:
      return "the lock file is unreadable"
    if info.get("host") == socket.gethostname():
      pid = int(info.get("pid", -1))
      return None if _alive(pid) else f"process {pid} on this host is gone"
    try:
      age = time.time() - (float(info.get("beat", 0)) if self.remote
                           else os.path.getmtime(self.path))
    except OSError:
      return "the lock file vanished"
    if age > self.stale_after_s:
      return f"no heartbeat for {age:.0f} s"
    return None

  def acquire(self) -> None:
    if not self.enabled:
      return
    paths.makedirs(paths.dirname(self.path))
    for _ in range(2):
      try:
        self._create()
      except FileExistsError:
        info = self._read()
        why = self._stale(info)
        if why is None:
          raise WorkdirBusy(
              f"{paths.dirname(self.path)} is in use by another run: pid {info.get('pid')} on "
              f"{info.get('host')}, started {info.get('started')} "
              f"({' '.join(map(str, info.get('argv', [])))[:300]}). Stop that run or use "
              f"another --workdir; if it is dead on another host, delete {self.path}.") from None
        logging.warning("Taking over the stale lock %s (%s).", self.path, why)
        try:
          paths.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      self._held = True
      self._last_beat = time.time()
      return
    raise WorkdirBusy(f"Could not take the lock {self.path}; another run took it first.")

  def _create(self) -> None:
    """Creates the lock holding this run's info; FileExistsError when there is one."""
    text = json.dumps(self._info())
    if self.remote:
      if paths.exists(self.path):
        raise FileExistsError(self.path)
      paths.atomic_write(self.path, text)
      return
    with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
      f.write(text)

  def heartbeat(self, min_interval_s: float = 30.0) -> None:
    """Marks the lock as alive (cheap; at most every ``min_interval_s``)."""
    now = time.time()
    if self._held and now - self._last_beat >= min_interval_s:
      try:
        if self.remote:
          info = self._read() or self._info()
          info["beat"] = now
          paths.atomic_write(self.path, json.dumps(info))
        else:
          os.utime(self.path)
      except OSError:
        pass
      self._last_beat = now

  def release(self) -> None:
    if self._held:
      info = self._read()
      if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        try:
          paths.remove(self.path)
        except FileNotFoundError:
          pass
      self._held = False

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
