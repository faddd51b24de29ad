"""Generative perplexity: how likely a trained autoregressive model finds sampled text.

The sample-quality number that text diffusion papers report next to the likelihood
bound (MDLM, SEDD, ReMDM score samples under GPT-2 Large).  Here the scorer is any
AR run of this library (``configs/shakespeare_ar.py`` for the embedded default): the
samples are decoded to text, re-encoded with the *scorer's* tokenizer (so any
tokenizer or token order can be compared), cut into windows of the scorer's
``data.seq_len`` tokens that each start from BOS (as the AR eval bound does), and
scored exactly.

    gen_ppl = exp(sum of -log p(token | left context) / number of scorer tokens)

Lower is better, but a sampler that repeats one line also scores low, so the report
carries the unigram entropy of the scored tokens too (the papers' convention) and the
distinct-token fraction.  Held-out corpus text scored the same way (``reference``)
is the mark that real Shakespeare gets from the same scorer.

    python -m mdm_jax.main --config=shakespeare_ar --workdir=runs/ar \\
        --mode=score --texts=runs/prime/samples/step_1600.json

Setting ``sampling.scorer_workdir`` to an AR run adds ``gen_ppl`` to the stats of
every sample a training or sampling run writes.  This module only scores: a ``Scorer``
carries a predict function (per-token NLL of a batch of token rows) and a tokenizer;
``mdm_jax.trainers.inference.load_scorer`` restores one from an AR run.
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from mdm_jax.metrics.text import token_entropy


class ScoreError(ValueError):
  """Nothing (valid) to score: no texts, no tokens, a samples file without texts."""


_HEADER_RE = re.compile(r"^===== sample \d+ .*=====$", re.M)


@dataclasses.dataclass
class Scorer:
  """An exact token scorer: what ``score_texts`` needs.

  Attributes:
    token_nll: int32 tokens [B, seq_len] -> float [B, seq_len], -log p(token | BOS, left
      context) in nats (an AR model's predict function; each row starts from BOS).
    tokenizer: encodes texts to the scorer's token ids.
    seq_len: the rows' length.
    name: where the scorer comes from (its workdir), for reports.
    step: its training step.
    eval_rows: held-out rows of its corpus, for ``reference_texts``.
  """
  token_nll: Callable[[np.ndarray], Any]
  tokenizer: Any
  seq_len: int
  name: str = ""
  step: int = 0
  eval_rows: Optional[np.ndarray] = None

  @property
  def workdir(self) -> str:
    return self.name


def windows(ids: np.ndarray, seq_len: int):
  """Cuts a token id sequence into [n, seq_len] windows and a 0/1 mask of real tokens."""
  n = max(1, -(-len(ids) // seq_len))
  toks = np.zeros((n * seq_len,), np.int32)
  mask = np.zeros((n * seq_len,), np.float32)
  toks[:len(ids)] = ids
  mask[:len(ids)] = 1.0
  return toks.reshape(n, seq_len), mask.reshape(n, seq_len)


def score_texts(scorer: Scorer, texts: Sequence[str], batch_size: int = 16) -> Dict[str, Any]:
  """Generative perplexity of ``texts`` under ``scorer``.

  Returns:
    ``gen_ppl`` (exp of the mean NLL per scorer token), ``nats_per_token``,
    ``nats_per_char`` (tokenizer-free), ``entropy`` (unigram, of the scored
    tokens of all texts together), ``distinct_tokens`` (fraction of distinct
    ids), the counts, and ``per_text`` gen_ppl.

  Raises:
    ScoreError: no text, or no text that encodes to a token.
  """
  if not texts:
    raise ScoreError("No texts to score.")
  encoded = [np.asarray(scorer.tokenizer.encode(t), np.int32) for t in texts]
  if not sum(len(e) for e in encoded):
    raise ScoreError("The texts encode to no tokens; nothing to score.")
  cut = [windows(e, scorer.seq_len) for e in encoded]
  owner = np.concatenate([np.full(len(w), i) for i, (w, _) in enumerate(cut)])
  toks = np.concatenate([w for w, _ in cut])
  mask = np.concatenate([m for _, m in cut])
  pad = -len(toks) % batch_size                     # one compiled shape for every batch
  toks = np.concatenate([toks, np.zeros((pad, scorer.seq_len), np.int32)])
  mask = np.concatenate([mask, np.zeros((pad, scorer.seq_len), np.float32)])
  nll = np.concatenate([np.asarray(scorer.token_nll(toks[i:i + batch_size]))
                        for i in range(0, len(toks), batch_size)])
  per_window = (nll * mask).sum(axis=1)[:len(owner)]
  per_text = np.zeros(len(texts))
  np.add.at(per_text, owner, per_window)
  n_tok = np.array([len(e) for e in encoded])
  n_chars = sum(len(t) for t in texts)
  total, count = float(per_text.sum()), int(n_tok.sum())
  every = np.concatenate(encoded)
  return {
      "gen_ppl": float(np.exp(total / count)),
      "nats_per_token": total / count,
      "nats_per_char": total / max(n_chars, 1),
      "entropy": token_entropy(every),
      "distinct_tokens": float(len(np.unique(every)) / len(every)),
      "num_texts": len(texts), "num_tokens": count, "num_chars": n_chars,
      "per_text": [float(np.exp(s / n)) if n else None for s, n in zip(per_text, n_tok)],
      "scorer": scorer.workdir, "scorer_step": scorer.step,
  }


def reference_texts(scorer: Scorer, num: int, num_chars: int) -> List[str]:
  """``num`` held-out passages of the scorer's corpus, about ``num_chars`` long each.

  Consecutive eval rows are decoded and cut at ``num_chars`` characters, spread
  evenly over the eval split: real text to score next to the samples.
  """
  rows = scorer.eval_rows
  if rows is None or not len(rows):
    raise ScoreError(f"The scorer's data ({scorer.workdir}) has no held-out rows to quote.")
  text = scorer.tokenizer.decode(np.asarray(rows).reshape(-1))
  if len(text) < num_chars:
    raise ScoreError(f"The held-out text has {len(text)} characters, fewer than {num_chars}.")
  starts = np.linspace(0, len(text) - num_chars, num).astype(int)
  return [text[s:s + num_chars] for s in starts]


def read_texts(path: str) -> List[str]:
  """Texts from a samples file: ``samples/step_N.json`` (its ``texts``),
  ``samples/step_N.txt`` (split at the ``===== sample i`` headers) or any
  other text file (one text).

  Raises:
    FileNotFoundError: no such file.
    ScoreError: a JSON file without a ``texts`` list.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No samples file {path}.")
  with open(path) as f:
    raw = f.read()
  if path.endswith(".json"):
    texts = json.loads(raw).get("texts")
    if not isinstance(texts, list):
      raise ScoreError(f"{path} has no 'texts' list (sample files written before the texts "
                       f"were stored in the JSON: pass the matching .txt file instead).")
    return [str(t) for t in texts]
  if _HEADER_RE.search(raw):
    parts = _HEADER_RE.split(raw)[1:]
    return [p[1:] if p.startswith("\n") else p for p in (q.rstrip("\n") for q in parts)]
  return [raw]


def score_files(scorer: Scorer, paths: Sequence[str], reference: bool = True) -> Dict[str, Any]:
  """Scores each samples file; with ``reference``, also held-out passages of the
  mean sample length, as many as a file has texts on average (the mark real text
  gets; the same count keeps the unigram entropies comparable)."""
  out: Dict[str, Any] = {}
  lengths = []
  for p in paths:
    texts = read_texts(p)
    lengths += [len(t) for t in texts]
    out[p] = score_texts(scorer, texts)
  if reference and lengths:
    refs = reference_texts(scorer, max(1, round(len(lengths) / len(paths))),
                           int(np.mean(lengths)))
    out["reference (held-out text)"] = score_texts(scorer, refs)
  return out


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
  lines = ["| texts | gen ppl | nats/char | entropy | distinct | tokens |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['gen_ppl']:.1f} | {r['nats_per_char']:.3f} | "
                 f"{r['entropy']:.2f} | {r['distinct_tokens']:.2f} | {r['num_tokens']} |")
  return "\n".join(lines)
