"""Token streams, train/eval split and the Grain input pipeline for text.

The corpus is tokenised once into a single int32 stream (cached in the
workdir), its tail is held out for evaluation, and both parts are packed into
non-overlapping rows of ``seq_len`` tokens.  With ``data.token_order = "context"``
(or "random") the vocabulary is then renumbered, from the training rows' neighbour
statistics (``mdm_jax.data.token_order``; cached in the workdir too).  Training batches
come from an infinite, per-epoch reshuffled Grain dataset whose iterator state is
checkpointable; eval batches are a fixed, padded and weighted list (``batching.py``,
shared by every dataset).  Registered datasets: ``shakespeare`` (the embedded corpus)
and ``text_files`` (``data.path``: files, globs, comma-separated).
"""

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

from absl import logging
import grain
import numpy as np

from mdm_jax.core import paths
import mdm_jax.data.corpora as corpora
import mdm_jax.data.token_order as token_order_lib
import mdm_jax.data.tokenizers as tokenizers_lib
from mdm_jax.data.base import DATASETS, Data
from mdm_jax.data.batching import as_example, process_eval_batches, process_train_batches
from mdm_jax.metrics.text import corpus_vocabulary, known_bigram_rate, known_word_rate

TOKENS_FILE = "tokens.npy"
TOKENS_META_FILE = "tokens_meta.json"


def _cache_dir(workdir: Optional[str]) -> Optional[str]:
  return paths.join(workdir, "tokenizer") if workdir else None


def _tokens_key(text: str, tokenizer: tokenizers_lib.Tokenizer, data_config) -> str:
  h = hashlib.sha256()
  h.update(text.encode("utf-8", errors="surrogatepass"))
  h.update(tokenizer.fingerprint().encode("ascii"))
  h.update(json.dumps(tokenizers_lib.tokenizer_settings(data_config), sort_keys=True).encode())
  return f"{len(text)}-{h.hexdigest()}"


def _load_cached_tokens(cache_dir: str, key: str) -> Optional[np.ndarray]:
  meta_path = paths.join(cache_dir, TOKENS_META_FILE)
  tokens_path = paths.join(cache_dir, TOKENS_FILE)
  if not (paths.exists(meta_path) and paths.exists(tokens_path)):
    return None
  try:
    meta = json.loads(paths.read_text(meta_path))
    if meta.get("key") != key:
      return None
    tokens = np.load(io.BytesIO(paths.read_bytes(tokens_path)), allow_pickle=False)
  except (OSError, ValueError) as e:
    logging.warning("Ignoring the unreadable token cache in %s: %s", cache_dir, e)
    return None
  if tokens.dtype != np.int32 or tokens.ndim != 1 or len(tokens) != meta.get("num_tokens"):
    return None
  return tokens


def _save_tokens(cache_dir: str, key: str, tokens: np.ndarray) -> None:
  """Caches the token stream for the next run; a cache that cannot be written (a full
  disk) is skipped with a warning, since training does not need it."""
  buf = io.BytesIO()
  np.save(buf, tokens, allow_pickle=False)
  try:
    tokenizers_lib.atomic_write(paths.join(cache_dir, TOKENS_FILE), buf.getvalue())
    tokenizers_lib.atomic_write(paths.join(cache_dir, TOKENS_META_FILE),
                                json.dumps({"key": key, "num_tokens": int(len(tokens))}))
  except OSError as e:
    print(f"warning: the token cache was not written in {cache_dir} ({e}); the next run "
          "tokenizes again.", file=sys.stderr, flush=True)


ORDER_FILE = "token_order.json"
ORDER_TEXT_FILE = "token_order.txt"


