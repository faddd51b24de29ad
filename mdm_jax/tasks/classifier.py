"""The feature classifier of the image metrics as a task the common train loop runs.

``metrics.classifier.SmallCNN`` learns the dataset's class labels; its penultimate
features give the classifier Frechet distance.  One train step is one Adam update of
every parameter on the mean cross-entropy of a batch of ``images`` (uint8 [B, H, W, C])
and ``labels`` (int32 [B]) (``Task.trains_by_phases`` with one phase), so the run gets
the loop's checkpoints, resumption, preemption saves and finiteness checks.
``trainers.classifier.train_classifier`` builds and runs it.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax

from mdm_jax.metrics.classifier import SmallCNN, to_float
from mdm_jax.tasks.base import Phase, Task


class ClassifierTask(Task):
  """``SmallCNN`` trained on labelled images (see the module docstring)."""
  objective = "diffusion"      # the run's config keeps its own objective
  trains_by_phases = True

  def __init__(self, module: SmallCNN, image_shape: Sequence[int]):
    self.model = module
    self.image_shape = tuple(int(s) for s in image_shape)
    self.seq_len = int(np.prod(self.image_shape))    # pixel channels per image (for rates)

  def describe(self) -> str:
    return (f"feature classifier ({self.model.num_classes} classes, width {self.model.width}, "
            f"{self.model.feature_dim} features) on {self.image_shape} images")

  def init_params(self, key, batch_size: int = 1):
    del batch_size
    return self.model.init(key, jnp.zeros((1,) + self.image_shape, jnp.float32))["params"]

  def init_train_params(self, key, batch_size: int = 1, frozen=None):
    """The parameters from ``key`` itself (the train state's stream is unused)."""
    del frozen
    return self.init_params(key, batch_size), key

  def update_phases(self, key):
    return [Phase(None, "classifier", self._loss, key)]

  def _loss(self, params, all_params, batch, frozen, key):
    del all_params, frozen, key
    logits = self.model.apply({"params": params}, to_float(batch["images"]))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {}
