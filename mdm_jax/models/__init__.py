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
      gate_init=float(model_config.get("gate_init", 0.0))))


@MODELS.register("image_dit")
def _image_dit(model_config, vocab_size: int, ell: int, base: int, causal: bool):
  """DiT over p x p patches of pixel tokens (mdm_jax/models/image_dit.py)."""
  from mdm_jax.models.image_dit import ImageDiT, ImageDiTConfig  # pylint: disable=import-outside-toplevel
  dit = _dit(model_config, vocab_size, ell, base, causal).cfg
  return ImageDiT(ImageDiTConfig(
      dit=dit, image_shape=tuple(int(s) for s in model_config.image_shape),
      patch_size=int(model_config.patch_size), pixel_dim=int(model_config.pixel_dim)))


def build_model(model_config, *, vocab_size: int, ell: int, base: int, causal: bool = False):
  """Builds the backbone named by ``model_config.name``."""
  return MODELS.get(model_config.name)(model_config, vocab_size, ell, base, causal)


__all__ = ["DiT", "DiTConfig", "MODELS", "build_model"]
