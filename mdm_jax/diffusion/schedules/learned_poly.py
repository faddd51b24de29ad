"""``learned_poly``: a learned exponent per position, alpha_i(t) = 1 - t**w_i.

Every position i gets its own schedule: position i (each of its ell Prime digits,
independently) is still unmasked at time t with probability alpha_i(t) = 1 - t**w_i;
equivalently it is masked at a random time tau_i with P(tau_i <= t) = t**w_i.  The
ELBO weight of a masked position is w_i / t.  Sampling runs t from 1 to 0, so a position
with a *late* masking time (large w_i) is *decoded early*: the decoding order is
Plackett-Luce(w) (docs/method/algorithms.md §2, §2.2-§2.3).

log w comes from ``schedule.order``: ``free`` (one parameter per position, initialised
to 0, i.e. w = 1, the linear MDM schedule) or ``mlp`` (a small network on sinusoidal
position features with a zero-initialised last layer, so also w = 1 at the start).  log
w is centred (mean 0): with t >= t_min the ELBO is almost invariant to a common scale of
w (§2.4), so that direction is removed rather than left to drift; it is clipped to
+-``max_log_w``.  The module's parameters live in the model's params under
``"schedule"``.

Gradient (§2.5 (a)): the mask pattern is discrete, so the pathwise derivative through it
is zero; training draws ``schedule.num_masks`` = K >= 2 masks of the same sequence at the
same t and adds the leave-one-out (RLOO) score term (``mdm_jax.diffusion.elbo``), using
``log_q`` below.  ``schedule.grad_scale`` scales the gradient reaching these parameters
(Adam is invariant to it; it keeps their noisy gradient from dominating the global-norm
clip).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.schedules.base import SCHEDULES, PositionOrderSchedule, num_masks_from

Array = jax.Array
ORDER_PARAMS = ("free", "mlp")


class FreeOrder(nn.Module):
  """One free log-exponent per position (the length is fixed at init)."""
  max_log_w: float = 5.0

  @nn.compact
  def __call__(self, length: int) -> Array:
    theta = self.param("log_w", nn.initializers.zeros_init(), (length,), jnp.float32)
    if theta.shape[0] != length:
      raise ValueError(f"The learned schedule has {theta.shape[0]} positions but the sequence "
                       f"has {length}: a 'free' order is tied to data.seq_len (set "
                       "sampling.seq_len=0, or use schedule.order='mlp').")
    return centre_and_clip(theta, self.max_log_w)


class PositionMLPOrder(nn.Module):
  """log w_i = MLP(sinusoidal features of i / L); zero last layer, so w = 1 at init."""
  hidden: int = 64
  num_freqs: int = 16
  max_log_w: float = 5.0

  @nn.compact
  def __call__(self, length: int) -> Array:
    p = (jnp.arange(length, dtype=jnp.float32) + 0.5) / length               # (0, 1)
    k = jnp.arange(1, self.num_freqs + 1, dtype=jnp.float32)
    ang = math.pi * p[:, None] * k[None, :]
    feats = jnp.concatenate([jnp.sin(ang), jnp.cos(ang), p[:, None]], axis=-1)
    h = jnp.tanh(nn.Dense(self.hidden, name="hidden")(feats))
    out = nn.Dense(1, kernel_init=nn.initializers.zeros_init(), name="out")(h)[:, 0]
    return centre_and_clip(out, self.max_log_w)


def centre_and_clip(log_w: Array, max_log_w: float) -> Array:
  return jnp.clip(log_w - jnp.mean(log_w), -max_log_w, max_log_w)


def slope(v: Array) -> Array:
  """Least-squares slope of v against position / L (negative: left decoded first)."""
  x = (jnp.arange(v.shape[0], dtype=jnp.float32) + 0.5) / v.shape[0]
  x = x - jnp.mean(x)
  return jnp.sum(x * (v - jnp.mean(v))) / jnp.sum(x * x)


class LearnedPolySchedule(PositionOrderSchedule):
  """alpha_i(t) = 1 - t**w_i with log w_i from ``order_module`` applied to
  ``params["schedule"]`` (w = 1 everywhere when ``order_module`` is None)."""

  def __init__(self, name: str = "learned_poly", order_module: Optional[nn.Module] = None,
               num_masks: int = 2, grad_scale: float = 1.0, learned: bool = True):
    self.name = name
    self.order_module = order_module
    self.num_masks = int(num_masks)
    self.grad_scale = float(grad_scale)
    self.learned = bool(learned) and order_module is not None

  def param_module(self):
    return self.order_module if self.learned else None

  def log_w(self, params, length: int) -> Array:
    """Log-exponents [L] (zeros, i.e. w = 1, when not learned)."""
    if self.order_module is None:
      return jnp.zeros((length,), jnp.float32)
    lw = self.order_module.apply({"params": params["schedule"]}, length)
    if self.grad_scale != 1.0:   # same value, gradient scaled
      lw = jax.lax.stop_gradient(lw) + self.grad_scale * (lw - jax.lax.stop_gradient(lw))
    return lw

  def mask_prob_i(self, params, t: Array, length: int) -> Array:
    t = jnp.asarray(t, jnp.float32)[:, None]
    w = jnp.exp(self.log_w(params, length))[None, :]
    return jnp.exp(w * jnp.log(t))

  def mask_prob_ij(self, params, t, length):
    return self.mask_prob_i(params, t, length)[..., None]

  def weight_ij(self, params, t, length):
    t = jnp.asarray(t, jnp.float32)[:, None]
    return (jnp.exp(self.log_w(params, length))[None, :] / t)[..., None]

  def alpha(self, t):
    """The population rate at initialisation (w = 1): linear."""
    return 1.0 - jnp.asarray(t, jnp.float32)

  def log_q(self, params, t: Array, masked: Array, digits: Array) -> Array:
    """log q_w(z | t) per sequence [B] for the mask pattern ``masked`` [B, L, ell], in log
    space (accurate where t**w is tiny or close to 1)."""
    del digits
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    w = jnp.exp(self.log_w(params, masked.shape[1]))[None, :, None]
    log_m = w * jnp.log(t)                                   # log t**w
    log_keep = jnp.log(jnp.maximum(-jnp.expm1(log_m), 1e-30))  # log(1 - t**w)
    return jnp.sum(jnp.where(masked, log_m, log_keep), axis=(1, 2))

  def train_metrics(self, params, length):
    if not self.learned:
      return {}
    lw = self.log_w(params, length)
    return {"schedule_log_w_std": jnp.std(lw), "schedule_log_w_slope": slope(lw)}

  def mean_mask_time(self, params, length):
    w = jnp.exp(self.log_w(params, length))
    return w / (w + 1.0)

  def sample_mask_times(self, params, key, num, length):
    """tau [num, L] from the forward process (inverse transform of U(0, 1))."""
    u = jax.random.uniform(key, (num, length), jnp.float32, minval=1e-12, maxval=1.0)
    w = jnp.exp(self.log_w(params, length))[None, :]
    return jnp.exp(jnp.log(u) / w)

  def extra_summary(self, params, length, summary) -> Dict[str, Any]:
    lw = np.asarray(self.log_w(params, length))
    x = np.arange(length)
    rank = summary["mean_decode_rank"]
    return {"log_w": lw.tolist(),
            "rank_position_corr": float(np.corrcoef(x, rank)[0, 1]) if np.std(rank) > 0 else 0.0}


@SCHEDULES.register("learned_poly")
def learned_poly(config) -> LearnedPolySchedule:
  """Learned per-position polynomial exponents (keys schedule.order, order_hidden,
  max_log_w, num_masks, grad_scale)."""
  order = str(config.order)
  max_log_w = float(config.max_log_w)
  if order == "free":
    module = FreeOrder(max_log_w=max_log_w)
  elif order == "mlp":
    module = PositionMLPOrder(hidden=int(config.order_hidden), max_log_w=max_log_w)
  else:
    raise ConfigError(f"schedule.order must be one of {ORDER_PARAMS}, got {order!r}.")
  return LearnedPolySchedule(name="learned_poly", order_module=module,
                             num_masks=num_masks_from(config),
                             grad_scale=float(config.grad_scale))
