"""Vocabulary numbering: give tokens that occur in similar contexts nearby ids.

Prime writes a token id as ell base-b digits, most significant first, so the
leading digit of a token is the block of b**(ell-1) consecutive ids it falls
in.  With the ids a tokenizer hands out (byte-level BPE numbers its merges in
the order it learnt them) such a block is an arbitrary set of tokens: seeing a
token's first digit says almost nothing about it, and the input embedding,
which is built from one small table per digit, has to assemble every token
from unrelated halves.

``context_order`` renumbers the vocabulary so that each block of consecutive
ids is a set of tokens used in similar contexts: speaker names, adjectives,
word endings.  Then a partly observed token already tells its word class, and
the per-digit embedding is a class embedding plus a refinement.  On the
default Shakespeare job (Prime ell = 2, BPE-4096) this lowers the valid bound
by about 0.2 nats/token at the same number of steps (docs/results/vocabulary_order.md).  For
ell = 1 (plain MDM) and the AR baseline the numbering changes nothing but the
random initialisation.

The method, all in numpy/scipy on the host (a few seconds for V = 4096):

1. Count, over the training stream, each token's right neighbours and left
   neighbours (a sparse V x V matrix of bigram counts and its transpose).
2. Describe token v by the square roots of its neighbour distributions,
   [sqrt(P(next | v)), sqrt(P(prev | v))] (a Hellinger embedding, so frequent
   and rare tokens are on one scale), and reduce that 2V-wide description to
   ``dim`` columns with a seeded randomized SVD.
3. Bisect recursively: split each group of tokens into two halves (start at
   the median of its first principal component, then a few rounds of balanced
   2-means), until groups have one or two tokens; the leaves, read left to
   right, are the new numbering.  When V is a power of two every block of 2**k
   consecutive ids is one node of the tree, so every digit of a power-of-two
   base (V = 4096: b = 64, 16, 8 for ell = 2, 3, 4) is a level of one word-class
   hierarchy; for other V the blocks are still contiguous runs of one
   similarity ordering.

Deterministic for a given stream: float64 throughout, a fixed seed, each
principal direction's sign fixed, and ties broken by the old id.  Multi-process
jobs also check that every process built the same numbering
(``train.check_same_tokenizer_everywhere``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mdm_jax.diffusion import prime as prime_lib

TOKEN_ORDERS = ("id", "context", "random")
_REFINE_STEPS = 10


def _neighbour_features(tokens: np.ndarray, vocab_size: int):
  """The sparse [V, 2V] Hellinger description of every token's neighbours."""
  import scipy.sparse as sp  # pylint: disable=import-outside-toplevel
  a, b = tokens[:-1], tokens[1:]
  ones = np.ones(len(a), np.float64)
  right = sp.coo_matrix((ones, (a, b)), shape=(vocab_size, vocab_size)).tocsr()
  left = right.T.tocsr()

  def rows_sqrt_normalised(m):
    m = m.copy()
    m.sum_duplicates()
    totals = np.asarray(m.sum(axis=1)).reshape(-1)
    scale = 1.0 / np.maximum(totals, 1.0)
    m = sp.diags(scale) @ m
    m.data = np.sqrt(m.data)
    return m

  return sp.hstack([rows_sqrt_normalised(right), rows_sqrt_normalised(left)]).tocsr()


def _randomized_svd_rows(features, dim: int, seed: int) -> np.ndarray:
  """[V, dim] coordinates of the rows of ``features`` in its top singular directions."""
  v, width = features.shape
  k = min(dim, v, width)
  rng = np.random.default_rng(seed)
  probe = rng.standard_normal((width, min(k + 16, width)))
  basis = features @ probe
  for _ in range(2):                                  # two power iterations
    basis, _ = np.linalg.qr(basis)
    basis = features @ (features.T @ basis)
  basis, _ = np.linalg.qr(basis)
  small = np.asarray((features.T @ basis).T)          # [k + 16, width]
  u, s, _ = np.linalg.svd(small, full_matrices=False)
  return (basis @ u[:, :k]) * s[:k]


def _leading_direction(x: np.ndarray, iters: int = 30) -> np.ndarray:
  """The unit first principal direction of centred rows x (power iteration), sign fixed."""
  d = x[np.argmax(np.einsum("ij,ij->i", x, x))].copy()   # start from the farthest row
  for _ in range(iters):
    d = x.T @ (x @ d)
    d /= max(float(np.sqrt(d @ d)), 1e-300)
  if d[np.argmax(np.abs(d))] < 0:
    d = -d
  return d


