"""Readability measures of sampled text: corpus-word and corpus-word-pair rates, entropy.

Neither rate is a likelihood.  The known-word rate rewards spelling (a model that has
learnt words writes corpus words; BPE soup does not); the known-bigram rate is a coarse
grammar measure (corpus words strung together at random rarely form pairs the corpus
contains).  Held-out Shakespeare scores about 1 and 0.65 on the default corpus.
"""

from __future__ import annotations

import re
from typing import Sequence, Tuple

import numpy as np


WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def _line_words(text: str):
  """Per line of a text, its lower-cased words (letters, inner apostrophes)."""
  for line in text.splitlines():
    yield [w.lower() for w in WORD_RE.findall(line)]


def _pairs(words):
  """Adjacent word pairs of one line, as "w1 w2"."""
  return [f"{a} {b}" for a, b in zip(words, words[1:])]


def corpus_words(text: str) -> frozenset:
  """The set of lower-cased words (letters, inner apostrophes) of a text."""
  return frozenset(w.lower() for w in WORD_RE.findall(text))


def corpus_bigrams(text: str) -> frozenset:
  """The set of adjacent word pairs within a line of a text (see ``known_bigram_rate``)."""
  return frozenset(p for ws in _line_words(text) for p in _pairs(ws))


def corpus_vocabulary(text: str) -> Tuple[frozenset, frozenset]:
  """(``corpus_words``, ``corpus_bigrams``) of a text, in one pass over its lines."""
  words, pairs = set(), set()
  for ws in _line_words(text):
    words.update(ws)
    pairs.update(_pairs(ws))
  return frozenset(words), frozenset(pairs)


def _known_fraction(items, known) -> Tuple[float, int]:
  """(fraction of ``items`` that are in ``known``, number of items); (0, 0) for none."""
  if not items:
    return 0.0, 0
  return sum(i in known for i in items) / len(items), len(items)


def known_bigram_rate(texts: Sequence[str], known_bigrams) -> Tuple[float, int]:
  """(fraction of the texts' in-line word pairs that occur in ``known_bigrams``, number of pairs).

  A coarse grammar measure next to ``known_word_rate``: corpus words strung together
  at random ("thy the of to") rarely form pairs the corpus contains, while locally
  grammatical text does.  Held-out Shakespeare scores about 0.65 against the pairs of
  the training part (docs/results/text_default.md); like the word rate it is no likelihood.
  """
  return _known_fraction([p for t in texts for ws in _line_words(t) for p in _pairs(ws)],
                         known_bigrams)


def known_word_rate(texts: Sequence[str], known_words) -> Tuple[float, int]:
  """(fraction of the texts' words that occur in ``known_words``, number of words).

  A readability measure for samples: a model that has learnt to spell writes
  corpus words; BPE soup ("Tathtain your rseit") does not.  Real held-out text
  scores near 1; this is no likelihood and rewards nothing about grammar.
  """
  return _known_fraction([w.lower() for t in texts for w in WORD_RE.findall(t)], known_words)


def unigram_entropy(tokens: np.ndarray) -> float:
  """Mean over rows of the entropy (nats) of each row's token histogram."""
  ents = []
  for row in np.asarray(tokens):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    ents.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(ents)) if ents else 0.0


def token_entropy(ids: np.ndarray) -> float:
  """Entropy (nats) of the empirical unigram distribution of ``ids``."""
  if len(ids) == 0:
    return 0.0
  _, counts = np.unique(ids, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())
