"""Small pieces shared by the adaptive samplers (first-hitting, PUNT, EB, MaskGIT, ...).

* ``time_for_mask_prob``: the time t with 1 - alpha(t) = m (bisection; every
  schedule's alpha is decreasing), for samplers whose state is described by a
  masked fraction rather than a grid time.  Only time-conditioned networks
  look at it.
* ``model_logprobs``: one network call -> (unfiltered, filtered) token
  log-probabilities, restricted by Prime's carry-over when asked.
* ``token_confidence``: the per-token confidence scores of docs/method/algorithms.md §7.3-7.5.
* ``descending_ranks``: rank 0 = most confident, per row, ties by position;
  optionally by group (block) first.
* ``row_keys``, ``step_keys``, ``row_uniform``, ``row_gumbel``, ``row_beta``: the
  per-row random draws every sampler makes (below).

Per-row randomness.  A sampler's ``key`` is either one key, whose row b gets
fold_in(key, b), or a batch of per-row keys [B] (``row_keys(key, n, row_offset)``:
fold_in(key, row_offset + b), what ``generate.run_sampler`` passes, so that sample i
of a run is drawn from fold_in(key(seed), i) whatever the batches it was drawn in).
At step k row b's draws come from split(fold_in(row_key_b, k), n) only, each draw a
vmap over the rows, so a row's sample depends on its own key and nothing else: not
on the batch size, the other rows, the mesh, the number of devices or processes.
The network's ``rng`` (dropout, unused at ``train=False``) is the first row's.
Every draw here is in ``filters.draw_dtype()`` (float32, or float64 inside
``filters.sampling_precision("float64")``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.sampling.filters import apply_filters, draw_dtype
from mdm_jax.diffusion.schedules import Schedule

Array = jax.Array

# "prob" depends on the drawn value x^ (LLaDA's low-confidence remasking); the
# other three are functions of the distribution only.  Only value-independent
# scores leave one-token-per-step decoding exact: choosing *where* to reveal by
# the value that was drawn there biases that value towards likely tokens.
CONFIDENCES = ("prob", "max_prob", "margin", "neg_entropy")


def time_for_mask_prob(schedule: Schedule, m: Array, iters: int = 30) -> Array:
  """t in [0, 1] with schedule.mask_prob(t) = m (elementwise, float32 bisection)."""
  m = jnp.asarray(m, jnp.float32)

  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    below = schedule.mask_prob(mid) < m
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(m), jnp.ones_like(m)))
  return 0.5 * (lo + hi)


def model_logprobs(apply_fn: Callable[..., Array], params: Any, codec: PrimeCodec,
                   digits: Array, t: Array, rng: Array, *, carry_over: bool, temperature,
                   top_k: int, top_p, top_p_rule: str) -> Tuple[Array, Array]:
  """(log p(x | y) unfiltered, filtered) over the V tokens, both float32 [B, L, V].

  t: float32 [B] (or a scalar, broadcast to the batch).
  """
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (digits.shape[0],))
  logits = apply_fn(params, digits, t, train=False, rng=rng)
  lp = codec.token_logprobs(logits.astype(jnp.float32), digits if carry_over else None)
  return lp, apply_filters(lp, temperature, top_k, top_p, top_p_rule)


def entropy(lp: Array) -> Array:
  """Entropy (nats) of each row of log-probabilities [..., V]."""
  p = jnp.exp(lp)
  return -jnp.sum(jnp.where(p > 0, p * lp, 0.0), -1)


def token_confidence(lp: Array, x_hat: Array, kind: str) -> Array:
  """Confidence [B, L] of each token's proposal (higher = more confident).

  prob: log p(x^); max_prob: log max_x p(x); margin: p(top-1) - p(top-2);
  neg_entropy: -H(p).
  """
  if kind == "prob":
    return jnp.take_along_axis(lp, x_hat[..., None], -1)[..., 0]
  if kind == "max_prob":
    return jnp.max(lp, -1)
  if kind == "margin":
    top2 = jax.lax.top_k(lp, 2)[0] if lp.shape[-1] >= 2 else jnp.concatenate(
        [lp, jnp.full_like(lp, -jnp.inf)], -1)
    return jnp.exp(top2[..., 0]) - jnp.exp(top2[..., 1])
  if kind == "neg_entropy":
    return -entropy(lp)
  raise ValueError(f"confidence must be one of {CONFIDENCES}, got {kind!r}.")


def descending_ranks(score: Array, valid: Array, group: Optional[Array] = None) -> Array:
  """int32 ranks along the last axis: 0 = highest score among ``valid``; invalid last.

  With ``group`` (integers, broadcastable to ``score``), valid entries are ranked
  by group first, lowest group first, and by score inside a group (semi-
  autoregressive blocks: group = position // block length).
  """
  s = jnp.where(valid, score, -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True)
  if group is not None:         # then stably by group: the score order survives inside one
    g = jnp.where(valid, jnp.broadcast_to(group, s.shape), jnp.iinfo(jnp.int32).max)
    order = jnp.take_along_axis(
        order, jnp.argsort(jnp.take_along_axis(g, order, -1), axis=-1, stable=True), -1)
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


def merge_tokens(codec: PrimeCodec, digits: Array, tokens: Array, where: Array) -> Array:
  """digits with the *masked* digits of the tokens at ``where`` [B, L] set from ``tokens``.

  Digits already revealed never change (with carry-over the proposal agrees
  with them anyway).
  """
  fill = where[..., None] & (digits == codec.mask_id)
  return jnp.where(fill, codec.encode(tokens), digits).astype(jnp.int32)


def row_keys(key: Array, batch_size: int, row_offset=0) -> Array:
  """Typed per-row keys [batch_size]: fold_in(key, row_offset + b) for one key (typed or
  raw); a batch of keys [batch_size] is returned as it is."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    ids = jnp.asarray(row_offset, jnp.uint32) + jnp.arange(batch_size, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  if key.shape != (batch_size,):
    raise ValueError(f"a sampler's key is one key or {batch_size} per-row keys, got shape "
                     f"{key.shape}.")
  return key


def step_keys(rows: Array, step, num: int) -> Tuple[Array, ...]:
  """``num`` per-row key batches [B] for one step: split(fold_in(row_key, step), num)."""
  ks = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(r, step), num))(rows)   # [B, num]
  return tuple(ks[:, j] for j in range(num))


def row_uniform(keys: Array, shape) -> Array:
  """U[0, 1) of ``shape`` = [B, ...], row b from keys[b] (``draw_dtype()``)."""
  return jax.vmap(lambda k: jax.random.uniform(k, tuple(shape[1:]), draw_dtype()))(keys)


def row_gumbel(keys: Array, shape) -> Array:
  """Standard Gumbel of ``shape`` = [B, ...], row b from keys[b] (``draw_dtype()``)."""
  return jax.vmap(lambda k: jax.random.gumbel(k, tuple(shape[1:]), draw_dtype()))(keys)


def row_beta(keys: Array, a: Array, b: Array) -> Array:
  """Beta(a_r, b_r) per row [B], row r from keys[r] (``draw_dtype()``)."""
  dtype = draw_dtype()
  return jax.vmap(lambda k, x, y: jax.random.beta(k, x.astype(dtype), y.astype(dtype),
                                                  dtype=dtype))(keys, a, b)
