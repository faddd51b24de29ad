"""Samples from a train state: generate, describe, score, write and show them.

The task generates (``Task.generate``); the dataset describes the samples (texts and
their word rates, or nothing for images) and writes them (``.txt`` + ``.json``, or a
PNG grid); an optional ``Scorer`` (an AR run, ``sampling.scorer_workdir``) adds their
generative perplexity.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional

import numpy as np

from mdm_jax.metrics.gen_ppl import score_texts


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
  if write:
    header = f"step {step}, {stats['sampler']}, T={stats['num_steps']}"
    stats.update(data.write_samples(tokens, texts, stats, os.path.join(workdir, "samples"),
                                    name or f"step_{step}", header=header))
    print(data.show_samples(texts, stats, header), file=sys.stderr, flush=True)
  return {"texts": texts, **stats}
