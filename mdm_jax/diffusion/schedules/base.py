"""The schedule interface shared by every masking-schedule family.

A schedule says, for every (sub-)token element, the probability that it is masked at
time t in [0, 1] and the ELBO weight (hazard) of a masked element:

    m_ij(t) = 1 - alpha_ij(t),      w_ij(t) = -alpha_ij'(t) / (1 - alpha_ij(t)) = m_ij'(t) / m_ij(t)  >= 0,

for position i and Prime digit j.  The ELBO and the samplers ask one method for both,
``hazards(params, t, length, digits) -> Hazards(mask_prob, weight)``: two arrays that
broadcast to ``[B, L, S]`` (S = ell digits per token).  A *univariate* schedule (one
alpha(t) for everything) returns ``[B, 1, 1]``, a per-position family ``[B, L, 1]``, a
per-digit or value-dependent one ``[B, L, S]``; the consumers broadcast and never look
at the shape.  ``params`` is the model's parameter tree: a learned schedule reads its
own parameters from ``params["schedule"]`` (its ``param_module`` is attached to the
network by ``mdm_jax.networks.attach_schedule``, so optimizer, EMA, sharding and
checkpoints carry them); fixed schedules ignore it.

A family usually writes only ``mask_prob_ij``: the default ``weight_ij`` is derived from
it with ``jax.jvp`` (w = m'/m) and the default ``log_q`` is the Bernoulli law of the
mask pattern under it.  A closed form may override either (the univariate closed forms
keep their weight accurate as t -> 0, where m -> 0).

Capabilities are declared class attributes with defaults here (``learned``,
``per_position``, ``per_digit_hazards``, ``value_dependent``, ``estimator``,
``needs_time_agnostic``); the code that needs one reads the attribute and then calls the
method that goes with it, each of which has a default on this class.

``alpha(t)`` and ``mask_prob(t)`` (one argument) are the *population* rate, the
fraction of elements unmasked at t, for samplers that need one global rate.

A new family is one file: a subclass of ``Schedule`` and a factory registered with
``@SCHEDULES.register(name)`` taking the ``config.schedule`` block (see
``univariate.py`` for the smallest example and ``learned_poly.py`` for a learned one);
``config.schedule.name = name`` selects it.  Nothing in the trainer changes, and
``mdm_jax.diffusion.schedules.conformance.check_schedule`` checks the new family against
this contract (the test suite runs it over every registered name).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional

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


class Hazards(NamedTuple):
  """What a schedule says about every element at times t [B]: both broadcast to [B, L, S].

  mask_prob: P(the element is masked at t) = 1 - alpha_ij(t).
  weight: the ELBO weight of a masked element, -alpha_ij'(t) / (1 - alpha_ij(t)).
  """
  mask_prob: Array
  weight: Array


def _safe_ratio(num: Array, den: Array) -> Array:
  """num / den where den > 0, else 0 (an element that is never masked has no weight)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


