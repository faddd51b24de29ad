"""Univariate masking schedules alpha(t), t in [0, 1].

alpha(t) is the probability that a (sub-)token is still *unmasked* at time t:
alpha(0) = 1 (clean data) and alpha(1) = 0 (everything masked; the geometric
schedule reaches exp(-(sigma_max - sigma_min)) instead, ~2e-9 by default).

Every schedule gives alpha and its exact derivative dalpha/dt, and the
continuous-time ELBO weight

    weight(t) = -alpha'(t) / (1 - alpha(t))  >= 0,

each in a closed form that stays accurate as t -> 0 (where 1 - alpha -> 0 and
the weight behaves like c / t).  All arithmetic is float32 or wider.

Adding one is a function plus a registration::

    @SCHEDULES.register("my_schedule")
    def my_schedule(config=None) -> UnivariateSchedule:
      return UnivariateSchedule("my_schedule", alpha=..., dalpha=..., weight=...)

and a config line ``schedule.name = "my_schedule"`` selects it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from mdm_jax.diffusion.schedules.base import SCHEDULES, UnivariateSchedule, f32


def _key(config, key: str, default: float) -> float:
  """``config.schedule[key]`` as a float, ``default`` without a config or the key."""
  return float(default if config is None else config.get(key, default))


@SCHEDULES.register("linear")
def linear(config=None) -> UnivariateSchedule:
  """alpha = 1 - t (MDLM's log-linear schedule without its eps); weight 1/t."""
  del config
  return UnivariateSchedule(
      name="linear",
      alpha=lambda t: 1.0 - f32(t),
      dalpha=lambda t: -jnp.ones_like(f32(t)),
      weight=lambda t: 1.0 / f32(t))


@SCHEDULES.register("loglinear")
def loglinear(config=None) -> UnivariateSchedule:
  """MDLM's log-linear schedule, ending fully masked: alpha = (1 - t)(1 + eps t).

  Near t = 0 this is MDLM's alpha = 1 - (1-eps) t (they differ by eps t^2 <= eps), and
  alpha(1) = 0 exactly, so the all-masked start of the samplers is the t = 1 state and
  the ELBO needs no prior term.  1 - alpha = t (1 - eps (1 - t)),
  alpha' = -(1 - eps + 2 eps t), weight (1 - eps + 2 eps t) / (t (1 - eps + eps t)) ~ 1/t.
  """
  eps = _key(config, "eps", 1e-3)
  if not 0 <= eps < 1:
    raise ValueError(f"schedule.eps must be in [0, 1) for the loglinear schedule, got {eps}.")
  c = 1.0 - eps
  return UnivariateSchedule(
      name="loglinear",
      alpha=lambda t: (1.0 - f32(t)) * (1.0 + eps * f32(t)),
      dalpha=lambda t: -(c + 2.0 * eps * f32(t)),
      weight=lambda t: (c + 2.0 * eps * f32(t)) / (f32(t) * (c + eps * f32(t))))


@SCHEDULES.register("polynomial")
def polynomial(config=None) -> UnivariateSchedule:
  """alpha = 1 - t**w; weight w / t (exact, no cancellation)."""
  w = _key(config, "power", 1.0)
  if not w > 0:
    raise ValueError(f"schedule.power must be > 0 for the polynomial schedule, got {w}.")
  return UnivariateSchedule(
      name="polynomial",
      alpha=lambda t: 1.0 - f32(t) ** w,
      dalpha=lambda t: -w * f32(t) ** (w - 1.0),
      weight=lambda t: w / f32(t))


@SCHEDULES.register("cosine")
def cosine(config=None) -> UnivariateSchedule:
  """MD4 cosine: alpha = 1 - cos(pi/2 (1 - t)).

  1 - alpha = cos(pi/2 (1-t)) = sin(pi t / 2), alpha' = -(pi/2) cos(pi t / 2),
  so the weight is (pi/2) / tan(pi t / 2), which ~ 1/t as t -> 0.
  """
  del config
  h = math.pi / 2
  return UnivariateSchedule(
      name="cosine",
      alpha=lambda t: 1.0 - jnp.sin(h * f32(t)),
      dalpha=lambda t: -h * jnp.cos(h * f32(t)),
      weight=lambda t: h / jnp.tan(h * f32(t)))


@SCHEDULES.register("geometric")
def geometric(config=None) -> UnivariateSchedule:
  """SEDD-style geometric total noise, shifted so that alpha(0) = 1 exactly.

  s(t) = smin^(1-t) smax^t - smin, alpha = exp(-s(t)),
  weight = s'(t) / expm1(s(t)) with s'(t) = (s(t) + smin) log(smax/smin).
  """
  smin = _key(config, "sigma_min", 1e-4)
  smax = _key(config, "sigma_max", 20.0)
  if not 0 < smin < smax:
    raise ValueError(f"geometric schedule needs 0 < sigma_min < sigma_max, got {smin}, {smax}.")
  log_ratio = math.log(smax / smin)

  def total(t):
    # smin * (exp(t log r) - 1), accurate for small t.
    return smin * jnp.expm1(f32(t) * log_ratio)

  def rate(t):
    return smin * jnp.exp(f32(t) * log_ratio) * log_ratio

  return UnivariateSchedule(
      name="geometric",
      alpha=lambda t: jnp.exp(-total(t)),
      dalpha=lambda t: -rate(t) * jnp.exp(-total(t)),
      weight=lambda t: rate(t) / jnp.expm1(total(t)))
