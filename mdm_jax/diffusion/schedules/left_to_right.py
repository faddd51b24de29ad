"""``left_to_right``: a fixed per-position family that reaches the left-to-right AR limit.

Position i is masked uniformly inside the window [a_i, a_i + d], with
a_i = kappa (L-1-i)/L and d = 1 - kappa (L-1)/L (kappa = ``schedule.sharpness`` in
[0, 1]):

    alpha_i(t) = 1 - clip((t - a_i) / d, 0, 1),   weight 1 / (t - a_i) inside the window, 0 outside.

kappa = 0 is the linear MDM schedule (every window is [0, 1]); as kappa -> 1 adjacent
windows stop overlapping and at kappa = 1 they tile [0, 1], so the order is exactly left
to right and, for a time-agnostic network, the ELBO *is* the left-to-right AR loss of the
same network on prefix inputs (tested).  The Plackett-Luce route to that limit
(log w_i = lambda (L-1-i), lambda -> inf) needs times within exp(-lambda L) of 1, which
float32 cannot represent beyond lambda L ~ 15, hence windows
(docs/method/algorithms.md §2.3).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.schedules.base import SCHEDULES, PositionOrderSchedule

Array = jax.Array


class LeftToRightSchedule(PositionOrderSchedule):
  """Windows [a_i, a_i + d] of sharpness kappa (see the module docstring)."""

  def __init__(self, sharpness: float = 1.0, name: str = "left_to_right"):
    self.name = name
    self.sharpness = float(sharpness)

  def window(self, length: int) -> Tuple[Array, float]:
    """Starts a_i [L] and the common width d."""
    k = float(self.sharpness)
    i = jnp.arange(length, dtype=jnp.float32)
    return k * (length - 1 - i) / length, 1.0 - k * (length - 1) / length

  def mask_prob_i(self, params, t: Array, length: int) -> Array:
    del params
    t = jnp.asarray(t, jnp.float32)[:, None]
    a, d = self.window(length)
    return jnp.clip((t - a[None, :]) / d, 0.0, 1.0)

  def mask_prob_ij(self, params, t, length):
    return self.mask_prob_i(params, t, length)[..., None]

  def weight_ij(self, params, t, length):
    del params
    t = jnp.asarray(t, jnp.float32)[:, None]
    a, d = self.window(length)
    u = t - a[None, :]
    inside = (u > 0) & (u < d)
    return jnp.where(inside, 1.0 / jnp.where(inside, u, 1.0), 0.0)[..., None]

  def alpha(self, t):
    """The mean over positions for a nominal L = 1024."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.mean(1.0 - self.mask_prob_i(None, jnp.reshape(t, (-1,)), 1024), -1).reshape(t.shape)

  def mean_mask_time(self, params, length):
    a, d = self.window(length)
    return a + 0.5 * d

  def sample_mask_times(self, params, key, num, length):
    u = jax.random.uniform(key, (num, length), jnp.float32, minval=1e-12, maxval=1.0)
    a, d = self.window(length)
    return a[None, :] + d * u


@SCHEDULES.register("left_to_right")
def left_to_right(config) -> LeftToRightSchedule:
  """Fixed windows: schedule.sharpness 0 = linear MDM, 1 = exactly left-to-right AR."""
  kappa = float(config.sharpness)
  if not 0.0 <= kappa <= 1.0:
    raise ConfigError(f"schedule.sharpness must be in [0, 1], got {kappa}.")
  return LeftToRightSchedule(sharpness=kappa)
