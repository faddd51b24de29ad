"""Published checkpoints in and out: ``python -m mdm_jax.convert``.

Convert the authors' MDLM or MDM-Prime weights into an mdm_jax workdir (docs/published_models.md)::

  python -m mdm_jax.convert --from=mdlm --checkpoint=mdlm-owt/model.safetensors \\
      --workdir=runs/mdlm_owt
  python -m mdm_jax.convert --from=mdm-prime --checkpoint=prime_l4.ckpt --workdir=runs/prime_l4
  python -m mdm_jax.convert --from=mdlm --checkpoint=hf://kuleshov-group/mdlm-owt \\
      --workdir=runs/mdlm_owt       # through huggingface_hub: its cache, HF_HUB_OFFLINE, HF_TOKEN

then ``python -m mdm_jax.main --mode=eval --config=runs/mdlm_owt/config.py
--workdir=runs/mdlm_owt --config.data.path=data/owt_gpt2_1024`` (and ``--mode=sample``, or
``--mode=train`` to continue training).  ``--config`` picks the data and training settings
(default: the ``mdm_jax_config.json`` that ``--to=hf`` writes beside the weights, else
``owt_mdm`` for ell = 1, ``owt_prime:ell=N`` otherwise); the network, codec and schedule
always come from the checkpoint.

Write an mdm_jax ``dit`` model in the authors' layout (a safetensors state dict their
``DIT`` / ``PerceiverDIT`` load)::

  python -m mdm_jax.convert --to=safetensors --config=runs/mdlm_owt/config.py \\
      --workdir=runs/mdlm_owt --output=exported/model.safetensors

or a folder ready to upload to the Hugging Face Hub (weights, config.json, the tokenizer,
the run's config and a model card with its last bound)::

  python -m mdm_jax.convert --to=hf --config=runs/mdlm_owt/config.py --workdir=runs/mdlm_owt \\
      --output=exported/mdlm_owt --repo_id=ORG/NAME
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from mdm_jax.core.errors import ConfigError
from mdm_jax.core.flags import flags_parser
from mdm_jax.core.torch_files import WeightFileError
from mdm_jax.networks.published import SOURCES, ConversionError
from mdm_jax.trainers import published
from mdm_jax.trainers.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Convert: the config whose data and training settings the workdir gets "
    "(default: the mdm_jax_config.json a --to=hf export put beside the weights, else owt_mdm / "
    "owt_prime:ell=N). Export: the workdir's config (DIR/config.py).",
    lock_config=False)
_FROM = flags.DEFINE_enum("from", None, list(SOURCES), "Convert a checkpoint of this paper's code.")
_TO = flags.DEFINE_enum("to", None, ["safetensors", "hf"], "Export the workdir's model in the "
                        "authors' layout: one .safetensors file, or (hf) a folder ready to upload "
                        "to the Hugging Face Hub.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The published file: .safetensors (Hugging "
                                  "Face) or .ckpt (PyTorch Lightning), or a Hub name "
                                  "hf://ORG/NAME[@REVISION][/PATH] (huggingface_hub's cache, "
                                  "HF_HUB_OFFLINE and HF_TOKEN apply).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Convert: the workdir to create. Export: the "
                               "workdir to read.")
_OUTPUT = flags.DEFINE_string("output", None, "Export: the .safetensors file (--to=safetensors) "
                              "or the folder (--to=hf) to write.")
_REPO_ID = flags.DEFINE_string("repo_id", "", "--to=hf: the Hub repository ORG/NAME the model "
                               "card names (how to load it).")
_HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads, when the checkpoint has no "
                              "config that names them (the published DiT-small: 12).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "Export: which weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --workdir (convert) or "
                                "--output folder (--to=hf).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  source, target = flags.FLAGS["from"].value, _TO.value
  if (source is None) == (target is None):
    raise app.UsageError("Give either --from=mdlm|mdm-prime (convert a published checkpoint) "
                         "or --to=safetensors|hf (export a workdir).")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  try:
    if source is not None:
      if not _CHECKPOINT.value:
        raise app.UsageError("--from needs --checkpoint=FILE (.safetensors or .ckpt) or "
                             "--checkpoint=hf://ORG/NAME.")
      result = published.convert_checkpoint(
          source, _CHECKPOINT.value, _WORKDIR.value, base_config=_CONFIG.value,
          num_heads=_HEADS.value, overwrite=_OVERWRITE.value, progress=progress)
    else:
      if _CONFIG.value is None or not _OUTPUT.value:
        what = "FILE.safetensors" if target == "safetensors" else "FOLDER"
        raise app.UsageError(f"--to={target} needs --config=WORKDIR/config.py and "
                             f"--output={what}.")
      if target == "hf":
        result = published.export_hub_folder(
            _CONFIG.value, _WORKDIR.value, _OUTPUT.value, use_ema=_WEIGHTS.value == "ema",
            repo_id=_REPO_ID.value, overwrite=_OVERWRITE.value, progress=progress)
      else:
        result = published.export_checkpoint(_CONFIG.value, _WORKDIR.value, _OUTPUT.value,
                                             use_ema=_WEIGHTS.value == "ema", progress=progress)
  except (ConversionError, WeightFileError, ConfigError, CheckpointError,
          FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=2, default=str))


def run() -> None:
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.convert (--from=mdlm|mdm-prime --checkpoint=FILE|hf://ORG/NAME "
      "--workdir=DIR [--config=NAME] | --to=safetensors|hf --config=DIR/config.py --workdir=DIR "
      "--output=FILE.safetensors|FOLDER)"))


if __name__ == "__main__":
  run()
