"""Config checks that would otherwise surface deep inside XLA, with errors that say what to change.

``validate_config`` runs before anything is built: fixed choices, the names every
registry knows (schedules, models, samplers, datasets, tasks, tokenizers), ranges, the
sampler options, and the task's own checks (``Task.validate``).  Components check
their own settings again when built.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import ml_collections

from mdm_jax.core.config import get_path
from mdm_jax.core.errors import ConfigError
from mdm_jax.data import DATASETS, TOKENIZERS
from mdm_jax.data.token_order import TOKEN_ORDERS
from mdm_jax.diffusion.schedules import SCHEDULES
from mdm_jax.networks import MODELS
from mdm_jax.networks.attention import ATTENTION_IMPLS, REMAT_POLICIES
from mdm_jax.sampling import SAMPLERS
from mdm_jax.tasks.base import TASKS

_CHOICES = {
    "prime.loss": ("marginal", "joint"),
    "training.lr_schedule": ("constant", "cosine"),
    "model.remat": tuple(REMAT_POLICIES),
    "model.attention_impl": ATTENTION_IMPLS,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "training.loss_weighting": ("elbo", "flat"),
    "model.digit_merge": ("concat", "sum", "joint"),
    "checkpoint.restore": ("latest", "best"),
    "sampling.confidence": ("prob", "max_prob", "margin", "neg_entropy"),
    "sampling.punt_confidence": ("prob", "max_prob", "margin", "neg_entropy"),
    "sampling.punt_divergence": ("kl", "logprob"),
    "sampling.punt_mode": ("sequential", "batched"),
    "sampling.correction_score": ("raw", "probe"),
    "sampling.remdm_schedule": ("cap", "rescale", "conf", "loop"),
}


def _registered() -> Dict[str, Tuple[str, Sequence[str]]]:
  """Keys whose valid values are what a registry holds now (including entries a user added)."""
  return {"objective": ("task", TASKS.names()), "schedule.name": ("schedule", SCHEDULES.names()),
          "model.name": ("model", MODELS.names()),
          "sampling.sampler": ("sampler", SAMPLERS.names()),
          "data.dataset": ("dataset", DATASETS.names()),
          "data.tokenizer": ("tokenizer", sorted(TOKENIZERS)),
          "data.token_order": ("token order", list(TOKEN_ORDERS))}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks values whose mistakes would otherwise surface deep inside XLA."""
  for key, valid in _CHOICES.items():
    val = get_path(config, key)
    if val not in valid:
      raise ConfigError(f"config.{key}={val!r} is not valid; choose one of {list(valid)}.")
  for key, (kind, names) in _registered().items():
    val = get_path(config, key)
    if val not in names:
      raise ConfigError(f"config.{key}={val!r} is not a registered {kind}; choose one of "
                        f"{list(names)}.")
  if int(config.checkpoint.keep_best) < 0:
    raise ConfigError(f"checkpoint.keep_best must be >= 0, got {config.checkpoint.keep_best}.")
  positive = ["prime.ell", "data.seq_len", "model.num_layers", "model.d_model",
              "model.num_heads", "training.batch_size", "training.num_steps",
              "training.num_microbatches", "eval.batch_size", "eval.num_time_samples",
              "sampling.num_steps", "sampling.num_samples", "training.log_every"]
  for key in positive:
    if int(get_path(config, key)) < 1:
      raise ConfigError(f"config.{key} must be >= 1, got {get_path(config, key)}.")
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
  _validate_sampler_options(config)
  TASKS.get(config.objective).validate(config)
  if config.data.token_order != "id" and config.data.dataset not in ("shakespeare", "text_files",
                                                                      "array_record"):
    raise ConfigError(
        f"data.token_order={config.data.token_order!r} renumbers a text vocabulary (data.dataset "
        f"shakespeare, text_files, or array_record prepared from one), not data.dataset="
        f"{config.data.dataset!r}: use --config.data.token_order=id.")
  if config.data.dataset == "text_files" and not config.data.path:
    raise ConfigError("data.dataset='text_files' needs --config.data.path=FILE[,FILE or GLOB].")
  if config.data.dataset == "array_record" and not config.data.path:
    raise ConfigError("data.dataset='array_record' needs --config.data.path=DIR, a directory "
                      "written by --mode=prepare (see docs/data.md).")
  _validate_images(config)


