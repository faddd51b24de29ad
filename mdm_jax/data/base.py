"""The data contract: what the trainer and the tasks ask of a dataset, and the registry.

A dataset is a ``Data``: a tokenizer, a row length, an infinite per-process stream of
training batches with a checkpointable iterator, fixed eval batches, and how its
samples are described and written (text, or a PNG grid for images).  A builder
``(data_config, workdir) -> Data`` registered with ``@DATASETS.register(name)`` is
selected by ``config.data.dataset``; ``build_data`` calls it.

Batches are dicts of numpy arrays: ``tokens`` int32 [rows, seq_len] always, ``weights``
float32 [rows] in eval batches (0 for padding rows), and any further per-row field a
task takes by name (``labels`` for class-conditional images).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import paths
from mdm_jax.core.config import merge_block
from mdm_jax.core.registry import Registry

DATASETS: Registry[Callable[..., "Data"]] = Registry("dataset", "data.dataset")

# config.data keys that must match between a checkpoint and the run that restores it:
# they decide which token ids mean what.
COMPAT_KEYS = ("data.tokenizer", "data.bpe_vocab_size", "data.token_order", "data.dataset",
               "data.path")

# config.data keys that decide the training stream (what each step's batch holds): a run
# that resumes must keep them too, or the restored iterator position means other data.
STREAM_KEYS = ("data.seq_len", "data.shuffle_seed", "data.eval_fraction", "data.num_levels",
               "data.image_size", "data.channels", "data.tfds_name", "data.tfds_train_split",
               "data.max_train_examples", "data.class_labels")


class Data:
  """The interface of a dataset (see the module docstring).

  Attributes:
    tokenizer: ``vocab_size``, ``encode``, ``decode``, ``fingerprint()``.
    seq_len: tokens per row.
  """
  tokenizer: Any
  seq_len: int

  def train_dataset(self, global_batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1):
    """An infinite ``grain.IterDataset`` of this process's training batches (see
    ``batching.process_train_batches`` for the ordering contract)."""
    raise NotImplementedError

  def eval_batches(self, batch_size: int, num_batches: int, process_index: int = 0,
                   process_count: int = 1) -> List[Dict[str, np.ndarray]]:
    """A fixed list of this process's eval batches (``tokens`` and ``weights``)."""
    raise NotImplementedError

  # ---- samples
  def describe_samples(self, tokens: np.ndarray) -> Tuple[List[str], Dict[str, Any]]:
    """(texts, stats) of sampled token rows; text data decode them (and may add measures)."""
    return [self.tokenizer.decode(np.asarray(row)) for row in np.asarray(tokens)], {}

  def write_samples(self, tokens: np.ndarray, texts: Sequence[str], stats: Dict[str, Any],
                    out_dir: str, name: str, header: str = "") -> Dict[str, Any]:
    """Writes ``out_dir/name.txt`` (the texts) and ``out_dir/name.json`` (stats + texts)."""
    del tokens
    paths.makedirs(out_dir)
    txt = paths.join(out_dir, f"{name}.txt")
    with paths.open(txt, "w") as f:
      for i, t in enumerate(texts):
        f.write(f"===== sample {i} ({header}) =====\n{t}\n\n")
    path = paths.join(out_dir, f"{name}.json")
    with paths.open(path, "w") as f:
      json.dump({**stats, "texts": list(texts)}, f, indent=2)
    return {"samples_txt": txt, "samples_json": path}

  def show_samples(self, texts: Sequence[str], stats: Dict[str, Any], header: str) -> str:
    """The lines printed after sampling: the first sample, with the headline numbers."""
    words = (f", {100 * stats['known_word_rate']:.0f}% corpus words"
             if "known_word_rate" in stats else "")
    if "known_bigram_rate" in stats:
      words += f", {100 * stats['known_bigram_rate']:.0f}% corpus word pairs"
    if "gen_ppl" in stats:
      words += f", gen ppl {stats['gen_ppl']:.1f} (entropy {stats['gen_entropy']:.2f})"
    first = texts[0][:600] if texts else ""
    return (f"\n----- sample 0 at {header} (NFE {stats.get('nfe')}, "
            f"{stats.get('tokens_per_s', 0):.0f} tok/s{words}) -----\n{first}\n-----")


def build_data(data_config, workdir: Optional[str] = None) -> Data:
  """The dataset named by ``data_config.dataset`` (``workdir`` caches tokenizers and tokens;
  keys the block lacks take their defaults from ``configs/base.py``)."""
  block = merge_block(get_base_config().data, data_config)
  return DATASETS.get(str(block.dataset))(block, workdir)


def progress(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)
