"""Inception-v3 pool features for standard FID, with weights read from disk.

The network is the FID variant of Inception-v3 (the one behind published FID
numbers, as in pytorch-fid and jax-fid): BasicConv = conv (no bias) + batch norm
(eps 1e-3, running statistics) + ReLU; the 3x3 average pools of the Inception
blocks exclude padding from the count; the last block (Mixed_7c) pools its
branch with a 3x3 *max* pool; features are the 2048-d global mean of Mixed_7c.
Images are resized to 299x299 (bilinear, half-pixel centres, no antialiasing)
and mapped from [0, 255] to [-1, 1]; grey images are repeated to three channels.

Nothing is downloaded: ``load_weights(path)`` reads one of

* ``*.npz``: the PyTorch state dict of pytorch-fid's FID Inception, flat
  dotted names and OIHW kernels (``Mixed_5b.branch1x1.conv.weight``,
  ``....bn.running_mean``, ...).  With torch installed, one line converts the
  ``pt_inception-2015-12-05-*.pth`` file::

    python -c "import torch, numpy as np; sd = torch.load('pt_inception.pth'); \\
               np.savez('inception_fid.npz', **{k: v.numpy() for k, v in sd.items()})"

* ``*.pickle`` / ``*.pkl``: jax-fid's nested dict (``{'Mixed_5b': {'branch1x1':
  {'conv': {'kernel'}, 'bn': {'scale', 'bias', 'mean', 'var'}}}}``, HWIO kernels).

Every expected tensor is checked by name and shape, with an error that lists
what is missing or mismatched.  The module names below are the files' names, so
the Flax variable tree is the file's tree.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.metrics.frechet import frechet_distance_of_features

FEATURE_DIM = 2048
IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75     # smaller inputs leave no spatial extent before Mixed_7a


class BasicConv(nn.Module):
  features: int
  kernel: Tuple[int, int] = (1, 1)
  strides: Tuple[int, int] = (1, 1)
  padding: Any = "VALID"

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _pad(h: int, w: int):
  return ((h, h), (w, w))


def _avg3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class BlockA(nn.Module):      # Mixed_5b/5c/5d
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):      # Mixed_6a (grid reduction)

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class BlockC(nn.Module):      # Mixed_6b..6e (factorised 7x7)
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):      # Mixed_7a (grid reduction)

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class BlockE(nn.Module):      # Mixed_7b (average pool) and Mixed_7c (max pool, as FID's port)
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=_pad(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=_pad(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = (nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1, 1)) if self.max_pool
              else _avg3(x))
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """[B, H, W, 3] images in [-1, 1] (H, W >= 75; 299 for standard FID) -> [B, 2048]."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = BlockA(32, name="Mixed_5b")(x)
    x = BlockA(64, name="Mixed_5c")(x)
    x = BlockA(64, name="Mixed_5d")(x)
    x = BlockB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = BlockC(c7, name=name)(x)
    x = BlockD(name="Mixed_7a")(x)
    x = BlockE(max_pool=False, name="Mixed_7b")(x)
    x = BlockE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ------------------------------------------------------------------ weights
@functools.lru_cache(maxsize=None)
def variable_shapes(image_size: int = MIN_IMAGE_SIZE) -> Dict[str, Any]:
  """The Flax variable tree's shapes ({'params', 'batch_stats'}), without computing anything.

  Cached (tracing the network takes seconds): treat the returned tree as read-only.
  """
  model = FIDInceptionV3()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _from_torch_state(sd: Dict[str, np.ndarray]) -> Dict[Tuple[str, ...], np.ndarray]:
  """pytorch-fid names/layouts -> {(module..., 'conv'|'bn', leaf): array} in Flax layout."""
  leaf = {"conv.weight": ("conv", "kernel"), "bn.weight": ("bn", "scale"),
          "bn.bias": ("bn", "bias"), "bn.running_mean": ("bn", "mean"),
          "bn.running_var": ("bn", "var")}
  out = {}
  for name, arr in sd.items():
    parts = name.split(".")
    tail = ".".join(parts[-2:])
    if tail not in leaf or parts[0] in ("fc", "AuxLogits"):
      continue          # classifier head, aux head, num_batches_tracked: not features
    a = np.asarray(arr, np.float32)
    if tail == "conv.weight":
      if a.ndim != 4:
        raise ValueError(f"Inception weights: {name} should be a 4-d OIHW kernel, got {a.shape}.")
      a = a.transpose(2, 3, 1, 0)       # OIHW -> HWIO
    out[tuple(parts[:-2]) + leaf[tail]] = a
  return out


def _from_jaxfid_tree(tree: Dict[str, Any]) -> Dict[Tuple[str, ...], np.ndarray]:
  out = {}
  for path, arr in _flat(tree):
    if path[0] in ("fc", "AuxLogits") or path[-1] not in ("kernel", "scale", "bias", "mean",
                                                          "var"):
      continue
    if path[-2] == "conv" and path[-1] == "bias":
      continue          # jax-fid's conv bias placeholder: the FID convs have none
    out[path] = np.asarray(arr, np.float32)
  return out


