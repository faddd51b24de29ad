"""The command line: ``python -m mdm_jax.main --config=NAME --workdir=DIR [--mode=...]``.

``--config`` takes a packaged config name (``shakespeare_prime``, ``shakespeare_prime:tiny``)
or a path (``configs/shakespeare_prime.py``, ``my/experiment.py:ell=3``).  The same
program runs as ``python -m mdm_jax`` and as the ``mdm-jax`` command.

Modes:
  train   train (or resume) and write metrics, checkpoints and samples to workdir
  eval    perplexity bound of the latest checkpoint on the eval split
  sample  samples + a JSON of NFE, wall time, tokens/s and entropy from the latest checkpoint
  score   generative perplexity of sample files (--texts) under the AR run in --workdir,
          next to held-out text (mdm_jax/metrics/gen_ppl.py); --config is that run's config
  distill Di[M]O: distil the diffusion run in --teacher_workdir into a one-step generator
          (config.distill; mdm_jax/trainers/distill.py, docs/images.md)
  prepare tokenize a text source once into ArrayRecord shards of packed sequences in
          --output (no --workdir); train on them with --config.data.dataset=array_record
          --config.data.path=OUTPUT (see docs/data.md)

Any config value can be overridden: ``--config.prime.ell=4 --config.training.num_steps=500``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import traceback

import jax

from absl import app, flags
from ml_collections import config_flags

from mdm_jax.core import distributed, paths
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.flags import flags_parser
from mdm_jax.data import array_record_prepare
from mdm_jax.metrics import gen_ppl
from mdm_jax.trainers import distill, inference, loop
from mdm_jax.trainers.checkpoint import CheckpointError
from mdm_jax.trainers.preemption import PREEMPTED_EXIT_CODE, Preempted
from mdm_jax.trainers.workdir_lock import WorkdirBusy

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A packaged config name (e.g. shakespeare_prime, shakespeare_prime:tiny) or the "
    "path of an ml_collections config file (e.g. configs/shakespeare_prime.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "sample", "score", "prepare", "distill"],
                          "What to run.")
_STEPS = flags.DEFINE_integer("sample_steps", None, "sample mode: override sampling.num_steps.")
_TEACHER = flags.DEFINE_string("teacher_workdir", None, "distill: the trained diffusion run to "
                               "distil (its config must be --config); output goes to --workdir.")
_TEXTS = flags.DEFINE_list("texts", [], "score: samples files to score (samples/step_N.json or "
                          ".txt, or any text file), comma-separated.")
_SCORER = flags.DEFINE_string(
    "scorer", "", "score: gpt2:FOLDER scores with the GPT-2 in a local Hugging Face folder "
    "(e.g. a copy of gpt2-large; the peers' protocol, docs/evaluation.md) instead of the AR "
    "run in --workdir.")
# ---- prepare mode (see docs/data.md); the tokenizer, seq_len and eval_fraction come from --config.
_OUTPUT = flags.DEFINE_string("output", None, "prepare: the dataset directory to write.")
_SOURCE = flags.DEFINE_string(
    "source", "", "prepare: empty = the corpus of config.data.dataset/data.path; tfds:NAME "
    "(e.g. tfds:lm1b) or hf:NAME (e.g. hf:Skylion007/openwebtext).")
_SOURCE_CONFIG = flags.DEFINE_string("source_config", "", "prepare: Hugging Face config name.")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "prepare: source split for training.")
_EVAL_SPLIT = flags.DEFINE_string(
    "eval_split", "", "prepare: source split for eval; empty = hold out the last "
    "data.eval_fraction of the train split's documents.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "prepare: the example field with the text.")
_MAX_DOCS = flags.DEFINE_integer("max_documents", 0, "prepare: at most this many documents per "
                                 "source split (0 = all).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "prepare: TFDS data_dir.")
_TFDS_DOWNLOAD = flags.DEFINE_bool("tfds_download", False, "prepare: let TFDS download and "
                                   "prepare the dataset (needs internet).")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 0, "prepare: sequences per shard "
                                  "(0 = about 128 MiB each).")
_SAMPLE_CHARS = flags.DEFINE_integer("tokenizer_sample_chars", 20_000_000, "prepare, tfds/hf "
                                     "sources: characters the char/bpe tokenizer is built from.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "prepare: replace an existing --output.")


def run_prepare(config, output: str) -> dict:
  """--mode=prepare: writes the ArrayRecord dataset; returns a summary (printed as JSON)."""
  progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  meta = array_record_prepare.prepare(
      config.data, output, source=_SOURCE.value, source_config=_SOURCE_CONFIG.value,
      train_split=_TRAIN_SPLIT.value, eval_split=_EVAL_SPLIT.value, text_key=_TEXT_KEY.value,
      max_documents=_MAX_DOCS.value, tfds_data_dir=_TFDS_DATA_DIR.value,
      tfds_download=_TFDS_DOWNLOAD.value, records_per_shard=_PER_SHARD.value,
      tokenizer_sample_chars=_SAMPLE_CHARS.value, overwrite=_OVERWRITE.value, progress=progress)
  out = os.path.abspath(os.path.expanduser(output))
  tok = meta["tokenizer"]
  train_with = (f"--config.data.dataset=array_record --config.data.path={out} "
                f"--config.data.tokenizer={tok['kind']} --config.data.seq_len={meta['seq_len']}")
  if tok["kind"] == "bpe":
    train_with += f" --config.data.bpe_vocab_size={tok['settings']['bpe_vocab_size']}"
  return {
      "path": out, "seq_len": meta["seq_len"], "tokenizer": meta["tokenizer"]["kind"],
      "vocab_size": meta["vocab_size"],
      **{f"{s}_sequences": meta["splits"][s]["num_sequences"] for s in ("train", "eval")},
      **{f"{s}_shards": meta["splits"][s]["num_shards"] for s in ("train", "eval")},
      "seconds": meta["prepare_seconds"],
      "train_with": train_with,
  }


def run_score(config, workdir: str, paths) -> dict:
  if not paths:
    raise app.UsageError("--mode=score needs --texts=FILE[,FILE...] (e.g. "
                         "runs/prime/samples/step_1600.json).")
  if _SCORER.value:
    scorer = inference.load_scorer(_SCORER.value)
  elif config.objective != "ar":
    raise ConfigError(f"--mode=score scores with the AR run in --workdir; --config has "
                      f"objective={config.objective!r}. Pass the AR run's config, e.g. "
                      "--config=shakespeare_ar (configs/shakespeare_ar.py), or pass "
                      "--scorer=gpt2:FOLDER.")
  else:
    scorer = inference.load_scorer(workdir, config)   # checks --config against the checkpoint
  try:
    results = gen_ppl.score_files(scorer, paths)
  except gen_ppl.ScoreError as e:
    raise ConfigError(str(e)) from e
  print(gen_ppl.format_table(results), file=sys.stderr, flush=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=shakespeare_prime")
  if _MODE.value == "prepare":
    if int(os.environ.get("JAX_PROCESS_ID", "0") or 0) > 0:
      # Preparation is one host's job: under a multi-process launcher the others would
      # write the same files.  Process 0 prepares; train then reads it from every host.
      print(f"prepare: process {os.environ['JAX_PROCESS_ID']} leaves --mode=prepare to "
            "process 0.", file=sys.stderr)
      return
    if not _OUTPUT.value:
      raise app.UsageError("--mode=prepare needs --output=DIR (the dataset directory to write).")
    try:
      result = run_prepare(_CONFIG.value, _OUTPUT.value)
    except (array_record_prepare.PrepareError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(result, indent=2, default=str))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints, metrics and samples go).")
  distributed.dump_stacks_on_signal()
  distributed.maybe_initialize()
  config = _CONFIG.value
  try:
    workdir = paths.resolve(_WORKDIR.value)   # a scheme nothing handles fails here
    if _MODE.value == "train":
      result = loop.train_and_evaluate(config, workdir)
    elif _MODE.value == "distill":   # Di[M]O one-step generator (mdm_jax/trainers/distill.py)
      result = distill.distill(config, _TEACHER.value or "", workdir)
    elif _MODE.value == "eval":
      result = inference.evaluate_checkpoint(config, workdir)
    elif _MODE.value == "score":   # generative perplexity under an AR run
      result = run_score(config, workdir, _TEXTS.value)
    else:
      result = inference.sample_checkpoint(config, workdir, num_steps=_STEPS.value)
  except Preempted as e:
    print(f"mdm_jax: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  except (ConfigError, CheckpointError, FileNotFoundError, WorkdirBusy) as e:
    print(f"error: {e}", file=sys.stderr)
    distributed.exit_without_barrier(2)
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    distributed.exit_without_barrier(1)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      _fail_fast_if_multiprocess()
      raise
    free = shutil.disk_usage(workdir).free / 2 ** 20 if os.path.isdir(workdir) else 0.0
    print(f"error: No space left on {e.filename or workdir}: {free:.0f} MiB free in {workdir}. "
          "Free space and re-run the same command; training resumes from its last checkpoint.",
          file=sys.stderr)
    distributed.exit_without_barrier(2)
  except Exception:  # pylint: disable=broad-except
    _fail_fast_if_multiprocess()
    raise
  print(json.dumps(result, indent=2, default=str))


def _fail_fast_if_multiprocess() -> None:
  """In a multi-process job, prints the traceback and exits with status 1 at once (the
  other processes would otherwise hold the job in JAX's shutdown barrier for minutes);
  a single process lets the exception propagate as usual."""
  if jax.process_count() > 1:
    traceback.print_exc()
    print(f"error: process {jax.process_index()} failed (traceback above); stopping the job.",
          file=sys.stderr)
    distributed.exit_without_barrier(1)


parse_flags = flags_parser(
    "python -m mdm_jax.main --config=NAME[:variants] --workdir=DIR "
    "[--mode=train|eval|sample|score|prepare|distill] [--config.KEY=VALUE ...]")


def run() -> None:
  """Parses the command line and runs the mode (``mdm_jax.main.run`` first tunes malloc)."""
  app.run(main, flags_parser=parse_flags)
