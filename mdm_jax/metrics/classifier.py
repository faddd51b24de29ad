"""A Frechet distance on the project's own classifier, and bits/dim, for image models.

No Inception network can be downloaded here, so the feature network is a small CNN that
the project trains itself on the same dataset (``trainers.classifier.train_classifier``,
a task on the common train loop: ``tasks.classifier``).  The reported
number is the **classifier Frechet distance** ("FD-<dataset>-cnn"), computed exactly
like FID (``frechet.py``) but on different features: it is NOT comparable with published
FID numbers and is never called FID.  ``inception.standard_fid`` (Inception weights read
from a path on disk) is the published FID, for users who have the weights file.

Bits per dimension is the eval NELBO in nats per token divided by ln 2, one token
being one pixel channel (a "sub-pixel").  With ``data.num_levels`` < 256 it is in bits
per quantised dimension and not comparable with 8-bit numbers.

The command line that trains the classifier and evaluates checkpoints is
``python -m mdm_jax.cli.eval_images``.
"""


from __future__ import annotations

import json
import math
import os
from typing import Any, Dict

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.metrics.frechet import frechet_distance_of_features


# ------------------------------------------------------------------ classifier
class SmallCNN(nn.Module):
  """Three 3x3 conv layers (the last two strided), global mean pool, a feature layer, logits."""
  num_classes: int
  width: int = 32
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x, features: bool = False):
    w = self.width
    x = nn.relu(nn.Conv(w, (3, 3))(x))
    x = nn.relu(nn.Conv(2 * w, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(4 * w, (3, 3), strides=(2, 2))(x))
    x = jnp.mean(x, axis=(1, 2))
    f = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
    if features:
      return f
    return nn.Dense(self.num_classes, name="logits")(f)


def to_float(images) -> jnp.ndarray:
  return jnp.asarray(images, jnp.float32) / 255.0 - 0.5


class Classifier:
  """A trained ``SmallCNN``: ``features(images)`` and ``predict(images)`` on uint8 [N, H, W, C]."""

  def __init__(self, params, meta: Dict[str, Any]):
    self.params, self.meta = params, dict(meta)
    self.module = SmallCNN(int(meta["num_classes"]), int(meta.get("width", 32)),
                           int(meta.get("feature_dim", 128)))
    self._feat = jax.jit(lambda p, x: self.module.apply({"params": p}, to_float(x),
                                                        features=True))
    self._logits = jax.jit(lambda p, x: self.module.apply({"params": p}, to_float(x)))

  def _batched(self, fn, images, batch_size: int) -> np.ndarray:
    images = np.asarray(images, np.uint8)
    outs = []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      n = len(chunk)
      if n < batch_size:   # one compiled shape
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.uint8)])
      outs.append(np.asarray(fn(self.params, chunk))[:n])
    return np.concatenate(outs).astype(np.float64)

  def features(self, images, batch_size: int = 256) -> np.ndarray:
    """float64 [N, feature_dim] penultimate-layer features."""
    return self._batched(self._feat, images, batch_size)

  def predict(self, images, batch_size: int = 256) -> np.ndarray:
    return self._batched(self._logits, images, batch_size).argmax(-1)

  def accuracy(self, images, labels, batch_size: int = 256) -> float:
    return float(np.mean(self.predict(images, batch_size) == np.asarray(labels)))

  def save(self, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.msgpack"), "wb") as f:
      f.write(flax.serialization.to_bytes(self.params))
    with open(os.path.join(path, "meta.json"), "w") as f:
      json.dump(self.meta, f, indent=2)
    return path

  @classmethod
  def load(cls, path: str) -> "Classifier":
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(
          f"No classifier at {path!r} (meta.json missing). Train one with `python -m "
          "mdm_jax.cli.eval_images --mode=train_classifier --config=... --classifier_path=DIR`.")
    with open(meta_path) as f:
      meta = json.load(f)
    module = SmallCNN(int(meta["num_classes"]), int(meta.get("width", 32)),
                      int(meta.get("feature_dim", 128)))
    shape = tuple(meta["image_shape"])
    template = module.init(jax.random.key(0), jnp.zeros((1,) + shape, jnp.float32))["params"]
    with open(os.path.join(path, "params.msgpack"), "rb") as f:
      params = flax.serialization.from_bytes(template, f.read())
    return cls(params, meta)


def classifier_frechet_distance(classifier: Classifier, images_a, images_b) -> float:
  """Frechet distance between two image sets on ``classifier``'s penultimate features."""
  return frechet_distance_of_features(classifier.features(images_a),
                                      classifier.features(images_b))


def bits_per_dim(nll_nats_per_token: float) -> float:
  """Eval NELBO (nats per pixel channel) -> bits per dimension."""
  return float(nll_nats_per_token) / math.log(2.0)