def load_weights(path: str) -> Dict[str, Any]:
  """Read Inception-v3 FID weights (see the module docstring) into Flax variables."""
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception weights not found at {path!r}. Give the path of pytorch-fid's FID "
        "Inception state dict saved as .npz, or of jax-fid's inception_v3_weights_fid.pickle "
        "(nothing is downloaded).")
  try:
    if path.endswith(".npz"):
      with np.load(path) as z:
        found = _from_torch_state({k: z[k] for k in z.files})
    elif path.endswith((".pickle", ".pkl")):
      with open(path, "rb") as f:
        found = _from_jaxfid_tree(pickle.load(f))
    else:
      raise ValueError(f"Unknown Inception weights format {os.path.basename(path)!r}: use a "
                       ".npz of the PyTorch state dict or jax-fid's .pickle.")
  except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError) as e:
    raise ValueError(f"Could not read Inception weights {path!r}: {type(e).__name__}: {e}. "
                     "Is the file complete?") from e
  want = variable_shapes()
  variables: Dict[str, Any] = {"params": {}, "batch_stats": {}}
  missing, bad = [], []
  for collection in ("params", "batch_stats"):
    for p, shape in _flat(want[collection]):
      if p not in found:
        missing.append("/".join(p))
        continue
      if found[p].shape != shape:
        bad.append(f"{'/'.join(p)}: file {found[p].shape}, expected {shape}")
        continue
      node = variables[collection]
      for k in p[:-1]:
        node = node.setdefault(k, {})
      node[p[-1]] = jnp.asarray(found[p])
  if missing or bad:
    lines = ([f"missing {len(missing)} tensors, e.g. {missing[:4]}"] if missing else []) + bad[:6]
    raise ValueError(f"{path!r} is not the FID Inception-v3 (2048-d pool features): "
                     + "; ".join(lines))
  return variables


# ------------------------------------------------------------------ features and FID
def preprocess(images, image_size: int = IMAGE_SIZE) -> jnp.ndarray:
  """uint8-valued [N, H, W] or [N, H, W, C in {1, 3}] -> float32 [N, S, S, 3] in [-1, 1]."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"Inception features need [N, H, W] or [N, H, W, 1|3] images in [0, 255], "
                     f"got shape {tuple(x.shape)}.")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "bilinear", antialias=False)
  return x / 127.5 - 1.0


@functools.partial(jax.jit, static_argnames=("image_size",))
def _features(variables, images, image_size: int):
  return FIDInceptionV3().apply(variables, preprocess(images, image_size))


def make_feature_fn(variables, image_size: int = IMAGE_SIZE) -> Callable[[Any], jnp.ndarray]:
  """uint8 images -> [N, 2048] float32 features (one jit cache shared by every call)."""
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"Inception input size must be >= {MIN_IMAGE_SIZE}, got {image_size}.")
  return functools.partial(_features, variables, image_size=int(image_size))


def inception_features(images, variables, *, batch_size: int = 50,
                       image_size: int = IMAGE_SIZE,
                       progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
  """[N, 2048] float64 pool features of uint8 images, computed in fixed-size batches."""
  images = np.asarray(images)
  n = len(images)
  if n == 0:
    raise ValueError("inception_features got no images.")
  fn = make_feature_fn(variables, image_size)
  batch_size = min(int(batch_size), n)     # small sets are not padded up to batch_size
  out = []
  for i in range(0, n, batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)          # one compiled shape: pad the last batch
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk), np.float64)[:batch_size - pad])
    if progress is not None:
      progress(min(i + batch_size, n), n)
  return np.concatenate(out)


def standard_fid(images_a, images_b, weights_path: str, *, batch_size: int = 50,
                 image_size: int = IMAGE_SIZE) -> float:
  """FID of two uint8 image sets on Inception-v3 pool features (weights from disk)."""
  variables = load_weights(weights_path)
  fa = inception_features(images_a, variables, batch_size=batch_size, image_size=image_size)
  fb = inception_features(images_b, variables, batch_size=batch_size, image_size=image_size)
  return frechet_distance_of_features(fa, fb)


def random_weights(seed: int = 0) -> Dict[str, Any]:
  """Random FID-Inception variables in jax-fid's nested layout (for tests and smoke runs).

  Kernels are He-scaled so activations stay O(1) through the 94 conv layers;
  batch-norm statistics are random but positive-variance.
  """
  rng = np.random.default_rng(seed)
  shapes = variable_shapes()
  tree: Dict[str, Any] = {}
  for collection in ("params", "batch_stats"):
    for p, shape in _flat(shapes[collection]):
      leaf = p[-1]
      if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        a = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
      elif leaf == "scale":
        a = rng.uniform(0.5, 1.5, shape)
      elif leaf == "var":
        a = rng.uniform(0.5, 2.0, shape)
      else:                      # bias, mean
        a = rng.normal(0, 0.1, shape)
      node = tree
      for k in p[:-1]:
        node = node.setdefault(k, {})
      node[leaf] = a.astype(np.float32)
  return tree


def to_torch_state(tree: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """jax-fid layout -> pytorch-fid state-dict names and OIHW kernels (the .npz format)."""
  names = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
           ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
           ("bn", "var"): "bn.running_var"}
  out = {}
  for p, a in _flat(tree):
    key = ".".join(p[:-2]) + "." + names[p[-2:]]
    out[key] = a.transpose(3, 2, 0, 1) if p[-1] == "kernel" else a
  return out