class Schedule:
  """The interface of a masking schedule (see the module docstring).

  Declared capabilities (class attributes; a family sets the ones that differ):
    name: its registered name.
    learned: whether it has parameters (``param_module``) trained with the model.
    num_masks: masks drawn per sequence in training; >= 2 gives the leave-one-out
      score-function gradient of the schedule's parameters (``log_q``).
    per_position: False for a univariate schedule (one alpha(t) for every element);
      True when elements have schedules of their own (samplers then ask
      ``position_alpha_fn``).
    per_digit_hazards: True when the digits of one token have different weights (each
      masked digit is then scored on its own, so only ``prime.loss=marginal`` defines it).
    value_dependent: True when an element's rate depends on its clean value (GenMD4,
      ``genmd4.py``): ``hazards`` then reads the clean digits, the ELBO asks
      ``value_weights`` for the rate of every value, and the ancestral sampler
      ``value_alpha_fn``.
    estimator: how training estimates the objective: ``"time"`` (draw t, then masks) or
      ``"order"`` (the t-free Plackett-Luce estimator over decoding orders, which asks
      ``element_log_w``; ``plackett_luce.py``).  Evaluation always draws t.
    needs_time_agnostic: the estimator needs ``model.time_conditioning=False``.
  """
  name: str = ""
  learned: bool = False
  num_masks: int = 1
  per_position: bool = False
  per_digit_hazards: bool = False
  value_dependent: bool = False
  estimator: str = "time"
  needs_time_agnostic: bool = False

  # ---- per element: what the ELBO and the samplers ask
  def hazards(self, params, t: Array, length: int, digits: Optional[Array] = None) -> Hazards:
    """Mask probabilities and weights at times t [B], each broadcasting to [B, L, S].

    ``digits`` [B, L, S] are the clean digits; only a value-dependent schedule reads them.
    """
    del digits
    return Hazards(self.mask_prob_ij(params, t, length), self.weight_ij(params, t, length))

  def mask_prob_ij(self, params, t: Array, length: int) -> Array:
    """P(masked at t) per element, t [B] -> [B, L|1, S|1] (the family's law)."""
    raise NotImplementedError(f"{self.name}: a schedule defines mask_prob_ij (or hazards).")

  def weight_ij(self, params, t: Array, length: int) -> Array:
    """The ELBO weight m'(t) / m(t) per element [B, L|1, S|1], by default derived from
    ``mask_prob_ij`` with ``jax.jvp`` (0 where the element is never masked)."""
    t = f32(t)
    m, dm = jax.jvp(lambda s: self.mask_prob_ij(params, s, length), (t,), (jnp.ones_like(t),))
    return _safe_ratio(dm, m)

  def log_q(self, params, t: Array, masked: Array, digits: Array) -> Array:
    """log q(mask pattern | t) per sequence [B] for ``masked`` [B, L, S] (the score term of
    a learned schedule); by default the Bernoulli law of ``hazards``' mask probabilities.
    ``digits`` are the clean digits (read by value-dependent schedules only)."""
    m = jnp.broadcast_to(self.hazards(params, t, masked.shape[1], digits).mask_prob,
                         masked.shape)
    tiny = jnp.float32(1e-30)
    log_m = jnp.log(jnp.maximum(m, tiny))
    log_keep = jnp.log(jnp.maximum(1.0 - m, tiny))
    return jnp.sum(jnp.where(masked, log_m, log_keep), axis=(1, 2))

  def reconstruction(self, params, t_min: float, digits: Array, codec) -> Array:
    """The exact cost per sequence [B] of [0, t_min] when the digits still masked at t_min
    are filled uniformly: E[#masked digits] * log b.  Tiny, but keeps the bound strict."""
    t = jnp.full((digits.shape[0],), t_min, jnp.float32)
    m = jnp.broadcast_to(self.hazards(params, t, digits.shape[1], digits).mask_prob,
                         digits.shape)
    return jnp.sum(m, axis=(1, 2)) * math.log(codec.base)

  def value_weights(self, params, t: Array) -> Array:
    """``value_dependent`` only: the weight of a masked element for each value d it may
    take, [B, 1, S, b] (the rate of unmasking to d is this times p(d | y_t))."""
    raise NotImplementedError(f"{self.name}: value_weights is defined for value-dependent "
                              "schedules only.")

  def element_log_w(self, params, length: int, ell: int) -> Array:
    """``estimator == "order"`` only: the Plackett-Luce log-weight of every digit, in the
    order of ``codec.flatten`` [L * ell]."""
    raise NotImplementedError(f"{self.name}: element_log_w is defined for the order "
                              "estimator only.")

  # ---- population rate, any shape of t
  def alpha(self, t: Array) -> Array:
    raise NotImplementedError

  def mask_prob(self, t: Array) -> Array:
    """Probability 1 - alpha(t) that an element is masked at time t (population rate)."""
    return 1.0 - self.alpha(t)

  # ---- for the samplers
  def position_alpha_fn(self, params, length: int) -> Callable[[Array], Array]:
    """A closure scalar t -> alpha_ij(t) [L, S] for the samplers (per-position schedules)."""
    return lambda t: 1.0 - self.mask_prob_ij(params, jnp.reshape(t, (1,)), length)[0]

  def value_alpha_fn(self, params) -> Callable[[Array, Array], Array]:
    """``value_dependent`` only: (scalar t, digits [B, L, S]) -> alpha [B, L, S]."""
    raise NotImplementedError(f"{self.name}: value_alpha_fn is defined for value-dependent "
                              "schedules only.")

  # ---- set-up, checks and reports
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
    if self.per_digit_hazards and loss_cfg.form != "marginal" and codec.ell > 1:
      raise ConfigError(f"schedule.name={self.name!r} weights every digit on its own, which only "
                        "the marginal form defines: set prime.loss='marginal'.")

  def param_module(self):
    """A Flax module ``(length) -> ...`` whose parameters live in ``params["schedule"]``."""
    return None

  def train_metrics(self, params, length: int) -> Dict[str, Array]:
    """Scalars logged with the training loss (learned schedules: their parameters)."""
    del params, length
    return {}

  def order_summary(self, params, length: int, *, step: int = 0,
                    num_samples: int = 2048, seed: int = 0) -> Optional[Dict[str, Any]]:
    """The decoding order per position (for the order picture), or None."""
    del params, length, step, num_samples, seed
    return None

  def parameter_summary(self, params, step: int = 0) -> Optional[Dict[str, Any]]:
    """The learned parameters for ``<workdir>/schedule/step_N.json``, or None."""
    del params, step
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
  functions of t.  ``dalpha`` defaults to ``jax.jvp`` of ``alpha`` and ``weight`` to
  -dalpha / (1 - alpha); the built-in families give the weight in its own closed form
  instead, which stays accurate as t -> 0, where 1 - alpha -> 0.  All arithmetic is
  float32 or wider.  ``hazards`` returns [B, 1, 1] arrays (the broadcast case).
  """

  def __init__(self, name: str, alpha: Callable[[Array], Array],
               dalpha: Optional[Callable[[Array], Array]] = None,
               weight: Optional[Callable[[Array], Array]] = None):
    self.name = name
    self.alpha = alpha
    if dalpha is None:
      def dalpha(t):
        t = f32(t)
        return jax.jvp(alpha, (t,), (jnp.ones_like(t),))[1]
    if weight is None:
      weight = lambda t: _safe_ratio(-dalpha(t), 1.0 - alpha(t))
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
