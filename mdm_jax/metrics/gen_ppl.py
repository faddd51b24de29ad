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

A GPT-2 folder is the other scorer (``gpt2:FOLDER``, ``mdm_jax.networks.gpt2``): it scores
with the peers' protocol instead (``score_texts_judge``): rows of ``max_length`` (1024)
judge tokens, truncated and padded with EOS, scored in chunks of the judge's context,
tokens 2..n of each chunk, up to and including the first EOS.  docs/evaluation.md states
both protocols exactly.

Setting ``sampling.scorer_workdir`` to an AR run (or ``gpt2:FOLDER``) adds ``gen_ppl`` to
the stats of every sample a training or sampling run writes.  This module only scores: a ``Scorer``
carries a predict function (per-token NLL of a batch of token rows) and a tokenizer;
``mdm_jax.trainers.inference.load_scorer`` restores one from an AR run.
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    protocol: "bos_windows" (an AR run of this library: windows that start from BOS,
      every token scored) or "judge" (the peers' GPT-2 protocol, ``score_texts_judge``;
      ``token_nll`` then returns 0 in column 0, which nothing predicts).
    max_length: "judge": the judge tokens kept per text (truncated, then padded with EOS).
    eos_id: "judge": the judge's EOS id (also its padding).
    features: optional int32 [B, seq_len] -> float [B, seq_len, D], the judge's final hidden
      states (after its last LayerNorm), for ``text_features`` and ``mauve_score``.
  """
  token_nll: Callable[[np.ndarray], Any]
  tokenizer: Any
  seq_len: int
  name: str = ""
  step: int = 0
  eval_rows: Optional[np.ndarray] = None
  protocol: str = "bos_windows"
  max_length: int = 1024
  eos_id: int = 50256
  features: Optional[Callable[[np.ndarray], Any]] = None

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
  if scorer.protocol == "judge":
    return score_texts_judge(scorer, texts, batch_size)
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


def judge_rows(encoded: Sequence[np.ndarray], max_length: int, context: int,
               eos_id: int) -> Tuple[np.ndarray, np.ndarray]:
  """The peers' judge rows: tokens [N, max_length'] and the 0/1 mask of counted tokens.

  Each text's judge ids are truncated to ``max_length`` and padded with EOS to
  ``max_length`` rounded up to a multiple of ``context``; the rows are cut into chunks of
  ``context`` tokens, and within a chunk position 0 is never counted (nothing predicts it).
  Of the other positions, a row counts every token up to and including its first EOS at
  a position >= 1 and nothing after it: a text shorter than ``max_length`` is charged
  one EOS, for ending where it ends.
  """
  width = -(-int(max_length) // int(context)) * int(context)
  toks = np.full((len(encoded), width), eos_id, np.int32)
  for i, e in enumerate(encoded):
    e = np.asarray(e, np.int32)[:max_length]
    toks[i, :len(e)] = e
  toks[:, max_length:] = eos_id
  eos = toks == eos_id
  eos[:, 0] = False
  before = np.cumsum(eos, axis=1) - eos          # EOS strictly before each position
  mask = (before == 0).astype(np.float32)
  mask[:, int(max_length):] = 0.0
  mask[:, ::int(context)] = 0.0                  # each chunk's first token is context only
  return toks, mask


def score_texts_judge(scorer: Scorer, texts: Sequence[str], batch_size: int = 16
                      ) -> Dict[str, Any]:
  """Generative perplexity with the peers' protocol (a GPT-2 judge; ``judge_rows``).

  Returns the keys of ``score_texts`` (``entropy``: unigram entropy of the counted
  judge tokens of all texts together), plus ``sample_entropy``: the mean over texts of
  each text's unigram entropy of its own judge ids (truncated, no padding), the number
  that the papers report beside generative perplexity.
  """
  if not texts:
    raise ScoreError("No texts to score.")
  encoded = [np.asarray(scorer.tokenizer.encode(t), np.int32)[:scorer.max_length]
             for t in texts]
  if not sum(len(e) for e in encoded):
    raise ScoreError("The texts encode to no tokens; nothing to score.")
  toks, mask = judge_rows(encoded, scorer.max_length, scorer.seq_len, scorer.eos_id)
  n, width = toks.shape
  chunks = toks.reshape(n * width // scorer.seq_len, scorer.seq_len)
  pad = -len(chunks) % batch_size                 # one compiled shape for every batch
  chunks = np.concatenate([chunks, np.full((pad, scorer.seq_len), scorer.eos_id, np.int32)])
  nll = np.concatenate([np.asarray(scorer.token_nll(chunks[i:i + batch_size]), np.float64)
                        for i in range(0, len(chunks), batch_size)])[:n * width // scorer.seq_len]
  nll = nll.reshape(n, width) * mask
  per_text, counts = nll.sum(axis=1), mask.sum(axis=1)
  total, count = float(per_text.sum()), int(counts.sum())
  if not count:
    raise ScoreError("No judge token is counted (every text is a single token).")
  counted = toks[mask > 0]
  n_chars = sum(len(t) for t in texts)
  return {
      "gen_ppl": float(np.exp(total / count)),
      "nats_per_token": total / count,
      "nats_per_char": total / max(n_chars, 1),
      "entropy": token_entropy(counted),
      "sample_entropy": float(np.mean([token_entropy(e) for e in encoded])),
      "distinct_tokens": float(len(np.unique(counted)) / len(counted)),
      "num_texts": len(texts), "num_tokens": count, "num_chars": n_chars,
      "per_text": [float(np.exp(s / c)) if c else None for s, c in zip(per_text, counts)],
      "scorer": scorer.workdir, "scorer_step": scorer.step, "protocol": "judge",
      "max_length": int(scorer.max_length), "context": int(scorer.seq_len),
  }


def text_features(scorer: Scorer, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
  """One feature vector per text [N, D]: the judge's final hidden state at the text's last
  token, the text's judge ids truncated to ``max_length`` (and to the last ``seq_len`` of
  those when the judge's context is shorter).

  Raises:
    ScoreError: the scorer has no features, or a text encodes to no token.
  """
  if scorer.features is None:
    raise ScoreError(f"The scorer {scorer.workdir} gives no features (MAUVE needs a judge "
                     "with hidden states, e.g. gpt2:FOLDER).")
  encoded = [np.asarray(scorer.tokenizer.encode(t), np.int32)[:scorer.max_length][-scorer.seq_len:]
             for t in texts]
  if any(len(e) == 0 for e in encoded):
    raise ScoreError("A text encodes to no judge token; it has no features.")
  rows = np.full((len(encoded), scorer.seq_len), scorer.eos_id, np.int32)
  for i, e in enumerate(encoded):
    rows[i, :len(e)] = e
  last = np.array([len(e) - 1 for e in encoded])
  pad = -len(rows) % batch_size
  rows = np.concatenate([rows, np.full((pad, scorer.seq_len), scorer.eos_id, np.int32)])
  out = []
  for i in range(0, len(rows), batch_size):
    h = np.asarray(scorer.features(rows[i:i + batch_size]), np.float32)
    out.append(h)
  h = np.concatenate(out)[:len(encoded)]
  return h[np.arange(len(encoded)), last]


def mauve_score(scorer: Scorer, reference: Sequence[str], samples: Sequence[str],
                num_buckets: Any = "auto", scaling_factor: float = 5.0, seed: int = 25,
                batch_size: int = 16) -> Dict[str, Any]:
  """MAUVE of ``samples`` against ``reference`` texts on the judge's features.

  The divergence-frontier computation is the ``mauve-text`` package's (``compute_mauve``
  with ``p_features`` = the reference's, ``q_features`` = the samples'), at its defaults:
  k-means buckets ``auto`` (a tenth of the number of texts), scaling factor 5.  Only the
  features come from here (``text_features``), so no torch is needed.
  """
  try:
    import mauve  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("MAUVE needs the mauve-text package: pip install mauve-text") from e
  p = text_features(scorer, reference, batch_size)
  q = text_features(scorer, samples, batch_size)
  out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets,
                            mauve_scaling_factor=scaling_factor, seed=seed, verbose=False)
  return {"mauve": float(out.mauve), "num_reference": len(reference),
          "num_samples": len(samples), "scorer": scorer.workdir}


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
  if reference and lengths and scorer.eval_rows is not None:   # a GPT-2 judge has no corpus
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
