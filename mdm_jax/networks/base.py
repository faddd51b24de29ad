"""The network registry and what every backbone shares.

A backbone is a Flax module called as ``model(inputs, t, train=...)`` whose factory is
registered with ``@MODELS.register(name)`` in the backbone's own file and takes
``(model_config, vocab_size, ell, base, causal)``; ``config.model.name`` selects it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mdm_jax.configs.base import get_base_config
from mdm_jax.core.config import merge_block
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.registry import Registry

MODELS: Registry[Callable] = Registry("model", "model.name")

# config.model keys that may change when a run resumes: they change how the network is
# computed (dropout, rematerialisation, attention kernel, compute dtype, the loss's slices
# of positions), not its parameters or what they mean.  model.scan_layers is not one of them: it changes the
# parameter tree (one stacked ``blocks`` against ``block_0`` ... ``block_{n-1}``), so a
# checkpoint restores only with the value it was trained with.
RUNTIME_KEYS = ("model.dropout", "model.remat", "model.attention_impl", "model.dtype",
                "model.loss_chunk")

# Leaf names that are never weight-decayed: norm scales and biases (``*_bias`` too).
NO_DECAY_NAMES = ("scale", "bias")
# The submodule that holds a scanned layer stack (``dit_blocks``): its leaves carry one
# extra leading axis (layers) that is not part of the layer's own parameter shape.
STACK_NAME = "blocks"

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise ConfigError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
  return _DTYPES[name]


def model_block(model_config) -> ml_collections.ConfigDict:
  """A complete ``config.model`` block: the base defaults updated with ``model_config``'s keys."""
  return merge_block(get_base_config().model, model_config)


def _path_names(path) -> list:
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def decays(names, ndim: int) -> bool:
  """Whether the parameter at ``names`` (its path of module and leaf names) is weight-decayed.

  Decayed: the weight matrices and tables of the network (kernels, embeddings, the head,
  positional tables), judged by the parameter's shape inside its own layer, so a scanned
  stack (``blocks``, one extra leading axis) and its unrolled ``block_i`` twin decide alike.
  Never decayed: norm scales, biases, and anything under ``schedule`` (a learned schedule's
  parameters).
  """
  names = list(names)
  if not names or names[0] == "schedule":
    return False
  leaf = names[-1]
  if leaf in NO_DECAY_NAMES or leaf.endswith("_bias"):
    return False
  own = ndim - (1 if STACK_NAME in names[:-1] else 0)
  return own >= 2


def weight_decay_mask(params: Any) -> Any:
  """A tree of booleans like ``params``: True where ``decays`` says the leaf is decayed.

  ``params`` may hold logically boxed leaves (``nn.Partitioned``); only dict keys count
  as names.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: decays(_path_names(path), p.ndim), params)
