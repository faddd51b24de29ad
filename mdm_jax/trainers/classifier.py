"""Training the feature classifier of the image metrics on the common train loop.

``train_classifier`` runs ``tasks.classifier.ClassifierTask`` with ``trainers.loop.train``
in a workdir (the classifier's directory, or a temporary one): checkpoints under
``<path>/checkpoints`` (a re-run resumes, SIGTERM saves the step), metrics in
``metrics.jsonl``, and at the end the classifier as before, ``<path>/params.msgpack`` and
``meta.json`` (what ``metrics.classifier.Classifier.load`` reads).  Batches: ``batch_size``
random training images with replacement, each flipped left-right with probability 1/2,
drawn from one ``numpy`` generator seeded by ``seed`` whose state is checkpointed.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from typing import Optional

import jax
import numpy as np
import optax

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import distributed, paths
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.metrics.classifier import Classifier, SmallCNN
from mdm_jax.tasks.classifier import ClassifierTask
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers import loop
from mdm_jax.trainers.setup import CHECKPOINT_DIR, LoopSettings, Run
from mdm_jax.trainers.state import state_shardings


class ImageBatches:
  """An endless, checkpointable stream of this process's rows of each global batch."""

  def __init__(self, images, labels, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.images, self.labels, self.batch_size = images, labels, int(batch_size)
    self.rows = slice(process_index * self.batch_size // process_count,
                      (process_index + 1) * self.batch_size // process_count)
    self.rng = np.random.default_rng(seed)

  def __iter__(self):
    return self

  def __next__(self):
    idx = self.rng.integers(0, len(self.images), self.batch_size)
    x = self.images[idx]
    flip = self.rng.random(self.batch_size) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return {"images": x[self.rows], "labels": self.labels[idx][self.rows]}

  # the data-iterator protocol of the checkpoints (grain's for non-grain iterators)
  def get_state(self) -> bytes:
    return json.dumps(self.rng.bit_generator.state).encode()

  def set_state(self, state: bytes) -> None:
    self.rng.bit_generator.state = json.loads(state)

  def start_prefetch(self) -> None:
    pass


class _ImageData:
  """The labelled images as the loop's ``data`` (a training stream only)."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def train_dataset(self, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1):
    return ImageBatches(self.images, self.labels, batch_size, seed, process_index, process_count)


def train_classifier(images, labels, num_classes: int, *, steps: int = 1000,
                     batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0,
                     width: int = 32, feature_dim: int = 128, path: Optional[str] = None,
                     eval_images=None, eval_labels=None, log_every: int = 0,
                     checkpoint_every: int = 500, config=None) -> Classifier:
  """Trains the feature CNN with Adam (cosine decay to 5%) on (uint8 [N, H, W, C], int
  labels) on the train loop; saves it to ``path`` when given.

  ``meta`` records the test accuracy when ``eval_images`` / ``eval_labels`` are given.
  ``config`` supplies the mesh and checkpoint settings (default: ``configs/base.py``).
  """
  images = np.asarray(images, np.uint8)
  labels = np.asarray(labels, np.int32)
  if labels.max() >= num_classes:
    raise ValueError(f"labels go up to {labels.max()} but num_classes={num_classes}.")
  steps, bs = int(steps), min(int(batch_size), len(images))
  config = get_base_config() if config is None else config
  workdir = paths.resolve(path) if path else tempfile.mkdtemp(prefix="mdm_classifier_")
  module = SmallCNN(int(num_classes), int(width), int(feature_dim))
  sched = optax.cosine_decay_schedule(learning_rate, max(steps, 1), 0.05)
  settings = LoopSettings(
      num_steps=steps, batch_size=bs, seed=int(seed), log_every=int(log_every) or steps,
      checkpoint_every=int(checkpoint_every), evaluate=False, final_samples=False,
      metric_prefix="classifier", progress_label="classifier",
      progress_metrics=(("classifier_loss", "loss"),), report_train_metrics=True,
      finite_metrics=None, config_section="classifier")
  task = ClassifierTask(module, images.shape[1:])
  tx = optax.adam(sched)
  t0 = time.time()
  result = loop.train(workdir, functools.partial(_build, config, workdir, task, images, labels,
                                                 tx, sched, settings))
  meta = {"num_classes": int(num_classes), "width": int(width), "feature_dim": int(feature_dim),
          "image_shape": list(images.shape[1:]), "steps": steps,
          "train_loss": float(result.get("final_classifier_loss", float("nan"))),
          "train_seconds": time.time() - t0, "num_train": int(len(images))}
  clf = Classifier(_final_params(config, workdir, task, tx), meta)
  if eval_images is not None and eval_labels is not None:
    clf.meta["test_accuracy"] = clf.accuracy(eval_images, eval_labels)
  if path:
    clf.save(path)
  return clf


def _mesh(config, batch_size: int):
  """The config's mesh over every device, or one device when the batch does not divide."""
  if jax.process_count() == 1 and batch_size % jax.device_count():
    return shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  return shd.make_mesh(config.mesh)


def _build(config, workdir, task, images, labels, tx, sched, settings) -> Run:
  mesh = _mesh(config, settings.batch_size)
  if settings.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ConfigError(f"The classifier's batch size {settings.batch_size} must divide over the "
                      f"{mesh.shape['data'] * mesh.shape['fsdp']} devices of the mesh.")
  return Run(config=config, workdir=workdir, data=_ImageData(images, labels), task=task,
             mesh=mesh, rules=shd.logical_rules(config.mesh), tx=tx, lr_schedule=sched,
             settings=settings)


def _final_params(config, workdir: str, task, tx):
  """The parameters of the run's last checkpoint, on the host."""
  mesh = _mesh(config, 1)
  abstract, shardings = state_shardings(task, tx, mesh, shd.logical_rules(config.mesh))
  ckpt = ckpt_lib.Checkpointer(paths.join(workdir, CHECKPOINT_DIR), read_only=True,
                               async_save=False)
  try:
    state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, distributed.host_arrays(state.params))
