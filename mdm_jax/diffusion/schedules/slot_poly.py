"""``slot_poly``: one exponent per Prime digit slot, coarse-to-fine decoding.

Digit slot j of every token is masked at time t with probability t**w_j, with

    log w_j = kappa (ell - 1 - j) / (ell - 1),  shifted so that min_j w_j = 1,

kappa = ``schedule.slot_tilt``.  Each masked digit has its own ELBO weight w_j / t, so
the loss is the same continuous-time ELBO with a per-digit hazard (every masked digit
scored by its marginal), a valid bound; only Prime's ``marginal`` form defines it.
kappa > 0 masks a token's leading (most significant) digits later, so the sampler
decodes them first: coarse to fine.  With ``data.token_order=context`` the leading digit
is a word class, so samples get their classes before their words.  kappa = 0 is the
linear schedule, draw for draw; kappa < 0 decodes the trailing digits first.  Fixed, so
it costs nothing in training.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.schedules.base import SCHEDULES, Schedule

Array = jax.Array


class SlotPolySchedule(Schedule):
  """alpha_j(t) = 1 - t**w_j for digit slot j (see the module docstring)."""
  per_position = True
  per_digit_hazards = True

  def __init__(self, slot_tilt: float = 1.0, ell: int = 1, name: str = "slot_poly"):
    self.name = name
    self.slot_tilt = float(slot_tilt)
    self.ell = int(ell)

  def for_codec(self, codec) -> "SlotPolySchedule":
    return SlotPolySchedule(self.slot_tilt, int(codec.ell), self.name)

  def check(self, loss_cfg, codec) -> None:
    super().check(loss_cfg, codec)
    if loss_cfg.form != "marginal":
      raise ConfigError("schedule.name='slot_poly' weights every digit on its own, which only "
                        "the marginal form defines: set prime.loss='marginal'.")

  def slot_log_w(self) -> Array:
    """Log-exponents [ell], kappa (ell - 1 - j) / (ell - 1) shifted so the smallest is 0.

    No exponent is below 1, so every digit is as unmasked at t_min as under the linear
    schedule (t_min**w <= t_min) and the [0, t_min] reconstruction term stays negligible;
    a w < 1 would leave t_min**w of that digit masked (0.001**0.37 = 8%) and pay
    log b for each in the bound.
    """
    if self.ell == 1:
      return jnp.zeros((1,), jnp.float32)
    j = jnp.arange(self.ell, dtype=jnp.float32)
    lw = float(self.slot_tilt) * (self.ell - 1 - j) / (self.ell - 1)
    return lw - jnp.min(lw)

  def _w(self, params) -> Array:
    """The exponents [1, 1, ell] (a learned subclass reads them from ``params``)."""
    del params
    return jnp.exp(self.slot_log_w())[None, None, :]

  def mask_prob_ij(self, params, t, length):
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    return jnp.broadcast_to(jnp.exp(self._w(params) * jnp.log(t)), (t.shape[0], length, self.ell))

  def weight_ij(self, params, t, length):
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    return jnp.broadcast_to(self._w(params) / t, (t.shape[0], length, self.ell))

  def alpha(self, t):
    """The population rate: the mean over a token's digits."""
    t = jnp.asarray(t, jnp.float32)
    w = jnp.exp(self.slot_log_w())
    return 1.0 - jnp.mean(jnp.exp(w * jnp.log(t)[..., None]), axis=-1)


@SCHEDULES.register("slot_poly")
def slot_poly(config) -> SlotPolySchedule:
  """Per-digit exponents tilted by schedule.slot_tilt (0 = linear)."""
  kappa = float(config.slot_tilt)
  if not math.isfinite(kappa) or abs(kappa) > 10.0:
    raise ConfigError(f"schedule.slot_tilt must be a finite number in [-10, 10], got {kappa}.")
  return SlotPolySchedule(slot_tilt=kappa)
