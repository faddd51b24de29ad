"""Config validation with errors that say what to change."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List

import ml_collections

_CHOICES = {
    "objective": ("diffusion", "ar", "gaussian"),   # gaussian: mdm_jax/gaussian_task.py
    "prime.loss": ("marginal", "joint"),
    "data.tokenizer": ("char", "byte", "bpe", "gpt2"),
    "data.token_order": ("id", "context", "random"),   # data/token_order.py
    "data.dataset": ("shakespeare", "text_files", "array_record",
                     "fashion_mnist", "image_folder", "tfds_images"),   # images: data/images.py
    "training.lr_schedule": ("constant", "cosine"),
    "model.remat": ("none", "full", "dots"),
    "model.attention_impl": ("xla", "cudnn"),
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
  if int(config.checkpoint.keep_best) < 0:
    raise ConfigError(f"checkpoint.keep_best must be >= 0, got {config.checkpoint.keep_best}.")
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
  _validate_sampler_options(config)
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
  if config.data.dataset == "tfds_images" and not config.data.get("tfds_name", ""):
    raise ConfigError("data.dataset='tfds_images' needs --config.data.tfds_name, e.g. cifar10.")
  if "num_levels" in config.data and not 2 <= int(config.data.num_levels) <= 256:
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
    if config.objective == "ar":
      raise ConfigError("model.name='image_dit' is a bidirectional diffusion backbone; use "
                        "objective='diffusion'.")


def _validate_sampler_options(config) -> None:
  """sampling.sampler is registered and the sampler options are in range."""
  from mdm_jax.sampling import SAMPLERS  # pylint: disable=import-outside-toplevel
  sc = config.sampling
  if sc.sampler not in SAMPLERS:
    raise ConfigError(f"config.sampling.sampler={sc.sampler!r} is not a registered sampler; "
                      f"choose one of {SAMPLERS.names()}.")
  if sc.sampler == "ar" and config.objective != "ar":
    raise ConfigError("sampling.sampler='ar' needs objective='ar'; diffusion models use e.g. "
                      "'ancestral', 'first_hitting', 'punt' or 'remdm'.")
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
  if int(sc.get("block_len", 0)) < 0:
    raise ConfigError(f"sampling.block_len must be >= 0 (0 = no blocks, 1 = left to right), "
                      f"got {sc.block_len}.")


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


def last_override_wins(argv: List[str], config_flag: str = "config") -> List[str]:
  """Drops every ``--config.KEY=VALUE`` that a later one for the same KEY repeats.

  absl keeps the last value of a repeated scalar flag, but ml_collections appends the
  values of a repeated tuple field (``--config.mesh.shape=(2,1,1)`` twice gives a
  6-tuple).  Launch scripts that append overrides to a base command repeat keys, so
  every repeated override resolves the absl way: the last one wins.  Only the ``=``
  form is recognised; ``--config.KEY VALUE`` (space-separated) passes through as is.
  """
  prefix = f"--{config_flag}."
  keys = [a.split("=", 1)[0] if a.startswith(prefix) and "=" in a else None for a in argv]
  last = {k: i for i, k in enumerate(keys) if k}
  return [a for i, (a, k) in enumerate(zip(argv, keys)) if k is None or last[k] == i]


def flags_parser(usage: str, config_flag: str = "config") -> Callable[[List[str]], List[str]]:
  """An absl ``flags_parser`` for ``app.run`` that turns a bad ``--config`` file or
  ``--config.KEY`` into one ``error:`` line, the usage line and exit status 2.

  ml_collections raises KeyError/AttributeError (unknown key) or ValueError/TypeError (a value
  of the wrong type, an unknown config variant) from deep inside flag parsing; the user should
  see what to change, not a traceback.  Every command line that takes ``--config`` uses this.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  def parse(argv: List[str]) -> List[str]:
    argv = last_override_wins(argv, config_flag)
    try:
      args = flags.FLAGS(argv)
      if config_flag in flags.FLAGS and flags.FLAGS[config_flag].value is not None:
        _ = list(flags.FLAGS[config_flag].value.keys())   # a bad file raises when first read
      return args
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
      # A config file that raised carries its whole traceback in the message: keep the last line.
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      msg = lines[-1] if lines else type(e).__name__
      if isinstance(e, (KeyError, AttributeError)):
        msg = f"unknown config key {msg.strip(chr(34) + chr(39))!r}"
      flag = lines[0].split(":", 1)[0] if lines and lines[0].startswith("flag --") else ""
      if flag and msg.startswith(flag):
        flag = ""
      overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith(f"--{config_flag}.")]
      hint = ""
      if isinstance(e, (KeyError, AttributeError)) and overrides:
        hint = (f" (overrides given: {', '.join(overrides)}; a key must already exist in the "
                "config file, see configs/base.py)")
      print(f"error: {flag + ': ' if flag else ''}{msg}{hint}", file=sys.stderr)
      print(f"usage: {usage}", file=sys.stderr)
      sys.exit(2)

  return parse