def _validate_images(config) -> None:
  """Image datasets and the image_dit backbone (mdm_jax/data/images.py, models/image_dit.py)."""
  if config.data.dataset == "image_folder" and not config.data.path:
    raise ConfigError("data.dataset='image_folder' needs --config.data.path=DIR (a folder of "
                      "PNG/JPEG images; sub-folders are classes).")
  if config.data.dataset == "tfds_images" and not config.data.tfds_name:
    raise ConfigError("data.dataset='tfds_images' needs --config.data.tfds_name, e.g. cifar10.")
  if not 2 <= int(config.data.num_levels) <= 256:
    raise ConfigError(f"data.num_levels must be in [2, 256], got {config.data.num_levels}.")
  if config.model.name == "image_dit":
    shape = tuple(int(s) for s in config.model.image_shape)
    p = int(config.model.patch_size)
    if len(shape) != 3 or p < 1 or shape[0] % p or shape[1] % p:
      raise ConfigError(f"model.image_shape={shape} must be (H, W, C) with H and W divisible "
                        f"by model.patch_size={p}.")
    if shape[0] * shape[1] * shape[2] != int(config.data.seq_len):
      raise ConfigError(f"data.seq_len={config.data.seq_len} must equal H*W*C of "
                        f"model.image_shape={shape} ({shape[0] * shape[1] * shape[2]}).")


def _validate_sampler_options(config) -> None:
  """sampling.sampler is registered and the sampler options are in range."""
  sc = config.sampling
  nonneg = ["punt_eps", "punt_max_candidates", "eb_gamma", "fast_dllm_threshold",
            "maskgit_select_temp"]
  for key in nonneg:
    if not float(sc[key]) >= 0:
      raise ConfigError(f"config.sampling.{key} must be >= 0, got {sc[key]}.")
  if int(sc.punt_max_candidates) != sc.punt_max_candidates:
    raise ConfigError(f"sampling.punt_max_candidates must be an integer, got "
                      f"{sc.punt_max_candidates}.")
  phases = tuple(float(p) for p in sc.correction_phases)
  if len(phases) != 3 or not 0.0 <= phases[0] <= phases[1] <= phases[2] <= 1.0:
    raise ConfigError(f"sampling.correction_phases must be 3 non-decreasing fractions of T in "
                      f"[0, 1], e.g. (0.4, 0.6, 0.8); got {sc.correction_phases}.")
  caps = tuple(float(c) for c in sc.correction_caps)
  if len(caps) != 3 or any(not c >= 0 for c in caps):
    raise ConfigError(f"sampling.correction_caps must be 3 values >= 0 (>= 1: tokens per step, "
                      f"< 1: a fraction of the sequence), e.g. (16, 8, 4); got "
                      f"{sc.correction_caps}.")
  if not 0.0 < float(sc.correction_probe_frac) <= 1.0:
    raise ConfigError(f"sampling.correction_probe_frac must be in (0, 1], got "
                      f"{sc.correction_probe_frac}.")
  if sc.remdm_schedule == "rescale" and float(sc.remdm_eta) > 1.0:
    raise ConfigError(f"sampling.remdm_eta must be <= 1 with remdm_schedule='rescale' "
                      f"(sigma = eta * sigma_max), got {sc.remdm_eta}.")
  if not 0.0 < float(sc.remdm_t_off) < float(sc.remdm_t_on) < 1.0:
    raise ConfigError(f"sampling.remdm_t_off / remdm_t_on must satisfy 0 < t_off < t_on < 1, "
                      f"got {sc.remdm_t_off}, {sc.remdm_t_on}.")
  if not 0.0 < float(sc.remdm_alpha_on) < 1.0:
    raise ConfigError(f"sampling.remdm_alpha_on must be in (0, 1), got {sc.remdm_alpha_on}.")
  if int(sc.block_len) < 0:
    raise ConfigError(f"sampling.block_len must be >= 0 (0 = no blocks, 1 = left to right), "
                      f"got {sc.block_len}.")
  if str(sc.get("precision", "float32")) not in ("float32", "float64"):
    raise ConfigError(f"sampling.precision must be 'float32' or 'float64' (the precision of the "
                      f"samplers' random draws), got {sc.precision!r}.")
