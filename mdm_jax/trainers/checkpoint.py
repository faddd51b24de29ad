"""Orbax checkpoints: train state + data-iterator state + config, atomically.

One ``CheckpointManager`` per workdir saves a Composite of
``state`` (parameters, optimizer state, EMA parameters, step, PRNG key),
``data`` (the grain iterator's position, so a resumed run sees exactly the
batches an uninterrupted one would) and ``config`` (JSON).  Orbax writes each
step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a checkpoint that looks finished; restores go through
abstract arrays that carry the *current* shardings, so a run saved on one mesh
restores onto another.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from mdm_jax.configs.base import get_base_config
from mdm_jax.core.config import flatten, to_dict
from mdm_jax.data import COMPAT_KEYS as DATA_COMPAT_KEYS
from mdm_jax.networks import RUNTIME_KEYS
from mdm_jax.tasks import TASKS

class CheckpointError(RuntimeError):
  """A checkpoint is missing, partial or incompatible; the message says what to do."""


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
               best_metric: Optional[str] = None, barrier_prefix: Optional[str] = None):
    """``best_metric``: keep the ``max_to_keep`` steps with the lowest value of this
    metric (passed to ``save``) instead of the most recent ones.

    ``barrier_prefix`` names this manager's cross-process barriers (default: the
    directory's base name).  Orbax keys its barriers by the step directory's name
    ("4.orbax-checkpoint-tmp"), so two managers saving the same step at once in a
    multi-process job (``checkpoints/`` and ``checkpoints_best/`` after an eval) would
    otherwise meet at each other's barriers and hang or fail.  It must be the same in
    every process and differ between managers that save concurrently."""
    self.directory = os.path.abspath(directory)
    if barrier_prefix is None:
      barrier_prefix = os.path.basename(self.directory.rstrip(os.sep)) or "ckpt"
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
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> Iterable[int]:
    return self._mngr.all_steps()

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest ``best_metric`` (needs ``best_metric``)."""
    if not self.best_metric:
      raise ValueError("best_step() needs a Checkpointer created with best_metric=...")
    return self._mngr.best_step()

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, data_iter: Any = None,
           config_dict: Optional[Dict[str, Any]] = None, force: bool = False,
           metrics: Optional[Dict[str, float]] = None) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config_dict is not None:
      items["config"] = ocp.args.JsonSave(config_dict)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force,
                           metrics=metrics)

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  # ------------------------------------------------------------------ restore
  def read_config(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
    step = self.latest_step() if step is None else step
    path = os.path.join(self.directory, str(step), "config")
    for name in ("metadata", "config.json"):
      p = os.path.join(path, name)
      if os.path.exists(p):
        with open(p) as f:
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
    if data_iter is not None:
      foreign_data_state = self._data_state_from_other_process_count(step)
      if foreign_data_state is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except FileNotFoundError as e:
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} is incomplete or corrupt ({e}). "
          f"Delete {os.path.join(self.directory, str(step))} to fall back to an earlier step."
      ) from e
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} does not match the current model/optimizer "
          f"structure ({type(e).__name__}: {str(e)[:500]}). Use the configuration it was trained "
          "with, or a new --workdir.") from e
    if foreign_data_state is not None:
      if isinstance(data_iter, grain.DatasetIterator):
        data_iter.set_state(json.loads(foreign_data_state))
      else:
        data_iter.set_state(foreign_data_state.encode())
      if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()
    return out["state"]

  def _data_state_from_other_process_count(self, step: int) -> Optional[str]:
    """The iterator state when the checkpoint was written by a different number of processes.

    Grain stores one ``process_<i>-of-<n>.json`` per process.  The pipelines in
    ``mdm_jax.data`` count *global* batches, so every process saved the same
    state and any of the files serves any process count.  Returns None when the
    file for this process exists (the normal path) or there is no data item.
    """
    data_dir = os.path.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(data_dir) or os.path.exists(os.path.join(data_dir, mine)):
      return None
    others = sorted(f for f in os.listdir(data_dir)
                    if f.startswith("process_") and f.endswith(".json"))
    if not others:
      return None
    states = []
    for name in others:
      with open(os.path.join(data_dir, name)) as f:
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
