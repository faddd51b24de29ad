"""Samples from a train state: generate, describe, score, write and show them.

The task generates (``Task.generate``); the dataset describes the samples (texts and
their word rates, or nothing for images) and writes them (``.txt`` + ``.json``, or a
PNG grid); an optional ``Scorer`` (an AR run, ``sampling.scorer_workdir``) adds their
generative perplexity.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, Optional

import numpy as np

from mdm_jax.core import paths
from mdm_jax.metrics.gen_ppl import score_texts
from mdm_jax.pictures.pixels import write_png


def sample_and_write(task, params, config, data, workdir: str, step: int, *, mesh=None,
                     rules=None, write: bool = True, scorer=None,
                     name: Optional[str] = None) -> Dict[str, Any]:
  """Generates ``sampling.num_samples`` samples and writes ``samples/<name>.*``.

  ``name`` defaults to ``step_N``.  The stats include what the dataset measures
  (``known_word_rate``, ``known_bigram_rate`` for text) and, with a ``scorer``,
  ``gen_ppl`` with ``gen_entropy`` and ``gen_nats_per_char``.  The JSON holds the texts
  too, so ``--mode=score`` can score them later.  Returns the stats and the texts.
  """
  res, stats = task.generate(params, config, mesh=mesh, rules=rules)
  tokens = np.asarray(res.tokens)
  texts, extra = data.describe_samples(tokens)
  stats.update(extra)
  if scorer is not None and texts:
    scored = score_texts(scorer, texts)
    stats.update(gen_ppl=scored["gen_ppl"], gen_nats_per_char=scored["nats_per_char"],
                 gen_entropy=scored["entropy"], scorer=scored["scorer"])
  stats["sampling"] = sampling_settings(config)
  if write:
    header = f"step {step}, {stats['sampler']}, T={stats['num_steps']}"
    out_dir, name = paths.join(workdir, "samples"), name or f"step_{step}"
    stats.update(data.write_samples(tokens, texts, stats, out_dir, name, header=header))
    for key, picture in task.sample_pictures(res, sampler=stats["sampler"]).items():
      stats[f"{key}_png"] = write_png(paths.join(out_dir, f"{name}_{key}.png"), picture)
    print(data.show_samples(texts, stats, header), file=sys.stderr, flush=True)
  return {"texts": texts, **stats}


def sampling_settings(config) -> Dict[str, Any]:
  """The ``sampling`` block as plain values (written into each samples JSON)."""
  block = config.sampling
  block = block.to_dict() if hasattr(block, "to_dict") else dict(block)
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in block.items()}


def sample_file_name(config, step: int, out_dir: str) -> str:
  """``step_N-SAMPLER-TSTEPS-seedS``: the name ``--mode=sample`` writes under ``samples/``.

  Two samplers (or step counts, or seeds) on one checkpoint write two files, and neither
  replaces the training run's ``step_N.*``.  Where a file of that name was written with
  other sampling settings (top-p, temperature, ...), ``-2``, ``-3``... is appended; the
  same settings again give the same samples and reuse the name.
  """
  s = config.sampling
  base = f"step_{int(step)}-{s.sampler}-T{int(s.num_steps)}-seed{int(s.seed)}"
  settings = json.loads(json.dumps(sampling_settings(config)))
  name, k = base, 2
  while True:
    path = paths.join(out_dir, f"{name}.json")
    if not paths.exists(path):
      return name
    try:
      with paths.open(path) as f:
        if json.load(f).get("sampling") == settings:
          return name
    except (OSError, ValueError):
      pass
    name, k = f"{base}-{k}", k + 1
