"""Data at scale, online half: reading the packed ArrayRecord shards that ``prepare`` wrote.

A dataset directory (written once, offline, by ``array_record_prepare.prepare``,
``--mode=prepare``) holds fixed-length int32 sequences of ``data.seq_len`` tokens::

  OUT/metadata.json                       tokenizer, seq_len, counts, source, version
  OUT/tokenizer.json                      the tokenizer (``tokenizers.load_tokenizer``)
  OUT/train-00000-of-00003.array_record   one record = seq_len little-endian int32
  ...
  OUT/eval-00000-of-00001.array_record

This module owns that format (the constants below, ``shard_name``,
``read_metadata``) and its reader: ``ArrayRecordData`` (``data.dataset =
"array_record"``, ``data.path = OUT``) reads the shards through
``grain.sources.ArrayRecordDataSource`` and has the interface of
``text.TextData``: ``tokenizer``, ``train_dataset`` (the same ordering contract,
see ``batching.process_train_batches``) and ``eval_batches``.  Nothing here
tokenises text or imports TFDS / Hugging Face ``datasets``.
"""

from __future__ import annotations

import functools
import glob
import json
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import grain
import numpy as np

from mdm_jax.core import paths
from mdm_jax.core.errors import ConfigError
import mdm_jax.data.token_order as token_order_lib
import mdm_jax.data.tokenizers as tokenizers_lib
from mdm_jax.data.base import DATASETS, Data
from mdm_jax.data.batching import process_eval_batches, process_train_batches

FORMAT = "mdm_jax.packed_tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "eval")
# group_size:1 gives cheap random access (what grain needs); zstd roughly halves
# int32 tokens with small ids.
WRITER_OPTIONS = "group_size:1,zstd:1"
RECORD_DTYPE = np.dtype("<i4")
TMP_MARKER = ".tmp-"
PREPARE_HINT = ("python -m mdm_jax.main --mode=prepare --config=CONFIG --output=DIR "
                "(see docs/data.md)")


class IncompleteDatasetError(FileNotFoundError):
  """``data.path`` is not a complete dataset written by ``prepare``."""


def shard_name(split: str, index: int, count: int) -> str:
  """``train-00000-of-00003.array_record``."""
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def one_line(e: BaseException, limit: int = 400) -> str:
  """An exception as one line of at most ``limit`` characters (for error messages)."""
  msg = " ".join(f"{type(e).__name__}: {e}".split())
  return msg if len(msg) <= limit else msg[:limit] + " ..."


def _decode_record(record: bytes, seq_len: int) -> np.ndarray:
  row = np.frombuffer(record, dtype=RECORD_DTYPE)
  if row.shape != (seq_len,):
    raise ValueError(f"A record holds {row.size} tokens, not seq_len={seq_len}: the shard is "
                     "corrupt or from another dataset.")
  return row.astype(np.int32)


def _decode_example(record: bytes, seq_len: int) -> Dict[str, np.ndarray]:
  return {"tokens": _decode_record(record, seq_len)}


def _interrupted_prepares(path: str) -> List[str]:
  if paths.is_remote(path):
    return []
  return sorted(glob.glob(glob.escape(path) + TMP_MARKER + "*"))


def read_metadata(path: str) -> Dict[str, Any]:
  """The metadata of a complete dataset directory written by ``prepare``.

  Raises:
    IncompleteDatasetError: missing, empty or incomplete directory (a
      leftover ``PATH.tmp-*`` of an interrupted prepare is named), or
      missing shard / tokenizer files.
  """
  path = paths.resolve(path)
  leftovers = _interrupted_prepares(path)
  leftover_hint = (f" {leftovers[0]} is left from a prepare that was interrupted before it "
                   "finished: delete it and run prepare again." if leftovers else "")
  if not paths.isdir(path):
    raise IncompleteDatasetError(
        f"data.path={path} does not exist.{leftover_hint} Write the dataset with "
        f"{PREPARE_HINT}.")
  meta_path = paths.join(path, METADATA_FILE)
  if not paths.exists(meta_path):
    state = "is empty" if not paths.listdir(path) else f"has no {METADATA_FILE}"
    raise IncompleteDatasetError(
        f"data.path={path} {state}: it is not a complete dataset written by prepare.{leftover_hint}"
        f" Write it with {PREPARE_HINT}.")
  try:
    meta = json.loads(paths.read_text(meta_path))
  except (OSError, ValueError) as e:
    raise IncompleteDatasetError(f"{meta_path} is unreadable ({one_line(e)}): prepare the "
                                 "dataset again.") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise IncompleteDatasetError(f"{meta_path} is not the metadata of a dataset written by "
                                 f"mdm_jax's prepare (format {FORMAT!r}).")
  if meta.get("version") != FORMAT_VERSION:
    raise IncompleteDatasetError(f"{path} has format version {meta.get('version')}, this mdm_jax "
                                 f"reads version {FORMAT_VERSION}: prepare the dataset again.")
  try:
    files = [s["file"] for split in SPLITS for s in meta["splits"][split]["shards"]]
    files.append(meta["tokenizer"]["file"])
  except (KeyError, TypeError) as e:
    raise IncompleteDatasetError(f"{meta_path} lacks {e}: prepare the dataset again.") from e
  present = set(paths.listdir(path))
  missing = [f for f in files if f not in present]
  if missing:
    raise IncompleteDatasetError(f"data.path={path} is incomplete: {len(missing)} file(s) named "
                                 f"in {METADATA_FILE} are missing ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}). Prepare it again.")
  return meta


