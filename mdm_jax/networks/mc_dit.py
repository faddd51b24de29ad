"""A patch DiT for Gaussian diffusion with the three training arms of ``docs/method/mc_dit.md``.

One module, ``MCDiT``, configured by ``arm``:

* ``dit``: encoder E (``n_encoder`` blocks) then the noisy decoder D_n
  (``n_decoder`` blocks): a plain DiT of ``n_encoder + n_decoder`` blocks.
* ``mdt``: the same inference path plus MDT-v1's masked pass
  (``mdt_masked``): E runs on the kept tokens only, masked positions are
  re-inserted as a learned ``mask_token``, D_n's ``decoder_pos_embed`` is added, a
  side-interpolater of ``side_depth`` blocks runs and its output is kept only at
  masked positions (the "masked shortcut"), then D_n.
* ``mcdit``: the same inference path plus the clean-reconstruction decoder D_c
  (``aux_decoder_depth`` blocks, its own ``decoder_pos_embed`` and head) fed from the
  *shared* E, and a learned ``e_clean`` (D,) added to the visible tokens of branch C
  (``clean``); optional learned ``c2c_mask_token`` for masked inputs.

Every path uses the text model's ``DiTBlock`` stack (``dit_blocks``: adaLN-Zero,
scanned layers, logical axis names ``embed/mlp/heads/kv/cond/layers``), the same
conditioning MLP (``cond_mlp``) plus a class table (row ``num_classes`` is the
null label of classifier-free guidance) and the same final adaLN norm.  Positions:
a fixed 2-D sin-cos embedding at the input and a learnable, sin-cos initialised
``decoder_pos_embed`` before each decoder (``docs/method/mc_dit.md`` §4); the blocks' rotary
embedding is off (``DiTConfig.rotary=False``) because MDT's masked pass gathers
tokens, which would shift raster indices.

Inference (``denoise``) runs E + D_n only; D_c, ``e_clean``, the mask tokens and
the side-interpolater are never touched there.  Inputs and outputs are patches
``[B, N, P]`` (``P = p*p*C``); ``patchify_images`` / ``unpatchify_images`` convert
raster pixel rows ``[B, H*W*C]`` (the layout of ``mdm_jax.data.images``) with
``image_dit``'s ``patchify`` / ``unpatchify``.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.networks.base import MODELS, dtype_from_name
from mdm_jax.networks.dit import (DiTConfig, _kernel, cond_mlp, dit_blocks, final_adaln,
                                project, timestep_embedding)
from mdm_jax.networks.image_dit import patchify, unpatchify

ARMS = ("dit", "mdt", "mcdit")


@dataclasses.dataclass(frozen=True)
class MCDiTConfig:
  dit: DiTConfig                    # width, heads, MLP ratio, dtypes, scan/remat (num_layers unused)
  image_shape: Tuple[int, int, int] = (28, 28, 1)
  patch_size: int = 4
  arm: str = "dit"                  # dit | mdt | mcdit
  n_encoder: int = 4                # E
  n_decoder: int = 2                # D_n (the sampling path is E + D_n)
  aux_decoder_depth: int = 2        # mcdit: D_c depth (0 turns branch C off)
  side_depth: int = 1               # mdt: side-interpolater blocks
  num_classes: int = 10             # 0 = unconditional (only the null label)
  c2c_mask_token: bool = False      # mcdit: masked inputs of branch C are a learned token
  shared_decoder: bool = False      # mcdit ablation: branch C decodes with D_n (one decoder)
  context_time: bool = False        # mcdit, context_t: visible tokens of branch C get an
                                    # added embedding of their own (small) noise level

  def __post_init__(self):
    h, w, _ = self.image_shape
    p = self.patch_size
    if p < 1 or h % p or w % p:
      raise ValueError(f"model.patch_size={p} must divide the image height and width {h}x{w}.")
    if self.arm not in ARMS:
      raise ValueError(f"model.arm={self.arm!r} is not one of {ARMS}.")
    if self.n_encoder < 0 or self.n_decoder < 0 or self.n_encoder + self.n_decoder < 1:
      raise ValueError("model.n_encoder + model.n_decoder must be >= 1 (both >= 0).")
    if self.arm == "mdt" and self.side_depth < 1:
      raise ValueError("model.side_depth must be >= 1 for arm='mdt' (the side-interpolater).")
    if self.dit.d_model % 4:
      raise ValueError(f"model.d_model={self.dit.d_model} must be divisible by 4 (2-D sin-cos "
                       "positions).")
    if self.dit.causal:
      raise ValueError("mc_dit is a bidirectional diffusion backbone.")
    if (self.shared_decoder or self.context_time) and self.arm != "mcdit":
      raise ValueError("model.shared_decoder and model.context_time are mcdit options "
                       f"(model.arm={self.arm!r}).")

  @property
  def grid(self) -> Tuple[int, int]:
    return self.image_shape[0] // self.patch_size, self.image_shape[1] // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.image_shape[2]

  @property
  def has_clean_branch(self) -> bool:
    return self.arm == "mcdit" and (self.aux_decoder_depth > 0 or self.shared_decoder)

  @property
  def null_label(self) -> int:
    return self.num_classes


def patchify_images(x, image_shape, p: int):
  """Raster pixel rows [B, H*W*C] -> patches [B, N, p*p*C]."""
  return patchify(x[..., None], image_shape, p)


def unpatchify_images(x, image_shape, p: int):
  """Patches [B, N, p*p*C] -> raster pixel rows [B, H*W*C]."""
  return unpatchify(x[..., None], image_shape, p)[..., 0]


def sincos_2d(hp: int, wp: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table [hp*wp, dim]: half the width for rows, half for columns."""
  def one(pos, d):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    ang = np.asarray(pos, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
  rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
  return np.concatenate([one(rows.reshape(-1), dim // 2), one(cols.reshape(-1), dim // 2)],
                        axis=1).astype(np.float32)


class _Embed(nn.Module):
  """Patches [B, N, P] -> tokens [B, N, D]: linear patch projection + fixed sin-cos positions."""
  cfg: MCDiTConfig

  @nn.compact
  def __call__(self, x):
    mc, cfg = self.cfg, self.cfg.dit
    w = _kernel(self, "patch_in", (mc.patch_dim, cfg.d_model), (None, "embed"),
                param_dtype=cfg.param_dtype)
    b = self.param("patch_in_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("embed",)), (cfg.d_model,), cfg.param_dtype)
    h = project(x.astype(cfg.dtype), w.astype(cfg.dtype)) + b.astype(cfg.dtype)
    pos = jnp.asarray(sincos_2d(*mc.grid, cfg.d_model), cfg.dtype)
    h = h + pos[None]
    return nn.with_logical_constraint(h, ("batch", "length", "embed"))


class _Cond(nn.Module):
  """c = silu(cond_mlp(level) + label_table[y]) (DiT's t + y conditioning)."""
  cfg: MCDiTConfig

  @nn.compact
  def __call__(self, level, y):
    mc, cfg = self.cfg, self.cfg.dit
    c = cond_mlp(cfg, level.astype(jnp.float32))
    table = self.param("label_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "cond")), (mc.num_classes + 1, cfg.cond_dim),
        cfg.param_dtype)
    c = c + jnp.take(table, y, axis=0).astype(c.dtype)
    return nn.silu(c)


class _Stack(nn.Module):
  cfg: DiTConfig
  depth: int

  @nn.compact
  def __call__(self, x, c, train: bool = False):
    return dit_blocks(self.cfg, x, c, train, self.depth)


class _Decoder(nn.Module):
  """DiTBlocks, the final adaLN norm and a zero-initialised linear head to P outputs per patch."""
  cfg: MCDiTConfig
  depth: int

  @nn.compact
  def __call__(self, x, c, train: bool = False):
    mc, cfg = self.cfg, self.cfg.dit
    x = dit_blocks(cfg, x, c, train, self.depth)
    x = final_adaln(cfg, x, c)
    w = _kernel(self, "head", (cfg.d_model, mc.patch_dim), ("embed", None), zero=True,
                param_dtype=cfg.param_dtype)
    b = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (None,)),
                   (mc.patch_dim,), cfg.param_dtype)
    # float32 accumulation and output, as the token models' heads.
    return project(x, w.astype(cfg.dtype), out_dtype=jnp.float32) + b.astype(jnp.float32)


class MCDiT(nn.Module):
  """See the module docstring.  Methods: ``denoise``, ``clean``, ``mdt_masked``, ``__call__``."""
  cfg: MCDiTConfig

  def setup(self):
    mc, cfg = self.cfg, self.cfg.dit
    n = mc.num_patches
    sincos_init = lambda *_: jnp.asarray(sincos_2d(*mc.grid, cfg.d_model))  # noqa: E731
    self.embed = _Embed(mc)
    self.cond = _Cond(mc)
    self.encoder = _Stack(cfg, mc.n_encoder)
    self.dn_pos = self.param("dn_decoder_pos_embed", nn.with_logical_partitioning(
        sincos_init, (None, "embed")), (n, cfg.d_model), cfg.param_dtype)
    self.dn = _Decoder(mc, mc.n_decoder)
    if mc.arm == "mdt":
      self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (cfg.d_model,), cfg.param_dtype)
      self.side = _Stack(cfg, mc.side_depth)
    if mc.has_clean_branch:
      self.e_clean = self.param("e_clean", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (cfg.d_model,), cfg.param_dtype)
      if not mc.shared_decoder:
        self.dc_pos = self.param("dc_decoder_pos_embed", nn.with_logical_partitioning(
            sincos_init, (None, "embed")), (n, cfg.d_model), cfg.param_dtype)
        self.dc = _Decoder(mc, mc.aux_decoder_depth)
      if mc.context_time:
        self.ctx_time = self.param("ctx_time", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None, "embed")), (cfg.d_model, cfg.d_model),
            cfg.param_dtype)
      if mc.c2c_mask_token:
        self.c2c_token = self.param("c2c_mask_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (cfg.d_model,), cfg.param_dtype)

  def _check(self, x):
    mc = self.cfg
    if x.ndim != 3 or x.shape[1:] != (mc.num_patches, mc.patch_dim):
      raise ValueError(f"MCDiT expects patches [B, {mc.num_patches}, {mc.patch_dim}], got "
                       f"{x.shape}.")

  def _labels(self, y, b):
    return jnp.full((b,), self.cfg.null_label, jnp.int32) if y is None else y.astype(jnp.int32)

  def _encode(self, h, level, y, train):
    c = self.cond(level, self._labels(y, h.shape[0]))
    return self.encoder(h, c, train), c

  def denoise(self, x, level, y=None, train: bool = False):
    """The sampling path E + D_n on noisy patches [B, N, P] -> [B, N, P] (ε̂, or F for EDM)."""
    self._check(x)
    h, c = self._encode(self.embed(x), level, y, train)
    h = h + self.dn_pos[None].astype(h.dtype)
    return self.dn(h, c, train)

  def clean(self, z, visible, level, y=None, train: bool = False, visible_level=None):
    """Branch C: mixed patches Z [B, N, P] (clean where ``visible``) -> X̂0 [B, N, P] via E + D_c.

    ``visible_level`` [B] (``context_time``): the visible patches' own noise level, told to
    their tokens by an added (zero-initialised) projection of its sinusoidal embedding.
    With ``shared_decoder`` D_c is D_n (its positions, blocks and head).
    """
    if not self.cfg.has_clean_branch:
      raise ValueError("clean(): this MCDiT has no clean branch (arm != 'mcdit' or "
                       "aux_decoder_depth == 0).")
    self._check(z)
    h = self.embed(z)
    vis = visible[..., None]
    if self.cfg.c2c_mask_token:
      pos = jnp.asarray(sincos_2d(*self.cfg.grid, self.cfg.dit.d_model), h.dtype)
      h = jnp.where(vis, h, (self.c2c_token.astype(h.dtype) + pos)[None])
    h = h + vis.astype(h.dtype) * self.e_clean.astype(h.dtype)
    if self.cfg.context_time:
      if visible_level is None:
        raise ValueError("clean(): model.context_time needs visible_level.")
      emb = timestep_embedding(visible_level.astype(jnp.float32), self.cfg.dit.d_model)
      h = h + vis.astype(h.dtype) * (emb @ self.ctx_time.astype(jnp.float32))[:, None].astype(
          h.dtype)
    h, c = self._encode(h, level, y, train)
    if self.cfg.shared_decoder:
      return self.dn(h + self.dn_pos[None].astype(h.dtype), c, train)
    h = h + self.dc_pos[None].astype(h.dtype)
    return self.dc(h, c, train)

  def mdt_masked(self, x, keep_idx, mask, level, y=None, train: bool = False):
    """MDT-v1's masked pass: E on the kept tokens ``keep_idx`` [B, N-K] (sorted), mask tokens
    re-inserted, D_n's positions, the side-interpolater kept at ``mask`` [B, N], then D_n."""
    if self.cfg.arm != "mdt":
      raise ValueError("mdt_masked(): needs arm='mdt'.")
    self._check(x)
    h = self.embed(x)
    kept = jnp.take_along_axis(h, keep_idx[..., None], axis=1)
    kept, c = self._encode(kept, level, y, train)
    b, n, d = h.shape
    full = jnp.broadcast_to(self.mask_token.astype(kept.dtype), (b, n, d))
    full = jax.vmap(lambda f, i, v: f.at[i].set(v))(full, keep_idx, kept)
    full = full + self.dn_pos[None].astype(full.dtype)
    full = nn.with_logical_constraint(full, ("batch", "length", "embed"))
    side = self.side(full, c, train)
    full = jnp.where(mask[..., None], side, full)
    return self.dn(full, c, train)

  def __call__(self, x, level, y=None, train: bool = False):
    """``denoise``; ``x`` may also be raster pixel rows [B, H*W*C] or [B, H*W*C, 1] (any dtype).

    While initialising, every branch of the arm runs once so all its parameters exist.
    """
    mc = self.cfg
    if x.ndim == 3 and x.shape[-1] == 1 and x.shape[1] == mc.num_patches * mc.patch_dim:
      x = x[..., 0]
    if x.ndim == 2:
      x = patchify_images(x.astype(jnp.float32), mc.image_shape, mc.patch_size)
    x = x.astype(jnp.float32)
    out = self.denoise(x, level, y, train)
    if self.is_initializing():
      b, n = x.shape[:2]
      mask = jnp.arange(n)[None].repeat(b, 0) < max(n // 2, 1)
      if mc.arm == "mdt":
        keep = jnp.broadcast_to(jnp.arange(max(n // 2, 1), n, dtype=jnp.int32), (b, n - max(
            n // 2, 1)))
        out = out + 0 * self.mdt_masked(x, keep, mask, level, y, train)
      if mc.has_clean_branch:
        vl = jnp.zeros_like(level) if mc.context_time else None
        out = out + 0 * self.clean(x, ~mask, level, y, train, vl)
    return out


@MODELS.register("mc_dit")
def build_mc_dit(model_config, vocab_size: int, ell: int, base: int, causal: bool) -> MCDiT:
  """Gaussian-diffusion patch DiT with the dit | mdt | mcdit arms (model.arm)."""
  del vocab_size, ell, base
  mc = model_config
  dit = DiTConfig(
      vocab_size=1, num_layers=int(mc.n_encoder) + int(mc.n_decoder),
      d_model=int(mc.d_model), num_heads=int(mc.num_heads), mlp_ratio=int(mc.mlp_ratio),
      cond_dim=int(mc.cond_dim), dropout=float(mc.dropout), time_conditioning=True,
      causal=causal, dtype=dtype_from_name(mc.dtype), param_dtype=dtype_from_name(mc.param_dtype),
      attention_impl=mc.attention_impl, scan_layers=bool(mc.scan_layers), remat=str(mc.remat),
      gate_init=float(mc.gate_init), rotary=False)
  return MCDiT(MCDiTConfig(
      dit=dit, image_shape=tuple(int(s) for s in mc.image_shape), patch_size=int(mc.patch_size),
      arm=str(mc.arm), n_encoder=int(mc.n_encoder), n_decoder=int(mc.n_decoder),
      aux_decoder_depth=int(mc.aux_decoder_depth), side_depth=int(mc.side_depth),
      num_classes=int(mc.num_classes), c2c_mask_token=bool(mc.c2c_mask_token),
      shared_decoder=bool(mc.shared_decoder), context_time=bool(mc.context_time)))
