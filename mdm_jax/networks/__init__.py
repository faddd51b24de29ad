"""Flax backbones, each registered by name (``config.model.name``).

=================  ==========================================================
``dit.py``         ``dit``: the token DiT with Prime's sub-token embedding
``image_dit.py``   ``image_dit``: a DiT over patches of pixel tokens
``mc_dit.py``      ``mc_dit``: the Gaussian-diffusion patch DiT (dit / mdt / mcdit arms)
``scheduled.py``   a backbone plus a learned schedule's parameters
``attention.py``   attention kernels (xla / cudnn / splash) and rematerialisation policies
=================  ==========================================================

A new backbone is one file with a factory registered by ``@MODELS.register(name)``.
"""

from __future__ import annotations

from mdm_jax.networks.base import (MODELS, RUNTIME_KEYS, dtype_from_name, model_block,
                                   weight_decay_mask)
# The built-in backbones register themselves on import.
from mdm_jax.networks.dit import DiT, DiTConfig
from mdm_jax.networks.image_dit import ImageDiT, ImageDiTConfig
from mdm_jax.networks.mc_dit import MCDiT, MCDiTConfig
from mdm_jax.networks.scheduled import ScheduledModel, attach_schedule


def build_model(model_config, *, vocab_size: int, ell: int, base: int, causal: bool = False):
  """Builds the backbone named by ``model_config.name`` (keys it lacks take their defaults
  from ``configs/base.py``)."""
  block = model_block(model_config)
  return MODELS.get(block.name)(block, vocab_size, ell, base, causal)


__all__ = ["MODELS", "RUNTIME_KEYS", "build_model", "dtype_from_name", "DiT", "DiTConfig",
           "ImageDiT", "ImageDiTConfig", "MCDiT", "MCDiTConfig", "ScheduledModel",
           "attach_schedule", "weight_decay_mask"]
