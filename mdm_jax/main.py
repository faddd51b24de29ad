"""Command line: ``python -m mdm_jax.main --config=configs/X.py --workdir=DIR [--mode=...]``.

Modes:
  train   train (or resume) and write metrics, checkpoints and samples to workdir
  eval    perplexity bound of the latest checkpoint on the eval split
  sample  samples + a JSON of NFE, wall time, tokens/s and entropy from the latest checkpoint

Any config value can be overridden: ``--config.prime.ell=4 --config.training.num_steps=500``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (e.g. configs/shakespeare_prime.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_STEPS = flags.DEFINE_integer("sample_steps", None, "sample mode: override sampling.num_steps.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/shakespeare_prime.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints, metrics and samples go).")
  from mdm_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize()
  from mdm_jax import train  # pylint: disable=import-outside-toplevel
  from mdm_jax.config_utils import ConfigError  # pylint: disable=import-outside-toplevel
  from mdm_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  try:
    if _MODE.value == "train":
      result = train.train_and_evaluate(config, workdir)
    elif _MODE.value == "eval":
      result = train.evaluate_checkpoint(config, workdir)
    else:
      result = train.sample_checkpoint(config, workdir, num_steps=_STEPS.value)
  except (ConfigError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
