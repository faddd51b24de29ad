"""Config validation with errors that say what to change."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import ml_collections

_CHOICES = {
    "objective": ("diffusion", "ar"),
    "prime.loss": ("marginal", "joint"),
    "data.tokenizer": ("char", "byte", "bpe", "gpt2"),
    "data.dataset": ("shakespeare", "text_files"),
    "training.lr_schedule": ("constant", "cosine"),
    "model.remat": ("none", "full", "dots"),
    "model.attention_impl": ("xla", "cudnn"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
}


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key and the fix."""


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks values whose mistakes would otherwise surface deep inside XLA."""
  from mdm_jax.schedules import SCHEDULES  # pylint: disable=import-outside-toplevel
  from mdm_jax.models import MODELS  # pylint: disable=import-outside-toplevel
  for key, valid in _CHOICES.items():
    val = _get(config, key)
    if val not in valid:
      raise ConfigError(f"config.{key}={val!r} is not valid; choose one of {list(valid)}.")
  if config.schedule.name not in SCHEDULES:
    raise ConfigError(f"config.schedule.name={config.schedule.name!r} is not a registered "
                      f"schedule; choose one of {SCHEDULES.names()}.")
  if config.model.name not in MODELS:
    raise ConfigError(f"config.model.name={config.model.name!r} is not a registered model; "
                      f"choose one of {MODELS.names()}.")
  positive = ["prime.ell", "data.seq_len", "model.num_layers", "model.d_model",
              "model.num_heads", "training.batch_size", "training.num_steps",
              "training.num_microbatches", "eval.batch_size", "eval.num_time_samples",
              "sampling.num_steps", "sampling.num_samples", "training.log_every"]
  for key in positive:
    if int(_get(config, key)) < 1:
      raise ConfigError(f"config.{key} must be >= 1, got {_get(config, key)}.")
  if config.objective == "ar" and int(config.prime.ell) != 1:
    raise ConfigError("objective='ar' is the autoregressive baseline over whole tokens: set "
                      "--config.prime.ell=1 (or use configs/shakespeare_ar.py).")
  if int(config.model.d_model) % int(config.model.num_heads):
    raise ConfigError(f"model.d_model={config.model.d_model} must be divisible by "
                      f"model.num_heads={config.model.num_heads}.")
  if config.model.tie_embeddings and int(config.prime.ell) != 1:
    raise ConfigError("model.tie_embeddings=True needs prime.ell=1.")
  if not 0.0 < float(config.training.t_min) < 1.0:
    raise ConfigError(f"training.t_min must be in (0, 1), got {config.training.t_min}.")
  if not 0.0 <= float(config.training.ema_decay) < 1.0:
    raise ConfigError(f"training.ema_decay must be in [0, 1), got {config.training.ema_decay}.")
  if int(config.training.batch_size) % int(config.training.num_microbatches):
    raise ConfigError(f"training.batch_size={config.training.batch_size} must be divisible by "
                      f"training.num_microbatches={config.training.num_microbatches}.")
  if not 0.0 < float(config.sampling.top_p) <= 1.0:
    raise ConfigError(f"sampling.top_p must be in (0, 1], got {config.sampling.top_p}.")
  if float(config.sampling.temperature) <= 0:
    raise ConfigError(f"sampling.temperature must be > 0, got {config.sampling.temperature}.")
  if config.data.dataset == "text_files" and not config.data.path:
    raise ConfigError("data.dataset='text_files' needs --config.data.path=FILE[,FILE or GLOB].")


def validate_batch(config, mesh) -> None:
  """The (micro)batch must split evenly over the batch-sharded mesh axes."""
  import jax  # pylint: disable=import-outside-toplevel
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = int(config.training.batch_size) // int(config.training.num_microbatches)
  if micro % shards:
    raise ConfigError(
        f"Each microbatch has {micro} sequences (training.batch_size / num_microbatches), which "
        f"does not divide over the {shards} devices of the mesh's data x fsdp axes. Choose a "
        "batch size that is a multiple of it.")
  if int(config.eval.batch_size) % shards:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be a multiple of the "
                      f"{shards} devices on the data x fsdp axes.")
  if int(config.training.batch_size) % jax.process_count():
    raise ConfigError(f"training.batch_size must divide over {jax.process_count()} processes.")


def to_dict(config) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def save_config(config, workdir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
