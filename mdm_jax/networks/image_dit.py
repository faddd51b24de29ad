"""A DiT over image patches of pixel tokens, with Prime's sub-token input layer.

The diffusion code sees an image as a raster-order row of ``L = H*W*C``
pixel-channel tokens (``mdm_jax.data.images``), each written as ``ell``
digits, so the input is ``[B, L, ell]`` exactly as for text and the output is
``[B, L, V]`` logits.  Inside:

1. every digit is looked up in ONE table of ``b + 1`` rows (``b`` = the mask
   id) of width ``pixel_dim // ell`` shared by the slots, and a token's
   ``ell`` vectors are concatenated (zero-padded to ``pixel_dim``): the
   partially-masked embedding of docs/method/prime.md §4.1, per pixel channel as in the
   paper's image model (§4.4);
2. the ``p x p x C`` pixel-channel vectors of a patch are concatenated and
   projected to ``d_model``, plus a learned 2-D position embedding (row +
   column) -- the blocks also apply rotary on the patch's raster index;
3. the ``DiTBlock`` stack of ``mdm_jax.networks.dit`` (``dit_trunk``) (adaLN-Zero, the same
   conditioning MLP), scanned over layers;
4. a zero-initialised head giving ``V`` logits for each of the ``p*p*C``
   pixel channels of a patch, unpatchified back to raster order.

Attention runs over ``(H/p) * (W/p)`` patches, not ``H*W*C`` tokens.  All
parameters carry logical axis names, as in ``dit.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from mdm_jax.networks.base import MODELS
from mdm_jax.networks.dit import DiTConfig, _kernel, dit_config, dit_trunk, project
from mdm_jax.networks.embed_noise import perturb_embeddings


@dataclasses.dataclass(frozen=True)
class ImageDiTConfig:
  dit: DiTConfig                     # backbone settings (vocab_size, ell, base, widths ...)
  image_shape: Tuple[int, int, int] = (28, 28, 1)   # H, W, C
  patch_size: int = 2
  pixel_dim: int = 32                # embedding width of one pixel channel

  def __post_init__(self):
    h, w, _ = self.image_shape
    p = self.patch_size
    if p < 1 or h % p or w % p:
      raise ValueError(f"model.patch_size={p} must divide the image height and width "
                       f"{h}x{w}.")
    if self.pixel_dim < self.dit.ell:
      raise ValueError(f"model.pixel_dim={self.pixel_dim} must be >= prime.ell={self.dit.ell}.")
    if self.dit.causal:
      raise ValueError("image_dit is a bidirectional diffusion backbone; objective='ar' is not "
                       "supported with it.")

  @property
  def seq_len(self) -> int:
    h, w, c = self.image_shape
    return h * w * c

  @property
  def num_patches(self) -> int:
    h, w, _ = self.image_shape
    return (h // self.patch_size) * (w // self.patch_size)


def patchify(x, image_shape, p: int):
  """[B, H*W*C, E] (raster, channel fastest) -> [B, (H/p)*(W/p), p*p*C*E]."""
  h, w, c = image_shape
  b, e = x.shape[0], x.shape[-1]
  x = x.reshape(b, h // p, p, w // p, p, c, e)
  x = x.transpose(0, 1, 3, 2, 4, 5, 6)
  return x.reshape(b, (h // p) * (w // p), p * p * c * e)


def unpatchify(x, image_shape, p: int):
  """[B, (H/p)*(W/p), p*p*C, E] -> [B, H*W*C, E] (inverse of ``patchify``)."""
  h, w, c = image_shape
  b, e = x.shape[0], x.shape[-1]
  x = x.reshape(b, h // p, w // p, p, p, c, e)
  x = x.transpose(0, 1, 3, 2, 4, 5, 6)
  return x.reshape(b, h * w * c, e)


class ImageDiT(nn.Module):
  cfg: ImageDiTConfig

  @nn.compact
  def __call__(self, digits, t, train: bool = False, embed_noise=None):
    """digits [B, L, ell] -> float32 logits [B, L, V] (whatever the compute dtype).

    ``embed_noise``: optional ``(sigma, eps)`` with ``eps`` [B, L, pixel_dim]: every
    pixel-channel embedding e becomes sigma * eps + sqrt(1 - sigma^2) * e before
    patching (Di[M]O's token initialisation, docs/method/algorithms.md §5).
    """
    icfg, cfg = self.cfg, self.cfg.dit
    if digits.ndim != 3 or digits.shape[1] != icfg.seq_len or digits.shape[-1] != cfg.ell:
      raise ValueError(f"ImageDiT expects digits [B, {icfg.seq_len}, {cfg.ell}] for images "
                       f"{icfg.image_shape}, got {digits.shape}.")
    b = digits.shape[0]
    p = icfg.patch_size
    sub = icfg.pixel_dim // cfg.ell
    table = self.param("digit_table", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", None)), (cfg.base + 1, sub), cfg.param_dtype)
    e = jnp.take(table, digits, axis=0).reshape(b, icfg.seq_len, cfg.ell * sub)
    if icfg.pixel_dim - cfg.ell * sub:
      e = jnp.pad(e, ((0, 0), (0, 0), (0, icfg.pixel_dim - cfg.ell * sub)))
    if embed_noise is not None:
      e = perturb_embeddings(e, *embed_noise)
    x = patchify(e.astype(cfg.dtype), icfg.image_shape, p)
    w_in = _kernel(self, "patch_in", (x.shape[-1], cfg.d_model), (None, "embed"),
                   param_dtype=cfg.param_dtype)
    x = project(x, w_in.astype(cfg.dtype))
    hp, wp = icfg.image_shape[0] // p, icfg.image_shape[1] // p
    row = self.param("pos_row", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             (None, "embed")),
                     (hp, cfg.d_model), cfg.param_dtype)
    col = self.param("pos_col", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             (None, "embed")),
                     (wp, cfg.d_model), cfg.param_dtype)
    pos = (row[:, None, :] + col[None, :, :]).reshape(hp * wp, cfg.d_model)
    x = (x + pos[None].astype(cfg.dtype)).astype(cfg.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    x = dit_trunk(cfg, x, t, train)
    ppc = p * p * icfg.image_shape[2]
    w = _kernel(self, "head", (cfg.d_model, ppc, cfg.vocab_size), ("embed", None, "vocab"),
                zero=True, param_dtype=cfg.param_dtype)
    bias = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                (None, "vocab")),
                      (ppc, cfg.vocab_size), cfg.param_dtype)
    logits = project(x, w.astype(cfg.dtype), out_dtype=jnp.float32) + bias.astype(jnp.float32)
    logits = unpatchify(logits, icfg.image_shape, p)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


@MODELS.register("image_dit")
def build_image_dit(model_config, vocab_size: int, ell: int, base: int, causal: bool) -> ImageDiT:
  """DiT over p x p patches of pixel tokens (model.image_shape, patch_size, pixel_dim)."""
  return ImageDiT(ImageDiTConfig(
      dit=dit_config(model_config, vocab_size, ell, base, causal),
      image_shape=tuple(int(s) for s in model_config.image_shape),
      patch_size=int(model_config.patch_size), pixel_dim=int(model_config.pixel_dim)))