def _load_cached_order(cache_dir: str, key: str, vocab_size: int) -> Optional[np.ndarray]:
  path = paths.join(cache_dir, ORDER_FILE)
  if not paths.exists(path):
    return None
  try:
    saved = json.loads(paths.read_text(path))
    order = np.asarray(saved["order"], np.int64)
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("Ignoring the unreadable vocabulary order %s (%s): recomputing it.", path, e)
    return None
  if saved.get("key") != key:
    return None
  if not token_order_lib.is_permutation(order, vocab_size):
    logging.warning("Ignoring %s: not a permutation of the %d-token vocabulary; recomputing it.",
                    path, vocab_size)
    return None
  return order


def apply_token_order(data_config, tokenizer: tokenizers_lib.Tokenizer, train: np.ndarray,
                      evals: np.ndarray, workdir: Optional[str] = None):
  """Renumbers the vocabulary as ``data.token_order`` says (see ``mdm_jax.data.token_order``).

  The order is computed from the *training* rows only and cached in
  ``workdir/tokenizer/token_order.json`` under a key of the tokenizer and those
  rows, so a resumed or sampling run reuses exactly the same numbering;
  ``token_order.txt`` next to it lists the tokens in their new order (each run of
  b**(ell-1) lines is one value of Prime's first digit).

  Args:
    data_config: the ``config.data`` block (``token_order``: "id", "context" or
      "random", the last seeded by ``shuffle_seed``).
    tokenizer: the tokenizer that produced the rows.
    train, evals: int32 row arrays in the tokenizer's numbering.
    workdir: where to cache the order; None computes it every time.

  Returns:
    (tokenizer, train, evals): unchanged for "id"; otherwise a
    ``ReorderedTokenizer`` and the rows in its numbering.

  Raises:
    ValueError: an unknown ``data.token_order`` (from ``compute_order``).
  """
  kind = token_order_lib.configured(data_config)
  if kind == "id":
    return tokenizer, train, evals
  vocab_size = tokenizer.vocab_size
  seed = int(data_config.get("shuffle_seed", 0))
  h = hashlib.sha256()
  h.update(tokenizer.fingerprint().encode("ascii"))
  h.update(np.ascontiguousarray(train, dtype=np.int32).tobytes())
  h.update(str(seed).encode() if kind == "random" else b"")
  key = f"{kind}-{train.size}-{h.hexdigest()}"
  cache_dir = _cache_dir(workdir)
  order = _load_cached_order(cache_dir, key, vocab_size) if cache_dir else None
  cached = order is not None
  if cached:
    logging.info("Loaded the vocabulary order (data.token_order=%r) from %s.", kind, cache_dir)
  else:
    start = time.time()
    order = token_order_lib.compute_order(kind, train.reshape(-1), vocab_size, seed)
    logging.info("Numbered the %d-token vocabulary (data.token_order=%r) in %.1f s.",
                 vocab_size, kind, time.time() - start)
  reordered = tokenizers_lib.ReorderedTokenizer(tokenizer, order, kind)
  if cache_dir and not cached:
    paths.makedirs(cache_dir)
    tokenizers_lib.atomic_write(paths.join(cache_dir, ORDER_FILE), json.dumps(
        {"key": key, "order_kind": kind, "order": order.tolist()}))
    lines = [f"{i}\t{int(old)}\t{tokenizer.decode([int(old)])!r}" for i, old in enumerate(order)]
    tokenizers_lib.atomic_write(paths.join(cache_dir, ORDER_TEXT_FILE),
                                "new id\told id\ttoken\n" + "\n".join(lines) + "\n")
    logging.info("Wrote the vocabulary order to %s (%s lists the tokens in their new order).",
                 cache_dir, ORDER_TEXT_FILE)
  return reordered, reordered.rank[train], reordered.rank[evals]


def _tokenize_text(data_config, text: str,
                   workdir: Optional[str]) -> Tuple[np.ndarray, tokenizers_lib.Tokenizer]:
  cache_dir = _cache_dir(workdir)
  tokenizer = tokenizers_lib.build_tokenizer(data_config, text, cache_dir)
  if cache_dir:
    key = _tokens_key(text, tokenizer, data_config)
    tokens = _load_cached_tokens(cache_dir, key)
    if tokens is not None:
      logging.info("Loaded %d cached tokens from %s.", len(tokens), cache_dir)
      return tokens, tokenizer
  tokens = np.ascontiguousarray(tokenizer.encode(text), dtype=np.int32)
  if cache_dir:
    _save_tokens(cache_dir, key, tokens)
  return tokens, tokenizer