class ArrayRecordData(Data):
  """Packed sequences read from the ArrayRecord shards written by ``prepare``.

  Same interface as ``text.TextData``.

  Attributes:
    path: the dataset directory.
    metadata: its ``metadata.json``.
    tokenizer: the tokenizer the sequences were encoded with.
    seq_len: tokens per sequence.
    num_train, num_eval: sequences per split.
  """

  def __init__(self, path: str):
    self.path = paths.resolve(path)
    self.metadata = read_metadata(self.path)
    self.seq_len = int(self.metadata["seq_len"])
    with paths.local_copy_for_read(
        paths.join(self.path, self.metadata["tokenizer"]["file"])) as tok_file:
      self.tokenizer = tokenizers_lib.load_tokenizer(tok_file)
    if self.tokenizer.fingerprint() != self.metadata["tokenizer"]["fingerprint"]:
      raise IncompleteDatasetError(f"{self.path}/{TOKENIZER_FILE} is not the tokenizer the "
                                   "sequences were encoded with: prepare the dataset again.")
    self._sources = {split: self._open(split) for split in SPLITS}
    self.num_train = len(self._sources["train"])
    self.num_eval = len(self._sources["eval"])

  def _open(self, split: str) -> grain.sources.ArrayRecordDataSource:
    info = self.metadata["splits"][split]
    # gs:// shards are read by ArrayRecord's own Cloud Storage client (google-cloud-cpp;
    # CLOUD_STORAGE_EMULATOR_ENDPOINT points it at an emulator).
    shard_paths = [paths.join(self.path, s["file"]) for s in info["shards"]]
    try:
      source = grain.sources.ArrayRecordDataSource(shard_paths)
    except Exception as e:  # pylint: disable=broad-except
      raise IncompleteDatasetError(f"Cannot read the {split} shards of {self.path} "
                                   f"({one_line(e)}): prepare the dataset again.") from e
    if len(source) != int(info["num_sequences"]):
      raise IncompleteDatasetError(
          f"The {split} shards of {self.path} hold {len(source)} sequences, {METADATA_FILE} "
          f"says {info['num_sequences']}: the dataset is incomplete; prepare it again.")
    return source

  def check_config(self, data_config) -> None:
    """The config must ask for what the shards hold.

    Raises:
      ConfigError: naming the ``config.data`` key to change.
    """
    meta, tok = self.metadata, self.metadata["tokenizer"]
    prepared_with = (f"(prepare a new dataset with the config's value: {PREPARE_HINT})")
    if int(data_config.seq_len) != self.seq_len:
      raise ConfigError(
          f"config.data.seq_len={int(data_config.seq_len)} but the dataset in {self.path} holds "
          f"sequences of {self.seq_len} tokens: set --config.data.seq_len={self.seq_len} "
          f"{prepared_with}.")
    if str(data_config.tokenizer) != tok["kind"]:
      raise ConfigError(
          f"config.data.tokenizer={str(data_config.tokenizer)!r} but the dataset in {self.path} "
          f"was tokenised with {tok['kind']!r}: set --config.data.tokenizer={tok['kind']} "
          f"{prepared_with}.")
    want = tok.get("settings", {}).get("bpe_vocab_size")
    if tok["kind"] == "bpe" and want is not None and int(data_config.bpe_vocab_size) != int(want):
      raise ConfigError(
          f"config.data.bpe_vocab_size={int(data_config.bpe_vocab_size)} but the dataset in "
          f"{self.path} was tokenised with a BPE of bpe_vocab_size={want} (vocab "
          f"{meta['vocab_size']}): set --config.data.bpe_vocab_size={want} {prepared_with}.")
    order = getattr(self.tokenizer, "order_kind", "id")
    want_order = token_order_lib.configured(data_config)
    if want_order != order:
      raise ConfigError(
          f"config.data.token_order={want_order!r} but the dataset in {self.path} "
          f"was prepared with token_order={order!r}: set --config.data.token_order={order} "
          f"{prepared_with}.")
    if self.tokenizer.vocab_size != int(meta["vocab_size"]):
      raise IncompleteDatasetError(f"{self.path}: the tokenizer has vocab "
                                   f"{self.tokenizer.vocab_size}, {METADATA_FILE} says "
                                   f"{meta['vocab_size']}; prepare the dataset again.")

  def read_rows(self, split: str, indices: Sequence[int]) -> np.ndarray:
    """int32 ``[len(indices), seq_len]`` sequences of ``split`` (train | eval)."""
    idx = [int(i) for i in indices]
    if not idx:
      return np.zeros((0, self.seq_len), np.int32)
    records = self._sources[split].__getitems__(idx)
    return np.stack([_decode_record(r, self.seq_len) for r in records])

  def read_split(self, split: str) -> np.ndarray:
    """Every sequence of ``split`` in stored order (small datasets and tests)."""
    return self.read_rows(split, range(len(self._sources[split])))

  def train_dataset(self, global_batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.IterDataset:
    """Infinite stream of this process's training batches, reshuffled every epoch.

    The ordering contract of ``batching.process_train_batches``: global batch ``g``
    is rows ``[g*B, (g+1)*B)`` of one order that depends only on ``seed`` and the
    epoch; process ``p`` of ``P`` gets its ``p``-th contiguous slice of
    ``B / P`` rows. ``iter(ds)`` has ``get_state()`` / ``set_state()``.

    Returns:
      A ``grain.IterDataset`` of ``{"tokens": int32 [global_batch_size //
      process_count, seq_len]}``.
    """
    return process_train_batches(
        self._sources["train"], global_batch_size, seed, process_index, process_count,
        transform=functools.partial(_decode_example, seq_len=self.seq_len), seq_len=self.seq_len)

  def eval_batches(self, batch_size: int, num_batches: int, process_index: int = 0,
                   process_count: int = 1) -> List[Dict[str, np.ndarray]]:
    """Fixed eval batches; process ``p`` gets the ``p``-th contiguous slice of each.

    See ``batching.process_eval_batches`` (padding rows have weight 0).
    """
    return process_eval_batches(
        lambda idx: self.read_rows("eval", idx), self.num_eval, self.seq_len, batch_size,
        num_batches, process_index, process_count)

  def __repr__(self) -> str:
    return (f"ArrayRecordData({self.path!r}, seq_len={self.seq_len}, train={self.num_train}, "
            f"eval={self.num_eval}, tokenizer={self.tokenizer!r})")


@DATASETS.register("array_record")
def load_array_record_data(data_config, workdir: Optional[str] = None) -> ArrayRecordData:
  """``data.dataset == "array_record"``: opens ``data.path`` and checks it against the config.

  Raises:
    ConfigError: no ``data.path``, or the shards do not match ``data.seq_len`` /
      ``data.tokenizer`` / ``data.bpe_vocab_size``.
    IncompleteDatasetError: ``data.path`` is missing, empty or incomplete.
  """
  del workdir   # the shards hold the tokenizer
  path = str(data_config.path)
  if not path:
    raise ConfigError("data.dataset='array_record' needs --config.data.path=DIR, a directory "
                      f"written by {PREPARE_HINT}.")
  data = ArrayRecordData(path)
  data.check_config(data_config)
  logging.info("Data %s: %s tokenizer, vocab %d; train %d x %d, eval %d x %d (%d + %d shards).",
               data.path, data.tokenizer.name, data.tokenizer.vocab_size, data.num_train,
               data.seq_len, data.num_eval, data.seq_len,
               data.metadata["splits"]["train"]["num_shards"],
               data.metadata["splits"]["eval"]["num_shards"])
  return data
