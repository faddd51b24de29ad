"""How rows become batches, in one place for every dataset.

``process_train_batches`` is the ordering contract of every training stream: one
seeded order of all rows per epoch, global batch g = rows [g B, (g+1) B) of the
concatenated epochs, process p of P reads the p-th contiguous slice of it, so the
stream does not depend on the number of processes.  ``process_eval_batches`` gives
fixed, padded, weighted eval batches cut the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import grain
import numpy as np


def as_example(row: np.ndarray) -> Dict[str, np.ndarray]:
  return {"tokens": row}


def _check_processes(batch_size: int, process_index: int, process_count: int,
                     what: str) -> int:
  """Validates the process layout; returns the per-process batch."""
  if process_count < 1:
    raise ValueError(f"process_count={process_count} must be >= 1.")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"The {what} batch size {batch_size} must be a positive multiple of the "
                     f"number of processes ({process_count}).")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  return batch_size // process_count


def process_train_batches(source: Any, global_batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1, *, transform: Callable[[Any], Any],
                          seq_len: int, read_threads: int = 2) -> grain.IterDataset:
  """This process's share of an infinite, per-epoch reshuffled stream of global batches.

  The ordering contract (shared by every data pipeline of mdm_jax):

  * all rows of ``source`` are shuffled with ``seed`` (a new order each epoch,
    derived from ``seed`` and the epoch number only) and the epochs are
    concatenated into one infinite stream of rows;
  * global batch ``g`` is rows ``[g * B, (g + 1) * B)`` of that stream, so a
    batch may span an epoch boundary;
  * process ``p`` of ``P`` receives exactly the contiguous slice
    ``[g * B + p * B / P, g * B + (p + 1) * B / P)`` of it.

  So the order does not depend on the number of processes, and the processes'
  batches concatenated in process order equal the one-process batch row for
  row. The returned dataset's iterator has ``get_state()`` / ``set_state()``.

  Args:
    source: random-access rows (``len`` and ``__getitem__``): a numpy array or
      a grain data source.
    global_batch_size: ``B``, rows per step over all processes.
    seed: shuffle seed, in ``[0, 2**32)``.
    process_index: ``p``.
    process_count: ``P``.
    transform: maps one row of ``source`` to one example (a dict of arrays).
    seq_len: tokens per row (only used in error messages).
    read_threads: grain read threads.

  Returns:
    A ``grain.IterDataset`` of batched examples with ``B / P`` rows each.

  Raises:
    ValueError: the batch does not divide over processes or exceeds the rows.
  """
  global_batch_size, process_count = int(global_batch_size), int(process_count)
  process_index = int(process_index)
  local_batch = _check_processes(global_batch_size, process_index, process_count, "global")
  num_rows = len(source)
  if global_batch_size > num_rows:
    raise ValueError(
        f"The global batch of {global_batch_size} sequences is larger than the {num_rows} "
        f"training sequences of length {seq_len}. Use a smaller training.batch_size or "
        "data.seq_len, or a larger corpus.")
  ds = grain.MapDataset.source(source).shuffle(seed=int(seed)).repeat(None).map(transform)
  # Local batch k holds stream rows [k * B/P, (k + 1) * B/P); global batch g is
  # local batches g*P .. g*P + P - 1, so process p takes every P-th one from p.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=int(read_threads),
                                              prefetch_buffer_size=4))


def process_eval_batches(read_rows: Callable[[np.ndarray], np.ndarray], num_rows: int,
                         seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                         process_count: int = 1) -> List[Dict[str, np.ndarray]]:
  """A fixed, unshuffled list of this process's eval batches.

  Global batch ``g`` holds eval rows ``[g * batch_size, (g + 1) * batch_size)``;
  process ``p`` gets the ``p``-th contiguous slice of ``batch_size //
  process_count`` rows. Rows past the end of the split are zeros with weight 0,
  so every batch has the same shape and padding is excluded from metrics.

  Args:
    read_rows: sorted int64 row indices (all ``< num_rows``) -> int32
      ``[len(indices), seq_len]`` rows.
    num_rows: rows in the eval split.
    seq_len: tokens per row.
    batch_size: global eval batch size.
    num_batches: number of batches; 0 (or more than available) = the whole split.
    process_index: this process's index.
    process_count: number of processes.

  Returns:
    A list of ``{"tokens": int32 [local, seq_len], "weights": float32 [local]}``;
    every process gets the same number of batches.

  Raises:
    ValueError: empty eval split or a batch that does not divide over processes.
  """
  batch_size, process_count = int(batch_size), int(process_count)
  if num_rows == 0:
    raise ValueError("The eval split is empty: raise data.eval_fraction.")
  local = _check_processes(batch_size, int(process_index), process_count, "eval")
  available = -(-num_rows // batch_size)
  n = available if num_batches <= 0 else min(int(num_batches), available)
  batches = []
  for g in range(n):
    start = g * batch_size + int(process_index) * local
    idx = np.arange(start, start + local)
    real = idx < num_rows
    tokens = np.zeros((local, seq_len), np.int32)
    if real.any():
      tokens[real] = read_rows(idx[real])
    batches.append({"tokens": tokens, "weights": real.astype(np.float32)})
  return batches