def tokenize_corpus(data_config,
                    workdir: Optional[str] = None) -> Tuple[np.ndarray, tokenizers_lib.Tokenizer]:
  """Loads the corpus and encodes it into one token stream.

  Args:
    data_config: the ``config.data`` block.
    workdir: if given, the tokenizer and the encoded stream are cached in
      ``workdir/tokenizer/`` and reused by later calls with the same corpus and
      settings.

  Returns:
    (1-D int32 token stream, tokenizer), in the tokenizer's own numbering
    (``make_text_data`` applies ``data.token_order`` after the train/eval split).
  """
  return _tokenize_text(data_config, corpora.load_corpus(data_config), workdir)


def split_and_pack(tokens: np.ndarray, seq_len: int,
                   eval_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
  """Holds out the tail of the stream for eval and packs both parts into rows.

  Args:
    tokens: 1-D token stream.
    seq_len: tokens per row.
    eval_fraction: fraction of the tokens held out (the tail of the stream);
      at least one row is always held out.

  Returns:
    (train [N, seq_len], eval [M, seq_len]) int32 arrays of non-overlapping
    rows, N >= 1 and M >= 1. Ragged ends are dropped.

  Raises:
    ValueError: bad arguments, or too few tokens for one train and one eval row.
  """
  tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
  seq_len = int(seq_len)
  if seq_len <= 0:
    raise ValueError(f"data.seq_len={seq_len} must be positive.")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1).")
  n = len(tokens)
  if n < 2 * seq_len:
    raise ValueError(
        f"The corpus is too small for data.seq_len={seq_len}: it has {n} tokens, and at least "
        f"{2 * seq_len} are needed (one train and one eval sequence). Use a smaller data.seq_len "
        f"(at most {n // 2}) or a larger corpus.")
  eval_rows = max(1, int(n * eval_fraction) // seq_len)
  train_rows = (n - eval_rows * seq_len) // seq_len
  if train_rows < 1:
    raise ValueError(
        f"data.eval_fraction={eval_fraction} leaves no training sequence of {seq_len} tokens "
        f"out of {n} tokens. Lower data.eval_fraction.")
  eval_start = n - eval_rows * seq_len
  train = tokens[:train_rows * seq_len].reshape(train_rows, seq_len)
  evals = tokens[eval_start:].reshape(eval_rows, seq_len)
  return np.ascontiguousarray(train), np.ascontiguousarray(evals)


@dataclasses.dataclass
class TextData(Data):
  """A tokenised corpus split into packed train and eval rows.

  Attributes:
    tokenizer: the tokenizer that produced the rows.
    train: int32 [N, seq_len] training rows.
    eval: int32 [M, seq_len] held-out rows (the tail of the corpus).
    known_words: the corpus's words, lower-cased (``corpus_words``), for the
      samples' known-word rate; None where the text is not at hand.
    known_bigrams: the corpus's in-line word pairs (``corpus_bigrams``), for the
      samples' known-bigram rate; None where the text is not at hand.
  """
  tokenizer: tokenizers_lib.Tokenizer
  train: np.ndarray
  eval: np.ndarray
  known_words: Optional[frozenset] = None
  known_bigrams: Optional[frozenset] = None

  @property
  def seq_len(self) -> int:
    return int(self.train.shape[1])

  def train_dataset(self, global_batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.IterDataset:
    """Infinite stream of this process's training batches, reshuffled every epoch.

    See ``process_train_batches``: global batch ``g`` is rows ``[g*B, (g+1)*B)``
    of one seeded order over all rows, and process ``p`` of ``P`` gets its
    ``p``-th contiguous slice, so the processes' batches concatenated equal the
    one-process batch. ``iter(ds)`` has ``get_state()`` / ``set_state()``.

    Args:
      global_batch_size: sequences per step over all processes.
      seed: shuffle seed (each epoch uses a different order derived from it).
      process_index: this process's index.
      process_count: number of processes.

    Returns:
      A ``grain.IterDataset`` of ``{"tokens": int32 [global_batch_size //
      process_count, seq_len]}``.

    Raises:
      ValueError: the batch does not divide over processes or exceeds the rows.
    """
    return process_train_batches(self.train, global_batch_size, seed, process_index,
                                 process_count, transform=as_example, seq_len=self.seq_len)

  def eval_batches(self, batch_size: int, num_batches: int, process_index: int = 0,
                   process_count: int = 1) -> List[Dict[str, np.ndarray]]:
    """A fixed, unshuffled list of this host's eval batches.

    Global batch ``g`` holds eval rows ``[g * batch_size, (g + 1) * batch_size)``;
    host ``p`` gets the ``p``-th slice of ``batch_size // process_count`` rows.
    Rows past the end of the eval split are zeros with weight 0, so every batch
    has the same shape and padding is excluded from metrics.

    Args:
      batch_size: global eval batch size.
      num_batches: number of batches; 0 (or more than available) = the whole
        eval split.
      process_index: this host's index.
      process_count: number of hosts.

    Returns:
      A list of ``{"tokens": int32 [local, seq_len], "weights": float32 [local]}``.
      Every host gets the same number of batches.

    Raises:
      ValueError: empty eval split or a batch that does not divide over hosts.
    """
    return process_eval_batches(lambda idx: self.eval[idx], len(self.eval), self.seq_len,
                                batch_size, num_batches, process_index, process_count)


  def describe_samples(self, tokens):
    """The decoded texts and, where the corpus is at hand, their known-word and
    known-word-pair rates (``mdm_jax.metrics.text``)."""
    texts, stats = super().describe_samples(tokens)
    if self.known_words:
      stats["known_word_rate"], stats["num_words"] = known_word_rate(texts, self.known_words)
    if self.known_bigrams:
      stats["known_bigram_rate"], stats["num_bigrams"] = known_bigram_rate(texts,
                                                                           self.known_bigrams)
    return texts, stats


@DATASETS.register("shakespeare")
@DATASETS.register("text_files")
def make_text_data(data_config, workdir: Optional[str] = None) -> TextData:
  """Corpus -> tokenizer -> token stream -> packed train/eval rows.

  Args:
    data_config: the ``config.data`` block (dataset, path, tokenizer,
      bpe_vocab_size, gpt2_bpe_path, seq_len, eval_fraction, token_order).
    workdir: where to cache the tokenizer and tokens (``workdir/tokenizer/``);
      None disables caching.

  Returns:
    A ``TextData``.
  """
  text = corpora.load_corpus(data_config)
  tokens, tokenizer = _tokenize_text(data_config, text, workdir)
  train, evals = split_and_pack(tokens, int(data_config.seq_len), float(data_config.eval_fraction))
  tokenizer, train, evals = apply_token_order(data_config, tokenizer, train, evals, workdir)
  logging.info(
      "Data %s: %d chars; %s tokenizer, vocab %d; %d tokens (%.3f tokens/char); "
      "train %d tokens = %d x %d; eval %d tokens = %d x %d.", data_config.dataset, len(text),
      tokenizer.name, tokenizer.vocab_size, len(tokens), len(tokens) / max(len(text), 1),
      train.size, train.shape[0], train.shape[1], evals.size, evals.shape[0], evals.shape[1])
  known_words, known_bigrams = corpus_vocabulary(text)
  return TextData(tokenizer=tokenizer, train=train, eval=evals, known_words=known_words,
                  known_bigrams=known_bigrams)
