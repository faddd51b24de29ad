"""Orbax checkpoints: train state + data-iterator state + config, atomically and verified.

One ``CheckpointManager`` per workdir saves a Composite of
``state`` (parameters, optimizer state, EMA parameters, step, PRNG key),
``data`` (the grain iterator's position, so a resumed run sees exactly the
batches an uninterrupted one would) and ``config`` (JSON).  Orbax writes each
step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a checkpoint that looks finished; restores go through
abstract arrays that carry the *current* shardings, so a run saved on one mesh
restores onto another.

On top of Orbax:

* **Checksums.**  Once a step is committed, process 0 writes ``mdm_jax_checksums.json``
  into it: size and CRC-32 of every file.  ``verify`` re-reads them; a missing,
  truncated or altered file (including Orbax's ``_METADATA`` and the data-iterator
  state) marks the step *damaged*.
* **Fallback.**  ``restore_intact`` walks from the newest step down: a damaged step is
  moved aside to ``<dir>_damaged/`` with the reason, and the newest intact one is
  restored.  A step without checksums (a run killed between commit and checksum) that
  fails to restore is set aside only when an older step restores, so a configuration
  error never moves good checkpoints.
* **Disk space.**  ``save`` checks the free space against the last checkpoint's size
  first, and an error of the asynchronous writer (``No space left``) comes back at the
  next step as one line; partial temporary folders are removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import paths
from mdm_jax.core.config import flatten, to_dict
from mdm_jax.data import COMPAT_KEYS as DATA_COMPAT_KEYS, STREAM_KEYS as DATA_STREAM_KEYS
from mdm_jax.networks import RUNTIME_KEYS
from mdm_jax.tasks import TASKS

class CheckpointError(RuntimeError):
  """A checkpoint is missing, partial or incompatible; the message says what to do."""


MANIFEST = "mdm_jax_checksums.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
_MIB = 2 ** 20


def _crc32(path: str) -> str:
  crc = 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_MIB)
      if not chunk:
        break
      crc = zlib.crc32(chunk, crc)
  return f"{crc & 0xFFFFFFFF:08x}"


def _size_and_checksum(path: str) -> Tuple[int, str]:
  """Size and CRC-32 (hex) of a local file; for an object in a bucket, its size and the
  CRC32C the server computed and verified at upload (``crc32c:...``), in one metadata
  request that reads no data."""
  if paths.is_remote(path):
    info = paths.object_info(path)
    return info["size"], f"crc32c:{info['crc32c']}"
  return os.path.getsize(path), _crc32(path)


def _files_under(step_dir: str) -> List[str]:
  return [rel for rel in paths.walk_files(step_dir)
          if rel != MANIFEST and not rel.endswith(".tmp")]


def write_manifest(step_dir: str) -> str:
  """Writes ``step_dir/mdm_jax_checksums.json`` (size and checksum of every file), atomically."""
  files = {rel: list(_size_and_checksum(paths.join(step_dir, rel)))
           for rel in _files_under(step_dir)}
  return paths.atomic_write(paths.join(step_dir, MANIFEST),
                            json.dumps({"format": 1, "files": files}))


def verify_step_dir(step_dir: str) -> Optional[str]:
  """None when every file matches the manifest; "unverified" when there is no manifest;
  otherwise the reason the step is damaged (the first file that differs)."""
  path = paths.join(step_dir, MANIFEST)
  if not paths.exists(path):
    return "unverified"
  try:
    files = json.loads(paths.read_text(path))["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its checksum file is unreadable ({e})"
  for rel, (size, crc) in sorted(files.items()):
    full = paths.join(step_dir, rel)
    if not paths.exists(full):
      return f"{rel} is missing"
    actual, checksum = _size_and_checksum(full)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} were written"
    if checksum != crc:
      return f"{rel} does not match its checksum"
  return None


def dir_bytes(path: str) -> int:
  return paths.tree_bytes(path)


def compat_view(config_dict: Dict[str, Any], keys: Sequence[str],
                ignore: Sequence[str] = RUNTIME_KEYS) -> Dict[str, Any]:
  """The flattened entries of ``config_dict`` under ``keys`` (sections or single keys),
  without those that may change freely on resume (``ignore``)."""
  flat = flatten(config_dict)
  return {k: v for k, v in flat.items()
          if any(k == c or k.startswith(c + ".") for c in keys) and k not in ignore}


def compat_keys(objective: str = "diffusion") -> Tuple[str, ...]:
  """The config entries a checkpoint of this task and the run restoring it must agree on:
  the task's (``Task.COMPAT_KEYS``) and the data's (which token ids mean what)."""
  return tuple(TASKS.get(objective).COMPAT_KEYS) + tuple(DATA_COMPAT_KEYS)


def resume_keys(objective: str = "diffusion") -> Tuple[str, ...]:
  """What a resumed training run must also keep: ``compat_keys`` plus every key that
  decides the data stream or the random stream (sequence length, shuffling, global
  batch size, seed), so the restored iterator position and PRNG key mean what they did."""
  return compat_keys(objective) + tuple(DATA_STREAM_KEYS) + ("seed", "training.batch_size")


def config_mismatches(saved: Dict[str, Any], current: Dict[str, Any],
                      keys: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
  """{key: (saved value, current value)} for the ``keys`` sections where the two differ
  (default: ``compat_keys`` of the current config's objective).

  A key the saved config lacks (it was added after the checkpoint was written) counts
  as its default in ``configs/base.py``, the value that means "as before".
  """
  if keys is None:
    keys = compat_keys(current.get("objective", "diffusion"))
  defaults = compat_view(to_dict(get_base_config()), keys)
  a, b = compat_view(saved, keys), compat_view(current, keys)
  for k, neutral in defaults.items():
    a.setdefault(k, neutral)
    b.setdefault(k, neutral)
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")}


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with clear errors."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 0,
               async_save: bool = True, read_only: bool = False,
               best_metric: Optional[str] = None, barrier_prefix: Optional[str] = None,
               check_free_space: bool = True):
    """``check_free_space``: compare the free space with the last checkpoint's size
    before each save (off where a file system's free space means nothing).

    ``best_metric``: keep the ``max_to_keep`` steps with the lowest value of this
    metric (passed to ``save``) instead of the most recent ones.

    ``barrier_prefix`` names this manager's cross-process barriers (default: the
    directory's base name).  Orbax keys its barriers by the step directory's name
    ("4.orbax-checkpoint-tmp"), so two managers saving the same step at once in a
    multi-process job (``checkpoints/`` and ``checkpoints_best/`` after an eval) would
    otherwise meet at each other's barriers and hang or fail.  It must be the same in
    every process and differ between managers that save concurrently."""
    self.directory = paths.resolve(directory)
    self.remote = paths.is_remote(self.directory)
    if barrier_prefix is None:
      barrier_prefix = paths.basename(self.directory.rstrip(os.sep)) or "ckpt"
    self.barrier_prefix = re.sub(r"[^A-Za-z0-9_]", "_", barrier_prefix)
    best = {}
    if best_metric:
      best = dict(best_fn=lambda m: float(m[best_metric]), best_mode="min",
                  keep_checkpoints_without_metrics=False)
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=self.barrier_prefix), **best)
    self.save_every = save_every
    self.check_free_space = check_free_space
    self._pending: List[int] = []
    self._last_size = 0
    self._needed = 0
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    latest = self._mngr.latest_step()
    if latest is not None:
      self._last_size = dir_bytes(self.step_dir(latest))

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> Iterable[int]:
    return self._mngr.all_steps()

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's preemption service has asked every process to stop at ``step``."""
    return bool(self._mngr.reached_preemption(step))

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest ``best_metric`` (needs ``best_metric``)."""
    if not self.best_metric:
      raise ValueError("best_step() needs a Checkpointer created with best_metric=...")
    return self._mngr.best_step()

  # ------------------------------------------------------------------ save
  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0

  def step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def _space_error(self, needed: int, cause: str = "") -> CheckpointError:
    free = (shutil.disk_usage(self.directory).free
            if not self.remote and os.path.isdir(self.directory) else 0)
    last = self.latest_step()
    return CheckpointError(
        f"No space left on {self.directory}: {free / _MIB:.0f} MiB free, the checkpoint needs "
        f"~{needed / _MIB:.0f} MiB{cause}. Free space (or lower checkpoint.max_to_keep) and "
        f"re-run the same command; it resumes from step {last if last is not None else 0}.")

  def _remove_partial(self) -> None:
    """Removes Orbax's temporary step folders (left by a failed save) in process 0."""
    if not self.is_primary or not paths.isdir(self.directory):
      return
    for name in paths.listdir(self.directory):
      if TMP_MARKER in name:
        paths.rmtree(paths.join(self.directory, name))

  def _check_async_errors(self) -> None:
    """Raises a finished asynchronous save's error as one ``CheckpointError`` line."""
    try:
      self._mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)

  def _raise_save_error(self, e: BaseException) -> None:
    self._remove_partial()
    text = f"{type(e).__name__}: {e}"
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text:
      raise self._space_error(self._last_size or self._needed,
                              " (the last save failed: no space left)") from e
    first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise CheckpointError(f"Saving a checkpoint in {self.directory} failed: "
                          f"{type(e).__name__}: {first[:300]}") from e

  def poll(self) -> None:
    """Once a save has finished: surfaces its error, or writes its checksums."""
    if self._pending and not self._mngr.is_saving_in_progress():
      self._finalize()

  def _finalize(self) -> None:
    self._check_async_errors()
    pending, self._pending = self._pending, []
    if not self.is_primary:
      return
    for step in pending:
      d = self.step_dir(step)
      if paths.isdir(d):
        write_manifest(d)
        self._last_size = max(self._last_size, dir_bytes(d))

  def save(self, step: int, state: Any, data_iter: Any = None,
           config_dict: Optional[Dict[str, Any]] = None, force: bool = False,
           metrics: Optional[Dict[str, float]] = None) -> bool:
    if self._pending:
      self.wait()
    needed = self._last_size or sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
    self._needed = needed
    if (self.check_free_space and not self.remote and self.is_primary
        and os.path.isdir(self.directory)):
      if shutil.disk_usage(self.directory).free < needed * 1.05 + _MIB:
        raise self._space_error(needed)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config_dict is not None:
      items["config"] = ocp.args.JsonSave(config_dict)
    try:
      saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force,
                              metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)
    if saved:
      self._pending.append(step)
    return saved

  def wait(self):
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)
    self._finalize()

  def close(self):
    try:
      self.wait()
    finally:
      self._mngr.close()

  # ------------------------------------------------------------------ verification
  def verify(self, step: int) -> Optional[str]:
    """None (intact), "unverified" (no checksums) or why the step is damaged."""
    d = self.step_dir(step)
    if not paths.isdir(d):
      return f"{d} is missing"
    return verify_step_dir(d)

  def set_aside(self, step: int, reason: str) -> str:
    """Moves a damaged step to ``<dir>_damaged/<step>`` (process 0) and forgets it."""
    aside_root = self.directory.rstrip(os.sep) + "_damaged"
    dest = paths.join(aside_root, f"{step}")
    if self.is_primary:
      paths.makedirs(aside_root)
      if paths.exists(dest):
        dest = f"{dest}.{int(time.time())}"
      paths.rename(self.step_dir(step), dest)
      with paths.open(dest + ".reason.txt", "w") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {reason}\n")
    self._mngr.reload()
    return dest

  # ------------------------------------------------------------------ restore
  def read_config(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
    step = self.latest_step() if step is None else step
    path = paths.join(self.directory, str(step), "config")
    for name in ("metadata", "config.json"):
      p = paths.join(path, name)
      if paths.exists(p):
        with paths.open(p) as f:
          return json.load(f)
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception:  # pylint: disable=broad-except
      return None

  def check_compatible(self, current_config: Dict[str, Any], step: Optional[int] = None,
                       keys: Optional[Sequence[str]] = None):
    """Raises ``CheckpointError`` naming every ``keys`` entry (default: ``compat_keys``)
    where the checkpoint's saved config and ``current_config`` disagree."""
    saved = self.read_config(step)
    if saved is None:
      logging.warning("Checkpoint in %s has no saved config; skipping compatibility check.",
                      self.directory)
      return
    diff = config_mismatches(saved, current_config, keys)
    if diff:
      lines = "\n".join(f"  {k}: checkpoint={a!r}  current={b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(
          f"The checkpoint in {self.directory} (step {step or self.latest_step()}) was trained "
          f"with a different configuration:\n{lines}\nRun with the checkpoint's values for these "
          "fields (e.g. --config.<field>=<value>), or use a new --workdir.")

  def has_data_state(self, step: int) -> bool:
    """Whether step ``step`` saved the data iterator (a converted model's step 0 has none)."""
    return paths.isdir(paths.join(self.directory, str(step), "data"))

  def restore(self, abstract_state: Any, data_iter: Any = None,
              step: Optional[int] = None) -> Any:
    """Restores onto the shardings carried by ``abstract_state``'s leaves.

    ``abstract_state`` is a tree of jax.ShapeDtypeStruct with ``sharding`` set
    (the target mesh may differ from the one that saved).  When ``data_iter`` is
    given its state is restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint found in {self.directory}. Train first "
                            "(--mode=train) or point --workdir at a training run.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    foreign_data_state = None
    if data_iter is not None and not self.has_data_state(step):
      logging.info("Checkpoint step %d has no data-iterator state (a converted model): the "
                   "data stream starts from its beginning.", step)
      data_iter = None
    if data_iter is not None:
      foreign_data_state = self._data_state_from_other_process_count(step)
      if foreign_data_state is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (TensorStore, JSON, Orbax errors)
      first = next((l for l in str(e).splitlines() if l.strip()), "")[:400]
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} could not be restored "
          f"({type(e).__name__}: {first}). Either it is damaged (an earlier step is used "
          "automatically when one restores) or it does not match the current model/optimizer "
          "structure: use the configuration it was trained with, or a new --workdir.") from e
    if foreign_data_state is not None:
      if isinstance(data_iter, grain.DatasetIterator):
        data_iter.set_state(json.loads(foreign_data_state))
      else:
        data_iter.set_state(foreign_data_state.encode())
      if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()
    return out["state"]

  def restore_intact(self, abstract_state: Any, data_iter: Any = None, *,
                     current_config: Optional[Dict[str, Any]] = None,
                     keys: Optional[Sequence[str]] = None, set_aside: bool = True,
                     log=logging.warning) -> Tuple[Any, int]:
    """Restores the newest intact step; returns (state, step).

    Steps are tried from the newest down.  One whose checksums fail is damaged: it is
    moved to ``<dir>_damaged/`` (``set_aside``) or skipped.  One without checksums that
    fails to restore is damaged only if an older step restores.  A step that verifies
    but does not restore means the configuration or code differs: that error is raised
    and nothing is moved.  ``current_config`` is checked against each candidate's saved
    config (``keys``, default ``compat_keys``) before it is restored.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"No checkpoint found in {self.directory}. Train first "
                            "(--mode=train) or point --workdir at a training run.")
    unverified_failures: List[Tuple[int, CheckpointError]] = []
    damaged: List[int] = []
    for step in steps:
      reason = self.verify(step)
      if reason not in (None, "unverified"):
        damaged.append(step)
        where = self.set_aside(step, reason) if set_aside else "left in place"
        log(f"checkpoint {step} is damaged ({reason}); set aside in {where}; trying an "
            "earlier step.")
        continue
      if current_config is not None:
        self.check_compatible(current_config, step, keys)
      try:
        state = self.restore(abstract_state, data_iter=data_iter, step=step)
      except CheckpointError as e:
        if reason is None:
          raise
        unverified_failures.append((step, e))
        continue
      for bad, err in unverified_failures:
        damaged.append(bad)
        where = self.set_aside(bad, str(err)) if set_aside else "left in place"
        log(f"checkpoint {bad} is damaged (it does not restore, and step {step} does); "
            f"set aside in {where}.")
      if damaged:
        log(f"resuming from checkpoint {step}, the newest intact one.")
      return state, step
    if unverified_failures:
      raise unverified_failures[0][1]
    raise CheckpointError(
        f"Every checkpoint in {self.directory} is damaged (steps {damaged}; set aside in "
        f"{self.directory.rstrip(os.sep)}_damaged/). Restore them from a backup, or delete the "
        "workdir's checkpoints to train from scratch.")

  def _data_state_from_other_process_count(self, step: int) -> Optional[str]:
    """The iterator state when the checkpoint was written by a different number of processes.

    Grain stores one ``process_<i>-of-<n>.json`` per process.  The pipelines in
    ``mdm_jax.data`` count *global* batches, so every process saved the same
    state and any of the files serves any process count.  Returns None when the
    file for this process exists (the normal path) or there is no data item.
    """
    data_dir = paths.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not paths.isdir(data_dir) or paths.exists(paths.join(data_dir, mine)):
      return None
    others = sorted(f for f in paths.listdir(data_dir)
                    if f.startswith("process_") and f.endswith(".json"))
    if not others:
      return None
    states = []
    for name in others:
      with paths.open(paths.join(data_dir, name)) as f:
        states.append(f.read())
    if any(st.strip() != states[0].strip() for st in states):
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} was written by {len(others)} processes "
          "with different data-iterator states, so it cannot be resumed with "
          f"{jax.process_count()} process(es). Resume with the original number of processes.")
    logging.info("Data iterator state from %s (written by another process count).", others[0])
    return states[0]


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
