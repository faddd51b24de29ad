"""Run set-up: config -> data, task, mesh, optimizer; and restoring a run for inference.

Everything task- or data-specific is behind ``mdm_jax.tasks`` and ``mdm_jax.data``:
this module turns a config into those objects, places them on the mesh, and checks
what must agree across processes and between a checkpoint and the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np
from absl import logging

from mdm_jax.core import paths
from mdm_jax.core import sharding as shd
from mdm_jax.core.config import to_dict
from mdm_jax.core.errors import ConfigError
from mdm_jax.data import build_data
from mdm_jax.tasks import build_task, validate_config
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers.state import make_optimizer, state_shardings

BEST_DIR = "checkpoints_best"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How the train loop runs a task: its length, its cadences and what it reports.

  ``from_config`` reads ``training``, ``eval``, ``checkpoint`` and ``sampling``; a task
  variant (Di[M]O: ``config.distill``) builds its own.  0 turns a cadence off.
  """
  num_steps: int
  batch_size: int                    # rows per step (for tokens/s)
  seed: int                          # the train state's initial key
  log_every: int
  checkpoint_every: int
  eval_every: int = 0
  evaluate: bool = True              # a final evaluation (Task.eval_sums) at the end
  sample_every: int = 0
  final_samples: bool = True         # samples of the final state
  keep_best: int = 0
  data_stream: bool = True           # batches from data.train_dataset (else empty ones)
  ema_decay: float = 0.0             # phased tasks (Task.trains_by_phases)
  ema_warmup: bool = False
  eval_use_ema: bool = True
  sample_use_ema: bool = True
  metric_prefix: str = "train"       # metrics.jsonl names: <prefix>/<metric>
  progress_label: str = ""           # the progress line: "<label> step/total | ..."
  progress_metrics: Tuple[Tuple[str, str], ...] = (("loss", "loss"),)   # (metric, shown as)
  report_train_metrics: bool = False   # final_<metric> for every train metric in the result
  report_samples: bool = False         # the final samples' stats in the result
  result_extra: Tuple[Tuple[str, Any], ...] = ()
  finite_metrics: Optional[Tuple[str, ...]] = ("loss",)   # checked when logged (None: all)
  config_section: str = "training"   # named in the hints (<section>.learning_rate, ...)

  @classmethod
  def from_config(cls, config) -> "LoopSettings":
    tc = config.training
    return cls(num_steps=int(tc.num_steps), batch_size=int(tc.batch_size),
               seed=int(config.seed), log_every=int(tc.log_every),
               checkpoint_every=int(config.checkpoint.every_steps or 0),
               eval_every=int(config.eval.every_steps or 0),
               sample_every=int(config.sampling.every_steps or 0),
               keep_best=int(config.checkpoint.keep_best), ema_decay=float(tc.ema_decay),
               ema_warmup=bool(tc.get("ema_warmup", True)),
               eval_use_ema=bool(config.eval.use_ema),
               sample_use_ema=bool(config.eval.use_ema) and bool(config.sampling.use_ema))


@dataclasses.dataclass
class Run:
  """What a run is made of, before any state exists."""
  config: Any
  workdir: str
  data: Any
  task: Any
  mesh: Any
  rules: Any
  tx: Any
  lr_schedule: Callable
  settings: Optional[LoopSettings] = None
  # (checkpointer, abstract state, data iterator, config dict, keys, log) -> state: how a
  # checkpoint is read back (None: Checkpointer.restore_intact); a task variant whose
  # on-disk format changed reads its older one here.
  restore: Optional[Callable] = None

  def __post_init__(self):
    if self.settings is None:
      self.settings = LoopSettings.from_config(self.config)


def validate_batch(config, mesh) -> None:
  """The (micro)batch must split evenly over the batch-sharded mesh axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = int(config.training.batch_size) // int(config.training.num_microbatches)
  if micro % shards:
    raise ConfigError(
        f"Each microbatch has {micro} sequences (training.batch_size / num_microbatches), which "
        f"does not divide over the {shards} devices of the mesh's data x fsdp axes. Choose a "
        "batch size that is a multiple of it.")
  if int(config.eval.batch_size) % shards:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be a multiple of the "
                      f"{shards} devices on the data x fsdp axes.")
  try:
    _, slices = shd.process_batch_slice(mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if int(config.training.batch_size) % slices:
    raise ConfigError(f"training.batch_size must divide over the {slices} processes that load "
                      "distinct rows.")


def check_same_tokenizer_everywhere(tokenizer) -> None:
  """In a multi-process job, fails unless every process holds the same tokenizer.

  Each process builds its tokenizer (and, with ``data.token_order``, its vocabulary
  numbering) from the corpus itself; if two hosts disagreed, they would train one
  model on two numberings without any other symptom.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  digest = np.frombuffer(hashlib.sha256(tokenizer.fingerprint().encode()).digest(),
                         np.uint8).astype(np.int32)
  multihost_utils.assert_equal(
      digest, "The processes built different tokenizers or vocabulary orders from the same "
      "corpus (compare workdir/tokenizer/ on each host); set --config.data.token_order=id or "
      "give every host the same corpus and software.")


def build_run(config, workdir: str, *, check_batch: bool = True) -> Run:
  """Validates ``config`` and builds the data, task, mesh and optimizer of a run."""
  validate_config(config)
  data = build_data(config.data, workdir)
  check_same_tokenizer_everywhere(data.tokenizer)
  task = build_task(config, data.tokenizer.vocab_size)
  mesh = shd.make_mesh(config.mesh)
  rules = shd.logical_rules(config.mesh)
  if check_batch:
    validate_batch(config, mesh)
  tx, lr_schedule = make_optimizer(config.training)
  return Run(config=config, workdir=workdir, data=data, task=task, mesh=mesh, rules=rules,
             tx=tx, lr_schedule=lr_schedule)


def restore_for_inference(config, workdir: str):
  """(task, state, mesh, rules, data, shardings) from a checkpoint in workdir.

  ``config.checkpoint.restore`` picks the latest step or the best one by eval
  bound (kept under ``checkpoints_best/`` when ``checkpoint.keep_best > 0``).
  """
  validate_config(config)
  which = config.checkpoint.restore
  sub = BEST_DIR if which == "best" else CHECKPOINT_DIR
  ckpt = ckpt_lib.Checkpointer(paths.join(workdir, sub), read_only=True, async_save=False,
                               best_metric="eval_nll" if which == "best" else None)
  step = ckpt.best_step() if which == "best" else ckpt.latest_step()
  if step is None:
    hint = (" Best-by-eval checkpoints are written when checkpoint.keep_best > 0 and an eval "
            "runs; use --config.checkpoint.restore=latest." if which == "best" else "")
    raise ckpt_lib.CheckpointError(
        f"No checkpoint found under {paths.join(workdir, sub)}. Train first with "
        f"--mode=train --workdir={workdir}.{hint}")
  run = build_run(config, workdir, check_batch=False)
  abstract, shardings = state_shardings(run.task, run.tx, run.mesh, run.rules)
  abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
  if which == "best":
    ckpt.check_compatible(to_dict(config), step)
    state = ckpt.restore(abstract, step=step)
  else:   # the newest intact step (a damaged one is skipped, and left for training to set aside)
    state, step = ckpt.restore_intact(abstract, current_config=to_dict(config), set_aside=False)
  ckpt.close()
  logging.info("Restored %s checkpoint step %d from %s.", which, step, ckpt.directory)
  return run.task, state, run.mesh, run.rules, run.data, shardings
