"""The schedule interface shared by every masking-schedule family.

A schedule says, for every (sub-)token element, the probability that it is masked at
time t in [0, 1] and the ELBO weight (hazard) of a masked element:

    m_ij(t) = 1 - alpha_ij(t),      w_ij(t) = -alpha_ij'(t) / (1 - alpha_ij(t))  >= 0,

for position i and Prime digit j.  ``mask_prob_ij(params, t, L)`` and
``weight_ij(params, t, L)`` return arrays of shape ``[B, L or 1, S or 1]``: a
*univariate* schedule (one alpha(t) for everything) returns ``[B, 1, 1]`` and the ELBO
broadcasts it; a per-position family returns ``[B, L, 1]``; a per-digit family
``[B, L, ell]``.  ``params`` is the model's parameter tree: a learned schedule reads
its own parameters from ``params["schedule"]`` (its ``param_module`` is attached to the
network by ``mdm_jax.networks.attach_schedule``, so optimizer, EMA, sharding and
checkpoints carry them); fixed schedules ignore it.

``alpha(t)`` and ``mask_prob(t)`` (one argument) are the *population* rate, the
fraction of elements unmasked at t, for samplers that need one global rate.

A new family is one file: a subclass of ``Schedule`` and a factory registered with
``@SCHEDULES.register(name)`` taking the ``config.schedule`` block (see
``univariate.py`` for the smallest example and ``learned_poly.py`` for a learned one);
``config.schedule.name = name`` selects it.  Nothing in the trainer changes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core.errors import ConfigError
from mdm_jax.core.registry import Registry

Array = jax.Array

SCHEDULES: Registry[Callable[..., "Schedule"]] = Registry("schedule", "schedule.name")


def f32(t):
  """t as an array of float32 or wider."""
  t = jnp.asarray(t)
  return t.astype(jnp.promote_types(t.dtype, jnp.float32))


def num_masks_from(config) -> int:
  """``schedule.num_masks``, checked (>= 1; 2 or more gives the leave-one-out gradient)."""
  k = int(config.num_masks)
  if k < 1:
    raise ConfigError(f"schedule.num_masks must be >= 1 (2 for the RLOO estimator), got {k}.")
  return k


def lr_scale_from(config) -> float:
  """``schedule.lr_scale``, checked (a positive finite number)."""
  lr_scale = float(config.lr_scale)
  if not (np.isfinite(lr_scale) and lr_scale > 0):
    raise ConfigError(f"schedule.lr_scale must be a positive number, got {lr_scale}.")
  return lr_scale


class Schedule:
  """The interface of a masking schedule (see the module docstring).

  Attributes every schedule has:
    name: its registered name.
    per_position: False for a univariate schedule (``[B, 1, 1]`` arrays), True when
      elements have schedules of their own (samplers then ask ``position_alpha_fn``).
    learned: whether it has parameters (``param_module``) trained with the model.
    num_masks: masks drawn per sequence in training; >= 2 gives the leave-one-out
      score-function gradient of the schedule's parameters.
    value_dependent: True when an element's rate depends on its clean value (GenMD4,
      ``genmd4.py``): the ELBO then asks ``value_mask_prob`` / ``value_exponents`` with
      the clean digits, and the ancestral sampler ``value_alpha_fn`` with the drawn ones.
    estimator: how training estimates the objective: ``"time"`` (draw t, then masks) or
      ``"order"`` (the t-free Plackett-Luce estimator over decoding orders,
      ``plackett_luce.py``; needs a time-agnostic network).  Evaluation always draws t.
  """
  name: str = ""
  per_position: bool = False
  learned: bool = False
  num_masks: int = 1
  value_dependent: bool = False
  estimator: str = "time"

  # ---- per element, t [B] -> [B, L|1, S|1]
  def mask_prob_ij(self, params, t: Array, length: int) -> Array:
    raise NotImplementedError

  def weight_ij(self, params, t: Array, length: int) -> Array:
    raise NotImplementedError

  # ---- population rate, any shape of t
  def alpha(self, t: Array) -> Array:
    raise NotImplementedError

  def mask_prob(self, t: Array) -> Array:
    """Probability 1 - alpha(t) that an element is masked at time t (population rate)."""
    return 1.0 - self.alpha(t)

  # ---- optional parts
  def for_codec(self, codec) -> "Schedule":
    """The schedule for this codec (a per-digit family needs ell); default: itself."""
    del codec
    return self

  def check(self, loss_cfg, codec) -> None:
    """Raises ``ConfigError`` for a combination this family does not define."""
    if self.per_position and loss_cfg.weighting != "elbo":
      raise ConfigError(f"training.loss_weighting={loss_cfg.weighting!r} is not defined for the "
                        f"per-position schedule {self.name!r}: use 'elbo'.")
    if self.per_position and loss_cfg.chunk_point < 1.0 and codec.ell > 1:
      raise ConfigError(f"prime.chunk_point (grouped noise) is defined for univariate schedules "
                        f"only, not schedule.name={self.name!r}: set --config.prime.chunk_point=1.")

  def param_module(self):
    """A Flax module ``(length) -> ...`` whose parameters live in ``params["schedule"]``."""
    return None

  def log_q(self, params, t: Array, masked: Array, digits: Optional[Array] = None) -> Array:
    """log q(mask pattern | t) per sequence [B] (learned schedules: the score term);
    ``digits`` are the clean digits (used by value-dependent schedules only)."""
    raise NotImplementedError(f"{self.name}: log q is only defined for learned schedules.")

  def position_alpha_fn(self, params, length: int) -> Callable[[Array], Array]:
    """A closure scalar t -> alpha_ij(t) [L, S] for the samplers (per-position schedules)."""
    return lambda t: 1.0 - self.mask_prob_ij(params, jnp.reshape(t, (1,)), length)[0]

  def train_metrics(self, params, length: int) -> Dict[str, Array]:
    """Scalars logged with the training loss (learned schedules: their parameters)."""
    del params, length
    return {}

  def order_summary(self, params, length: int, *, step: int = 0,
                    num_samples: int = 2048, seed: int = 0) -> Optional[Dict[str, Any]]:
    """The decoding order per position (for the order picture), or None."""
    del params, length, step, num_samples, seed
    return None


class PositionOrderSchedule(Schedule):
  """A per-position schedule with a decoding order to show: subclasses give the mean
  masking time E[tau_i] and draws of the masking times tau [num, L]."""
  per_position = True

  def mean_mask_time(self, params, length: int) -> Array:
    raise NotImplementedError

  def sample_mask_times(self, params, key: Array, num: int, length: int) -> Array:
    raise NotImplementedError

  def order_summary(self, params, length: int, *, step: int = 0, num_samples: int = 2048,
                    seed: int = 0) -> Optional[Dict[str, Any]]:
    """Mean masking/unmasking time and mean decoding rank (0 = decoded first) per position."""
    taus = self.sample_mask_times(params, jax.random.key(seed), num_samples, length)
    rank = jnp.argsort(jnp.argsort(-taus, axis=-1), axis=-1)     # latest-masked decodes first
    out = {
        "step": int(step), "schedule": self.name, "seq_len": int(length),
        "mean_unmask_time": np.asarray(self.mean_mask_time(params, length)).tolist(),
        "mean_decode_rank": np.asarray(jnp.mean(rank.astype(jnp.float32), 0)).tolist(),
        "note": ("Generation runs t from 1 to 0: a position with a larger mean unmasking time "
                 "is decoded earlier; rank 0 is decoded first."),
    }
    out.update(self.extra_summary(params, length, out))
    return out

  def extra_summary(self, params, length: int, summary: Dict[str, Any]) -> Dict[str, Any]:
    del params, length, summary
    return {}


class UnivariateSchedule(Schedule):
  """One schedule for every element: alpha(t), dalpha/dt and the ELBO weight -alpha'/(1-alpha).

  ``UnivariateSchedule(name, alpha=..., dalpha=..., weight=...)`` takes the three as
  closed-form functions of t.  The weight is given in its own closed form (rather than
  computed from alpha and alpha') so that it stays accurate as t -> 0, where
  1 - alpha -> 0.  All arithmetic is float32 or wider.
  """

  def __init__(self, name: str, alpha: Callable[[Array], Array], dalpha: Callable[[Array], Array],
               weight: Callable[[Array], Array]):
    self.name = name
    self.alpha = alpha
    self.dalpha = dalpha
    self.weight = weight

  def mask_prob_ij(self, params, t, length):
    del params, length
    return self.mask_prob(t)[:, None, None]

  def weight_ij(self, params, t, length):
    del params, length
    return self.weight(t)[:, None, None]

  def __repr__(self):
    return f"UnivariateSchedule({self.name!r})"
