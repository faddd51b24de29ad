"""Model registry: ``config.model.name`` selects a backbone factory."""

from __future__ import annotations

from typing import Callable

from mdm_jax.models.dit import DiT, DiTConfig, dtype_from_name
from mdm_jax.registry import Registry

MODELS: Registry[Callable] = Registry("model")


@MODELS.register("dit")
def _dit(model_config, vocab_size: int, ell: int, base: int, causal: bool):
  return DiT(DiTConfig(
      vocab_size=vocab_size, ell=ell, base=base,
      num_layers=int(model_config.num_layers), d_model=int(model_config.d_model),
      num_heads=int(model_config.num_heads), mlp_ratio=int(model_config.mlp_ratio),
      cond_dim=int(model_config.cond_dim), dropout=float(model_config.dropout),
      time_conditioning=bool(model_config.time_conditioning),
      tie_embeddings=bool(model_config.tie_embeddings), causal=causal,
      dtype=dtype_from_name(model_config.dtype),
      param_dtype=dtype_from_name(model_config.param_dtype),
      attention_impl=model_config.attention_impl,
      scan_layers=bool(model_config.scan_layers), remat=str(model_config.remat),
      gate_init=float(model_config.get("gate_init", 0.0)),
      local_conv=int(model_config.get("local_conv", 0)),
      digit_merge=str(model_config.get("digit_merge", "concat")),
      per_slot_tables=bool(model_config.get("per_slot_tables", False))))


@MODELS.register("image_dit")
def _image_dit(model_config, vocab_size: int, ell: int, base: int, causal: bool):
  """DiT over p x p patches of pixel tokens (mdm_jax/models/image_dit.py)."""
  from mdm_jax.models.image_dit import ImageDiT, ImageDiTConfig  # pylint: disable=import-outside-toplevel
  dit = _dit(model_config, vocab_size, ell, base, causal).cfg
  return ImageDiT(ImageDiTConfig(
      dit=dit, image_shape=tuple(int(s) for s in model_config.image_shape),
      patch_size=int(model_config.patch_size), pixel_dim=int(model_config.pixel_dim)))


@MODELS.register("mc_dit")
def _mc_dit(model_config, vocab_size: int, ell: int, base: int, causal: bool):
  """Gaussian-diffusion patch DiT with the dit | mdt | mcdit arms (mdm_jax/models/mc_dit.py)."""
  from mdm_jax.models.mc_dit import MCDiT, MCDiTConfig  # pylint: disable=import-outside-toplevel
  del vocab_size, ell, base
  mc = model_config
  dit = DiTConfig(
      vocab_size=1, num_layers=int(mc.n_encoder) + int(mc.n_decoder),
      d_model=int(mc.d_model), num_heads=int(mc.num_heads), mlp_ratio=int(mc.mlp_ratio),
      cond_dim=int(mc.cond_dim), dropout=float(mc.dropout), time_conditioning=True,
      causal=causal, dtype=dtype_from_name(mc.dtype), param_dtype=dtype_from_name(mc.param_dtype),
      attention_impl=mc.attention_impl, scan_layers=bool(mc.scan_layers), remat=str(mc.remat),
      gate_init=float(mc.get("gate_init", 0.0)), rotary=False)
  return MCDiT(MCDiTConfig(
      dit=dit, image_shape=tuple(int(s) for s in mc.image_shape), patch_size=int(mc.patch_size),
      arm=str(mc.arm), n_encoder=int(mc.n_encoder), n_decoder=int(mc.n_decoder),
      aux_decoder_depth=int(mc.aux_decoder_depth), side_depth=int(mc.side_depth),
      num_classes=int(mc.num_classes), c2c_mask_token=bool(mc.c2c_mask_token),
      shared_decoder=bool(mc.get("shared_decoder", False)),
      context_time=bool(mc.get("context_time", False))))


def build_model(model_config, *, vocab_size: int, ell: int, base: int, causal: bool = False):
  """Builds the backbone named by ``model_config.name``."""
  return MODELS.get(model_config.name)(model_config, vocab_size, ell, base, causal)


__all__ = ["DiT", "DiTConfig", "MODELS", "build_model"]
