"""Logit filters (temperature, top-k, top-p) and the token categorical.

All functions are pure, work on float32 logits (or log-probabilities) of shape
[..., V], and are applied in the order temperature -> top-k -> top-p
(``apply_filters``).  An excluded entry gets ``NEG_INF`` (-1e9), a large
*finite* negative: a row whose entries are all excluded stays finite (softmax
is then uniform instead of NaN), while exp(NEG_INF - max) underflows to exactly
0 in float32 so an excluded entry is never drawn when anything else is allowed.

Entries that are already <= NEG_INF / 2 on input (e.g. tokens ruled out by
Prime's carry-over) stay at NEG_INF through every filter, in particular through
a large temperature, which would otherwise bring -1e9 / tau back into range.

``sample_categorical`` draws with the high-dynamic-range Gumbel noise
(``mode="high"``): the default float32 Gumbel is capped at ~15.9 and biases
categories below ~1e-7 (docs/method/algorithms.md §7.7); "high" pushes that to ~1e-14.

Precision (``config.sampling.precision``).  The samplers' random draws -- this
categorical, and the uniform / Gumbel / Beta draws of ``sampling/common.py`` -- are
float32 by default.  ``sampling_precision("float64")`` traces a sampler with JAX's
64-bit mode on and makes every one of those draws float64 (the log-probabilities are
cast to float64 before the Gumbel draw, as the Prime authors sample); the network and
the filters are unchanged.  It needs a backend with float64 (CPU and GPU; not TPU) and
raises a ``ConfigError`` elsewhere.

A batch of keys (shape [B], one per row) draws row b's categories from key b
alone, so a row's draw does not depend on the other rows (``sampling/common.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.prime import NEG_INF

Array = jax.Array

TOP_P_RULES = ("holtzman", "mdlm")


def _excluded(logits: Array) -> Array:
  return logits <= NEG_INF / 2


def _is_static_one(x) -> bool:
  return isinstance(x, (int, float)) and float(x) == 1.0


def apply_temperature(logits: Array, temperature=1.0) -> Array:
  """logits / temperature (float32); temperature == 1 (a Python number) is a no-op.

  ``temperature`` may be a Python number or a traced scalar; it must be > 0.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if _is_static_one(temperature):
    return logits
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  scaled = logits / jnp.asarray(temperature, jnp.float32)
  return jnp.where(_excluded(logits), NEG_INF, scaled)


def _rows(x: Array) -> Array:
  return x.reshape((-1, x.shape[-1]))


def _scatter_rows(keep_sorted: Array, order: Array, num_cols: int) -> Array:
  """keep_sorted[r, j] refers to column order[r, j]; returns the [N, num_cols] mask."""
  n = keep_sorted.shape[0]
  rows = jnp.arange(n)[:, None]
  return jnp.zeros((n, num_cols), bool).at[rows, order].set(keep_sorted)


def top_k_filter(logits: Array, k: int) -> Array:
  """Keeps the k largest entries of each row (ties broken by lower index).

  k must be a static Python int; k <= 0 or k >= V turns the filter off.
  """
  logits = jnp.asarray(logits, jnp.float32)
  v = logits.shape[-1]
  k = int(k)
  if k <= 0 or k >= v:
    return logits
  flat = _rows(logits)
  _, idx = jax.lax.top_k(flat, k)                               # [N, k]
  keep = _scatter_rows(jnp.ones(idx.shape, bool), idx, v)
  keep = keep.reshape(logits.shape) & ~_excluded(logits)
  return jnp.where(keep, logits, NEG_INF)


# Bisection steps of the nucleus threshold: the bracket ends max_prob * 2**-36 wide, so the
# kept set can differ from an exact sort only for tokens within ~1e-11 of the threshold.
_TOP_P_BISECTION_STEPS = 36


def _mass_at_or_above(probs: Array, tau: Array) -> Array:
  return jnp.sum(jnp.where(probs >= tau, probs, 0.0), axis=-1, keepdims=True)


def nucleus_threshold(probs: Array, p, rule: str = "holtzman") -> Array:
  """The probability threshold tau [..., 1] of the nucleus: the kept set is {j : probs_j >= tau}.

  holtzman: the largest tau whose kept mass is >= p (the smallest top set reaching p).
  mdlm: the smallest tau whose kept mass is <= p (the largest top set not passing p).
  Found by bisection on tau, O(V) per step and no sort: on a CPU a row-wise sort of a
  4096-way vocabulary costs ~8x more, and the sampler filters every position at every
  step.  Tokens of exactly equal probability are kept or dropped together (a sort
  would split a tie at the boundary by index).
  """
  hi = jnp.max(probs, axis=-1, keepdims=True)
  lo = jnp.zeros_like(hi)
  if rule == "holtzman":        # invariant: mass(lo) >= p (mass(0) = 1)
    def step(_, bracket):
      lo, hi = bracket
      mid = 0.5 * (lo + hi)
      ok = _mass_at_or_above(probs, mid) >= p
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    lo_end, _ = jax.lax.fori_loop(0, _TOP_P_BISECTION_STEPS, step, (lo, hi))
    return jnp.where(_mass_at_or_above(probs, hi) >= p, hi, lo_end)
  hi = hi * 2.0                 # mdlm; invariant: mass(hi) <= p (mass above the max is 0)
  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    ok = _mass_at_or_above(probs, mid) <= p
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
  _, hi_end = jax.lax.fori_loop(0, _TOP_P_BISECTION_STEPS, step, (lo, hi))
  return hi_end


