"""Data at scale, offline half: ``prepare`` tokenises a text source once into ArrayRecord shards.

``prepare`` (``python -m mdm_jax.main --mode=prepare``) writes fixed-length int32
sequences of ``data.seq_len`` tokens in the format that ``array_record`` owns and
reads (see there for the directory layout).

Sources: the local corpora of ``config.data`` (the embedded Shakespeare or
``text_files`` through ``data.path``; packed exactly like the in-memory text
pipeline), a TFDS dataset (``tfds:NAME``, read with ``tfds.data_source`` in
the array_record file format, no TensorFlow) or a Hugging Face dataset
(``hf:NAME``, needs the ``datasets`` package).  Everything is written into
``OUT.tmp-*`` and renamed to ``OUT`` at the very end, so an interrupted
prepare never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from mdm_jax.core import paths
import mdm_jax.data.corpora as corpora
import mdm_jax.data.text as text_lib
import mdm_jax.data.token_order as token_order_lib
import mdm_jax.data.tokenizers as tokenizers_lib
from mdm_jax.data.array_record import (FORMAT, FORMAT_VERSION, METADATA_FILE, RECORD_DTYPE,
                                       SPLITS, TMP_MARKER, TOKENIZER_FILE, WRITER_OPTIONS,
                                       one_line, shard_name)

DEFAULT_SHARD_BYTES = 128 << 20          # uncompressed bytes per shard

ProgressFn = Callable[[str], None]


class PrepareError(ValueError):
  """``prepare`` cannot run as asked; the message says what to change."""


# ------------------------------------------------------------------ writing
class _SplitWriter:
  """Writes int32 rows of one split into numbered shards inside the temp dir."""

  def __init__(self, directory: str, split: str, seq_len: int, records_per_shard: int):
    self._dir = directory
    self._split = split
    self._seq_len = seq_len
    self._per_shard = records_per_shard
    self._writer = None
    self._counts: List[int] = []
    self.num_sequences = 0

  def _partial(self, index: int) -> str:
    return os.path.join(self._dir, f"{self._split}-{index:05d}.partial")

  def _open_next(self) -> None:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    self._close_current()
    self._writer = array_record_module.ArrayRecordWriter(self._partial(len(self._counts)),
                                                         WRITER_OPTIONS)
    self._counts.append(0)

  def _close_current(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def write(self, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows, dtype=RECORD_DTYPE)
    if rows.ndim != 2 or rows.shape[1] != self._seq_len:
      raise AssertionError(f"rows of shape {rows.shape}, expected [n, {self._seq_len}]")
    for row in rows:
      if self._writer is None or self._counts[-1] >= self._per_shard:
        self._open_next()
      self._writer.write(row.tobytes())
      self._counts[-1] += 1
    self.num_sequences += len(rows)

  @property
  def num_shards(self) -> int:
    return len(self._counts)

  def finish(self) -> List[Dict[str, Any]]:
    """Closes the last shard and gives every shard its final ``-of-N`` name."""
    self._close_current()
    n = len(self._counts)
    shards = []
    for i, count in enumerate(self._counts):
      name = shard_name(self._split, i, n)
      os.replace(self._partial(i), os.path.join(self._dir, name))
      shards.append({"file": name, "num_sequences": count})
    return shards


class _Progress:
  """Rate-limited progress lines (sequences, tokens, shards, time)."""

  def __init__(self, fn: Optional[ProgressFn], seq_len: int, every_s: float = 10.0):
    self._fn = fn
    self._seq_len = seq_len
    self._every = every_s
    self._start = time.time()
    self._last = self._start

  def elapsed(self) -> float:
    return time.time() - self._start

  def report(self, split: str, writer: _SplitWriter, force: bool = False, extra: str = "") -> None:
    now = time.time()
    if self._fn is None or (not force and now - self._last < self._every):
      return
    self._last = now
    n = writer.num_sequences
    self._fn(f"prepare: {split}: {n:,} sequences, {n * self._seq_len:,} tokens, "
             f"{writer.num_shards} shard(s), {now - self._start:.1f} s{extra}")


def _pack_docs(docs: Iterable[str], tokenizer: tokenizers_lib.Tokenizer, writer: _SplitWriter,
               seq_len: int, progress: _Progress, split: str,
               chunk_chars: int = 1 << 20) -> Dict[str, int]:
  """Streams documents into packed rows: documents joined by blank lines, ragged end dropped.

  Documents are gathered into chunks of about ``chunk_chars`` characters and
  each chunk is encoded at once; the token stream is cut into rows of
  ``seq_len`` tokens exactly as ``text.split_and_pack`` cuts one stream.
  """
  carry = np.zeros((0,), np.int32)
  pieces: List[str] = []
  size = 0
  stats = {"documents": 0, "characters": 0, "tokens": 0}

  def flush():
    nonlocal carry
    tokens = np.asarray(tokenizer.encode("".join(pieces)), np.int32)
    stats["tokens"] += len(tokens)
    stream = np.concatenate([carry, tokens])
    rows = len(stream) // seq_len
    if rows:
      writer.write(stream[:rows * seq_len].reshape(rows, seq_len))
    carry = stream[rows * seq_len:]
    pieces.clear()
    progress.report(split, writer)

  for doc in docs:
    if not doc:
      continue
    piece = doc if stats["documents"] == 0 else "\n\n" + doc
    stats["documents"] += 1
    stats["characters"] += len(doc)
    pieces.append(piece)
    size += len(piece)
    if size >= chunk_chars:
      flush()
      size = 0
  if pieces:
    flush()
  stats["dropped_tokens"] = int(len(carry))
  return stats


# ------------------------------------------------------------------ sources
def parse_source(spec: str) -> Tuple[str, str]:
  """``""`` -> ("corpus", ""); ``"tfds:lm1b"`` -> ("tfds", "lm1b"); ``"hf:NAME"`` -> ("hf", NAME).

  Raises:
    PrepareError: any other form.
  """
  spec = (spec or "").strip()
  if not spec or spec == "corpus":
    return "corpus", ""
  kind, sep, name = spec.partition(":")
  if sep and kind in ("tfds", "hf") and name.strip():
    return kind, name.strip()
  raise PrepareError(f"Unknown source {spec!r}: use no --source (the corpus named by "
                     "config.data.dataset / data.path), tfds:NAME (e.g. tfds:lm1b) or hf:NAME "
                     "(e.g. hf:Skylion007/openwebtext).")


def _as_text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _as_text(value.item())
  return str(value)


def _field(example: Any, key: str, where: str) -> str:
  if isinstance(example, (str, bytes, np.bytes_)):
    return _as_text(example)
  try:
    return _as_text(example[key])
  except (KeyError, TypeError, IndexError) as e:
    fields = sorted(example) if isinstance(example, dict) else type(example).__name__
    raise PrepareError(f"{where} examples have no text field {key!r} (fields: {fields}): set "
                       "--text_key to the field holding the text.") from e


def _iter_docs(ds: Any, start: int, stop: int, key: str, where: str,
               batch: int = 1024) -> Iterator[str]:
  """Text of examples ``[start, stop)`` of a random-access dataset (tfds or HF)."""
  columnar = hasattr(ds, "column_names")        # a Hugging Face ``datasets.Dataset``
  for a in range(start, stop, batch):
    b = min(stop, a + batch)
    if columnar:
      cols = ds[a:b]
      if key not in cols:
        raise PrepareError(f"{where} has no column {key!r} (columns: {sorted(cols)}): set "
                           "--text_key to the column holding the text.")
      yield from (_as_text(v) for v in cols[key])
    elif hasattr(ds, "__getitems__"):
      yield from (_field(ex, key, where) for ex in ds.__getitems__(list(range(a, b))))
    else:
      yield from (_field(ds[i], key, where) for i in range(a, b))


def _open_tfds(name: str, split: str, data_dir: Optional[str], download: bool) -> Any:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise PrepareError(f"--source=tfds:{name} needs tensorflow-datasets (no TensorFlow needed): "
                       f"pip install tensorflow-datasets importlib_resources ({one_line(e)}).")
  # Registers mdm_jax's own builders (shakespeare_plays); they import TFDS, so only here.
  import mdm_jax.data.tfds_builders  # pylint: disable=import-outside-toplevel,unused-import
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                            builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # pylint: disable=broad-except
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    if download:
      hint = ("Downloading needs internet access (and a TFDS builder that runs without "
              "TensorFlow); otherwise prepare the dataset where you have internet and pass "
              "--tfds_data_dir.")
    else:
      hint = ("It is not prepared there in the array_record format: pass --tfds_download to "
              "download and prepare it (needs internet), or --tfds_data_dir=DIR where it is.")
    raise PrepareError(f"Could not open TFDS dataset {name!r} split {split!r} in {where}. "
                       f"{hint} ({one_line(e)})") from e


def _open_hf(name: str, config_name: str, split: str) -> Any:
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise PrepareError(f"--source=hf:{name} needs the Hugging Face `datasets` package, which is "
                       f"not installed: pip install datasets ({one_line(e)}).") from e
  try:
    return datasets.load_dataset(name, config_name or None, split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise PrepareError(f"Could not load Hugging Face dataset {name!r} (config "
                       f"{config_name or None!r}, split {split!r}); it needs internet access or "
                       f"a local cache. ({one_line(e)})") from e


@dataclasses.dataclass
class _DocSplits:
  """Train and eval documents of a document source, as (dataset, start, stop) ranges."""
  train: Tuple[Any, int, int]
  eval: Tuple[Any, int, int]
  description: Dict[str, Any]


def _document_splits(kind: str, name: str, *, open_split: Callable[[str], Any], train_split: str,
                     eval_split: str, eval_fraction: float, max_documents: int) -> _DocSplits:
  where = f"{kind}:{name}"
  train_ds = open_split(train_split)
  n = len(train_ds)
  if max_documents > 0:
    n = min(n, int(max_documents))
  desc: Dict[str, Any] = {"kind": kind, "name": name, "train_split": train_split}
  if eval_split:
    eval_ds = open_split(eval_split)
    m = len(eval_ds) if max_documents <= 0 else min(len(eval_ds), int(max_documents))
    if n < 1 or m < 1:
      raise PrepareError(f"{where}: split {train_split!r} has {n} and split {eval_split!r} has "
                         f"{m} documents; both need at least one.")
    desc.update(eval_split=eval_split, train_documents=n, eval_documents=m)
    return _DocSplits((train_ds, 0, n), (eval_ds, 0, m), desc)
  if n < 2:
    raise PrepareError(f"{where}: split {train_split!r} has {n} document(s); holding out eval "
                       "documents needs at least 2 (or give --eval_split).")
  n_eval = min(n - 1, max(1, int(round(n * float(eval_fraction)))))
  desc.update(eval_split=f"last {n_eval} documents of {train_split!r} (data.eval_fraction="
              f"{eval_fraction})", train_documents=n - n_eval, eval_documents=n_eval)
  return _DocSplits((train_ds, 0, n - n_eval), (train_ds, n - n_eval, n), desc)


def _corpus_free_tokenizer(data_config) -> Optional[tokenizers_lib.Tokenizer]:
  """The byte / gpt2 tokenizer (built before any data is read); None for char / bpe."""
  if str(data_config.tokenizer) in ("char", "bpe"):
    return None
  try:
    return tokenizers_lib.build_tokenizer(data_config, "", None)
  except ValueError as e:
    raise PrepareError(str(e)) from e


def _tokenizer_for_documents(data_config, splits: _DocSplits, key: str, where: str,
                             sample_chars: int) -> Tuple[tokenizers_lib.Tokenizer, int]:
  """Builds the char / bpe tokenizer from the first ``sample_chars`` train characters."""
  parts, size = [], 0
  ds, start, stop = splits.train
  for doc in _iter_docs(ds, start, stop, key, where):
    if doc:
      parts.append(doc)
      size += len(doc) + 2
      if size >= sample_chars:
        break
  sample = "\n\n".join(parts)
  try:
    return tokenizers_lib.build_tokenizer(data_config, sample, None), len(sample)
  except ValueError as e:
    raise PrepareError(str(e)) from e


# ------------------------------------------------------------------ prepare
def _auto_records_per_shard(seq_len: int) -> int:
  return max(1, DEFAULT_SHARD_BYTES // (seq_len * RECORD_DTYPE.itemsize))


def _claim_output(output_dir: str, overwrite: bool) -> str:
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise PrepareError(f"The output {output_dir} exists and is not a directory.")
  if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
    raise PrepareError(f"The output directory {output_dir} already exists and is not empty: "
                       "choose another --output or pass --overwrite to replace it.")
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{output_dir}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  return tmp


def prepare(data_config, output_dir: str, *, source: str = "", source_config: str = "",
            train_split: str = "train", eval_split: str = "", text_key: str = "text",
            max_documents: int = 0, tfds_data_dir: Optional[str] = None,
            tfds_download: bool = False, records_per_shard: int = 0,
            tokenizer_sample_chars: int = 20_000_000, overwrite: bool = False,
            progress: Optional[ProgressFn] = None) -> Dict[str, Any]:
  """Tokenises a text source once and writes packed int32 sequences as ArrayRecord shards.

  Args:
    data_config: the ``config.data`` block: ``tokenizer`` (+ ``bpe_vocab_size``,
      ``gpt2_bpe_path``), ``seq_len``, ``eval_fraction`` and, for the default
      source, ``dataset`` / ``path``.
    output_dir: the dataset directory to create (``data.path`` for training).
    source: ``""`` = the corpus of ``data.dataset`` (shakespeare | text_files),
      packed exactly like the in-memory text pipeline; ``"tfds:NAME"`` (any
      ``tfds.data_source`` name, e.g. ``lm1b`` or ``shakespeare_plays``) or
      ``"hf:NAME"`` (``datasets.load_dataset``): documents joined by blank lines.
    source_config: Hugging Face config name (e.g. ``wikitext-103-raw-v1``).
    train_split: the source split the train sequences come from.
    eval_split: the source split for eval; ``""`` holds out the last
      ``data.eval_fraction`` of the train split's documents (at least one).
    text_key: the example field holding the text.
    max_documents: if > 0, use at most this many documents per source split.
    tfds_data_dir: TFDS ``data_dir`` (None = TFDS's default).
    tfds_download: let TFDS download and prepare the dataset (needs internet);
      off, a dataset that is not prepared fails at once.
    records_per_shard: sequences per shard; 0 = about 128 MiB of tokens.
    tokenizer_sample_chars: document sources only: characters of the train
      split the char / bpe tokenizer is built from.
    overwrite: replace an existing, non-empty ``output_dir``.
    progress: called with one-line progress messages.

  Returns:
    The metadata written to ``output_dir/metadata.json``.

  Raises:
    PrepareError: bad arguments or an unusable source (the message says what to do).
    FileNotFoundError: a missing local corpus.
  """
  t0 = time.time()
  output_dir = os.path.abspath(os.path.expanduser(str(output_dir)))
  seq_len = int(data_config.seq_len)
  eval_fraction = float(data_config.eval_fraction)
  if seq_len <= 0:
    raise PrepareError(f"data.seq_len={seq_len} must be positive.")
  kind, name = parse_source(source)
  try:
    tokenizers_lib.tokenizer_settings(data_config)
  except ValueError as e:
    raise PrepareError(str(e)) from e
  order_kind = token_order_lib.configured(data_config)
  if kind != "corpus" and order_kind != "id":
    raise PrepareError(
        f"data.token_order={order_kind!r} renumbers a local corpus's token stream "
        f"in memory, which a streamed --source={source} is not: prepare it with "
        "--config.data.token_order=id (or prepare a local corpus).")
  if kind == "corpus" and str(data_config.dataset) not in corpora.CORPORA:
    raise PrepareError(f"Nothing to prepare from data.dataset={str(data_config.dataset)!r}: set "
                       f"--config.data.dataset to one of {sorted(corpora.CORPORA)} (with "
                       "data.path for text_files), or pass --source=tfds:NAME or hf:NAME.")
  per_shard = int(records_per_shard) or _auto_records_per_shard(seq_len)
  tmp = _claim_output(output_dir, overwrite)
  prog = _Progress(progress, seq_len)
  writers = {s: _SplitWriter(tmp, s, seq_len, per_shard) for s in SPLITS}
  try:
    stats: Dict[str, Dict[str, Any]] = {}
    if kind == "corpus":
      text = corpora.load_corpus(data_config)
      try:
        # pylint: disable-next=protected-access
        tokens, tokenizer = text_lib._tokenize_text(data_config, text, None)
        train_rows, eval_rows = text_lib.split_and_pack(tokens, seq_len, eval_fraction)
        tokenizer, train_rows, eval_rows = text_lib.apply_token_order(
            data_config, tokenizer, train_rows, eval_rows)
        rows = dict(zip(SPLITS, (train_rows, eval_rows)))
      except ValueError as e:      # bad tokenizer settings, corpus too small for seq_len
        raise PrepareError(str(e)) from e
      for split in SPLITS:
        writers[split].write(rows[split])
        prog.report(split, writers[split], force=True)
        stats[split] = {"tokens": int(rows[split].size)}
      description = {"kind": "corpus", "dataset": str(data_config.dataset),
                     "path": str(data_config.path), "characters": len(text),
                     "tokens": int(len(tokens)),
                     "eval_split": f"last {rows['eval'].shape[0]} sequences of the token stream "
                                   f"(data.eval_fraction={eval_fraction})"}
      del text, tokens, rows
    else:
      tokenizer = _corpus_free_tokenizer(data_config)   # fails before any download
      if kind == "tfds":
        open_split = lambda s: _open_tfds(name, s, tfds_data_dir, tfds_download)  # noqa: E731
      else:
        open_split = lambda s: _open_hf(name, source_config, s)  # noqa: E731
      splits = _document_splits(kind, name, open_split=open_split, train_split=train_split,
                                eval_split=eval_split, eval_fraction=eval_fraction,
                                max_documents=int(max_documents))
      description = dict(splits.description, text_key=text_key)
      if kind == "hf" and source_config:
        description["config"] = source_config
      if kind == "tfds":
        description["data_dir"] = tfds_data_dir
      where = f"{kind}:{name}"
      if tokenizer is None:
        tokenizer, sample = _tokenizer_for_documents(data_config, splits, text_key, where,
                                                     int(tokenizer_sample_chars))
        description["tokenizer_sample_characters"] = sample
      for split in SPLITS:
        ds, start, stop = getattr(splits, split)
        stats[split] = _pack_docs(_iter_docs(ds, start, stop, text_key, where), tokenizer,
                                  writers[split], seq_len, prog, split)
        prog.report(split, writers[split], force=True)
        if writers[split].num_sequences < 1:
          more = ("raise data.eval_fraction or give --eval_split" if split == "eval" else
                  "raise --max_documents")
          raise PrepareError(
              f"The {split} split of {where} gives {stats[split]['tokens']} tokens, fewer than "
              f"one sequence of data.seq_len={seq_len}: lower data.seq_len, {more}, or use a "
              "larger dataset.")

    tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
    # The corpus keys (dataset, path) are described by "source" instead.
    settings = {k: v for k, v in tokenizers_lib.tokenizer_settings(data_config).items()
                if k not in ("dataset", "path")}
    split_meta = {}
    for split in SPLITS:
      n = writers[split].num_sequences
      split_meta[split] = dict(num_sequences=n, num_tokens=n * seq_len, num_shards=0,
                               **{k: v for k, v in stats[split].items() if k != "tokens"},
                               source_tokens=int(stats[split]["tokens"]))
      split_meta[split]["shards"] = writers[split].finish()
      split_meta[split]["num_shards"] = len(split_meta[split]["shards"])
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seq_len": seq_len,
        "dtype": "int32",
        "record": f"{seq_len} little-endian int32 token ids per record",
        "writer_options": WRITER_OPTIONS,
        "tokenizer": {"kind": tokenizer.name, "file": TOKENIZER_FILE,
                      "vocab_size": int(tokenizer.vocab_size),
                      "fingerprint": tokenizer.fingerprint(), "settings": settings},
        "vocab_size": int(tokenizer.vocab_size),
        "eval_fraction": eval_fraction,
        "splits": split_meta,
        "source": description,
        "prepare_seconds": round(time.time() - t0, 3),
    }
    # metadata.json is written last, then the whole directory appears at once.
    tokenizers_lib.atomic_write(os.path.join(tmp, METADATA_FILE), json.dumps(meta, indent=2))
    paths.publish_directory(tmp, output_dir)
  except BaseException:
    for w in writers.values():
      w._close_current()  # pylint: disable=protected-access
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if progress is not None:
    total = sum(meta["splits"][s]["num_sequences"] for s in SPLITS)
    shards = sum(meta["splits"][s]["num_shards"] for s in SPLITS)
    progress(f"prepare: done: {total:,} sequences ({total * seq_len:,} tokens) in {shards} "
             f"shard(s), {tokenizer.name} tokenizer (vocab {tokenizer.vocab_size}), "
             f"{time.time() - t0:.1f} s -> {output_dir}")
  return meta