def bisection_order(coords: np.ndarray) -> np.ndarray:
  """Leaf order of recursive halving of ``coords`` rows (balanced 2-means from a PCA split).

  Args:
    coords: float [N, D].

  Returns:
    int64 [N]: a permutation of range(N); rows close in ``coords`` get close positions.
  """
  n = coords.shape[0]
  out = []
  stack = [np.arange(n)]
  while stack:
    idx = stack.pop()
    if len(idx) <= 2:                                 # the order inside a pair is immaterial
      out.extend(np.sort(idx).tolist())
      continue
    x = coords[idx] - coords[idx].mean(axis=0)
    if not np.any(x):                                 # all alike (e.g. unseen tokens): id order
      out.extend(idx.tolist())
      continue
    half = len(idx) // 2
    proj = x @ _leading_direction(x)
    left = np.zeros(len(idx), bool)
    left[np.lexsort((idx, proj))[:half]] = True
    for _ in range(_REFINE_STEPS):                    # balanced 2-means, from the PCA split
      proj = x @ (x[~left].mean(axis=0) - x[left].mean(axis=0))
      new_left = np.zeros(len(idx), bool)
      new_left[np.lexsort((idx, proj))[:half]] = True
      if np.array_equal(new_left, left):
        break
      left = new_left
    order = np.lexsort((idx, proj))                   # by score, ties by id
    idx = idx[order]
    stack.append(idx[half:])                          # popped second
    stack.append(idx[:half])
  return np.asarray(out, np.int64)


def context_order(tokens: Sequence[int], vocab_size: int, dim: int = 64,
                  seed: int = 0) -> np.ndarray:
  """A numbering of the vocabulary in which similar-context tokens are adjacent.

  Args:
    tokens: 1-D int token stream (the training split; ids in [0, vocab_size)).
    vocab_size: V.
    dim: columns kept from the SVD of the neighbour description.
    seed: the randomized SVD's seed.

  Returns:
    int64 [V] ``order``: new id i is old id ``order[i]`` (a permutation of range(V)).

  Raises:
    ValueError: an empty stream or ids outside [0, vocab_size).
  """
  tokens = np.asarray(tokens).reshape(-1).astype(np.int64)
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
  if len(tokens) < 2:
    raise ValueError("data.token_order='context' needs a training stream of at least 2 tokens, "
                     f"got {len(tokens)}.")
  if tokens.min() < 0 or tokens.max() >= vocab_size:
    raise ValueError(f"Token ids must lie in [0, {vocab_size}); got [{tokens.min()}, "
                     f"{tokens.max()}].")
  coords = _randomized_svd_rows(_neighbour_features(tokens, vocab_size), int(dim), int(seed))
  return bisection_order(coords)


def random_order(vocab_size: int, seed: int = 0) -> np.ndarray:
  """A seeded uniform numbering (Prime v2's "index shuffling", at no run-time cost).

  The control for ``context_order``: it also scatters BPE's frequency-sorted ids
  over all leading digits, but groups tokens at random.
  """
  return np.random.default_rng(seed).permutation(int(vocab_size)).astype(np.int64)


def compute_order(kind: str, tokens, vocab_size: int, seed: int = 0) -> np.ndarray:
  """The numbering named by ``data.token_order`` (not "id")."""
  if kind == "context":
    return context_order(tokens, vocab_size)
  if kind == "random":
    return random_order(vocab_size, seed)
  raise ValueError(f"data.token_order={kind!r} is not one of {list(TOKEN_ORDERS)}.")


def configured(data_config) -> str:
  """``data.token_order`` of a ``config.data`` block ("id" where the key is absent)."""
  return str(data_config.get("token_order", "id"))


def is_permutation(order, vocab_size: int) -> bool:
  """Whether ``order`` holds every id of [0, vocab_size) exactly once."""
  order = np.asarray(order).reshape(-1)
  return len(order) == vocab_size and np.array_equal(np.sort(order), np.arange(vocab_size))


def rank_of(order: np.ndarray) -> np.ndarray:
  """The inverse numbering: ``rank_of(order)[old_id]`` is the new id (int32 [V])."""
  return prime_lib.inverse_permutation(order)