def top_p_filter(logits: Array, p, rule: str = "holtzman") -> Array:
  """Nucleus filter.

  rule="holtzman" (default; Holtzman et al. 2020): keep the smallest set of
    most probable tokens whose total mass is >= p, i.e. token j (in sorted
    order) is kept iff the mass strictly before it is < p.
  rule="mdlm" (MDLM/ReMDM): keep tokens whose inclusive cumulative mass is
    <= p, plus the top-1 -- it drops the token that crosses p, so it is
    slightly sharper.
  The top-1 token is always kept; tokens of equal probability are kept or
  dropped together (``nucleus_threshold``).  A Python p >= 1 turns the filter
  off; p may also be a traced scalar.
  """
  if rule not in TOP_P_RULES:
    raise ValueError(f"top-p rule must be one of {TOP_P_RULES}, got {rule!r}.")
  logits = jnp.asarray(logits, jnp.float32)
  if isinstance(p, (int, float)):
    if p >= 1.0:
      return logits
    if not p > 0.0:
      raise ValueError(f"top_p must be in (0, 1], got {p}.")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)   # f32: the threshold is a mass
  tau = nucleus_threshold(probs, jnp.asarray(p, jnp.float32), rule)
  keep = (probs >= tau) | (probs >= jnp.max(probs, axis=-1, keepdims=True))
  keep = keep & ~_excluded(logits)
  return jnp.where(keep, logits, NEG_INF)


def apply_filters(logits: Array, temperature=1.0, top_k: int = 0, top_p=1.0,
                  top_p_rule: str = "holtzman") -> Array:
  """temperature, then top-k, then top-p; float32 out, excluded entries = NEG_INF."""
  x = apply_temperature(logits, temperature)
  x = top_k_filter(x, top_k)
  x = top_p_filter(x, top_p, rule=top_p_rule)
  return x


PRECISIONS = ("float32", "float64")
_DRAW_DTYPE = contextvars.ContextVar("mdm_jax_sampling_draw_dtype", default="float32")


def draw_dtype():
  """The dtype of the samplers' random draws: float32, or float64 inside
  ``sampling_precision("float64")``."""
  return jnp.float64 if _DRAW_DTYPE.get() == "float64" else jnp.float32


@functools.lru_cache(maxsize=None)
def _has_float64(platform: str) -> bool:
  """Whether the backend computes in float64 (one probe per platform, eager even in a trace)."""
  if platform == "tpu":
    return False
  try:
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
      x = jnp.asarray(1.0, jnp.float64) + jnp.asarray(2.0 ** -40, jnp.float64)
      return x.dtype == jnp.float64 and float(x) != 1.0
  except Exception:  # pylint: disable=broad-except   # a backend that refuses float64
    return False


def check_precision(precision: str) -> None:
  """Raises ``ConfigError`` for an unknown precision, or float64 on a backend without it."""
  if precision not in PRECISIONS:
    raise ConfigError(f"sampling.precision must be one of {PRECISIONS}, got {precision!r}.")
  if precision == "float32":
    return
  platform = jax.devices()[0].platform
  if not _has_float64(platform):
    raise ConfigError(f"sampling.precision='float64' needs a backend with float64 (CPU or GPU); "
                      f"this one ({platform}) has none. Use sampling.precision='float32' (the "
                      "two-stage float32 draws with high-range Gumbel noise).")


@contextlib.contextmanager
def sampling_precision(precision: str = "float32"):
  """Trace (and compile) a sampler inside this to set the precision of its draws.

  "float32": a no-op.  "float64": JAX's 64-bit mode on, and every draw float64
  (``check_precision`` first).
  """
  check_precision(precision)
  if precision == "float32":
    yield
    return
  token = _DRAW_DTYPE.set(precision)
  try:
    with jax.enable_x64(True):
      yield
  finally:
    _DRAW_DTYPE.reset(token)


def sample_categorical(key: Array, logits: Array) -> Array:
  """One draw per row of logits [..., V] -> int32 [...], high-dynamic-range Gumbel.

  ``key``: one key, or a batch of keys [B] (logits [B, ..., V]): row b is then drawn
  from key b alone.  The Gumbel draw is in ``draw_dtype()`` (float32 unless the sampler
  runs inside ``sampling_precision("float64")``).
  """
  dtype = draw_dtype()
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if (key.ndim if typed else key.ndim - 1) >= 1:
    return jax.vmap(sample_categorical)(key, logits)
  return jax.random.categorical(
      key, jnp.asarray(logits).astype(dtype), axis=-1, mode="high").astype(jnp.int32)
