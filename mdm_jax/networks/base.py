"""The network registry and what every backbone shares.

A backbone is a Flax module called as ``model(inputs, t, train=...)`` whose factory is
registered with ``@MODELS.register(name)`` in the backbone's own file and takes
``(model_config, vocab_size, ell, base, causal)``; ``config.model.name`` selects it.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections

from mdm_jax.configs.base import get_base_config
from mdm_jax.core.config import merge_block
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.registry import Registry

MODELS: Registry[Callable] = Registry("model", "model.name")

# config.model keys that may change when a run resumes: they change how the network is
# computed (dropout, rematerialisation, layer scan, attention kernel, compute dtype), not
# its parameters or what they mean.
RUNTIME_KEYS = ("model.dropout", "model.remat", "model.scan_layers", "model.attention_impl",
                "model.dtype")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise ConfigError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
  return _DTYPES[name]


def model_block(model_config) -> ml_collections.ConfigDict:
  """A complete ``config.model`` block: the base defaults updated with ``model_config``'s keys."""
  return merge_block(get_base_config().model, model_config)
