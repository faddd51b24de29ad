"""``learned_tilt``: the coarse-to-fine ``slot_poly`` schedule with its tilt learned.

Digit slot j of every token is masked at time t with probability t**w_j, as in
``slot_poly``, but log w_j is a free parameter per slot, learned with the model from
log w = 0 (the linear schedule) instead of set by hand:

    log w_j = theta_j - min_k theta_k,

so the smallest exponent is 1, exactly as ``slot_poly`` keeps it (the [0, t_min] term
stays as small as the linear schedule's).  The tilt kappa = log w_0 - log w_{ell-1}
(leading digit against trailing digit) is logged as ``train/schedule_kappa``; with
ell = 2 the family *is* ``slot_poly`` with kappa = theta_0 - theta_1, from kappa = 0.

Each masked digit is weighted by its own hazard w_j / t and scored by its marginal, so
this is the same valid bound as ``slot_poly`` (``prime.loss=marginal`` only), and
``prime.ell >= 2`` (with one digit there is nothing to tilt).  The gradient is the
two-mask leave-one-out estimator of ``learned_poly`` (docs/method/algorithms.md §2.5
(a)) with ``log_q`` below.  ``schedule.lr_scale`` multiplies the optimiser's step on
theta (theta is stored divided by it).  A tilt per (slot, digit value), which also
lets classes differ, is ``genmd4``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.schedules.base import SCHEDULES, lr_scale_from, num_masks_from
from mdm_jax.diffusion.schedules.genmd4 import scale_gradient
from mdm_jax.diffusion.schedules.slot_poly import SlotPolySchedule

Array = jax.Array


class SlotLogW(nn.Module):
  """log w [ell], the smallest at 0; theta stored divided by lr_scale, zero at init."""
  ell: int
  lr_scale: float = 1.0

  @nn.compact
  def __call__(self, length: int) -> Array:
    del length
    theta = self.lr_scale * self.param("theta", nn.initializers.zeros_init(), (self.ell,),
                                       jnp.float32)
    return theta - jnp.min(theta)


class LearnedTiltSchedule(SlotPolySchedule):
  """alpha_j(t) = 1 - t**w_j with log w_j learned (see the module docstring)."""
  learned = True

  def __init__(self, ell: int = 1, num_masks: int = 2, grad_scale: float = 1.0,
               lr_scale: float = 1.0, name: str = "learned_tilt"):
    super().__init__(slot_tilt=0.0, ell=ell, name=name)
    self.num_masks = int(num_masks)
    self.grad_scale = float(grad_scale)
    self.lr_scale = float(lr_scale)

  def for_codec(self, codec) -> "LearnedTiltSchedule":
    return LearnedTiltSchedule(int(codec.ell), self.num_masks, self.grad_scale, self.lr_scale,
                               self.name)

  def check(self, loss_cfg, codec) -> None:
    if codec.ell < 2:
      raise ConfigError("schedule.name='learned_tilt' tilts a token's digits, so it needs "
                        "prime.ell >= 2 with prime.loss='marginal'; for prime.ell=1 use "
                        "'genmd4' (a learned exponent per token value) or 'learned_poly'.")
    super().check(loss_cfg, codec)

  def param_module(self):
    return SlotLogW(self.ell, self.lr_scale)

  def log_w(self, params) -> Array:
    """log w [ell] (min 0)."""
    lw = self.param_module().apply({"params": params["schedule"]}, 0)
    return scale_gradient(lw, self.grad_scale)

  def _w(self, params) -> Array:
    return jnp.exp(self.log_w(params))[None, None, :]

  def alpha(self, t):
    """The population rate at initialisation (log w = 0): linear."""
    return 1.0 - jnp.asarray(t, jnp.float32)

  def position_alpha_fn(self, params, length):
    w = jnp.exp(self.log_w(params))
    return lambda t: jnp.broadcast_to(1.0 - jnp.exp(w * jnp.log(t)), (length, self.ell))

  def log_q(self, params, t, masked, digits):
    del digits
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    log_m = self._w(params) * jnp.log(t)
    log_keep = jnp.log(jnp.maximum(-jnp.expm1(log_m), 1e-30))
    return jnp.sum(jnp.where(masked, log_m, log_keep), axis=(1, 2))

  def train_metrics(self, params, length):
    lw = self.log_w(params)
    return {"schedule_kappa": lw[0] - lw[-1], "schedule_log_w_max": jnp.max(lw)}


@SCHEDULES.register("learned_tilt")
def learned_tilt(config) -> LearnedTiltSchedule:
  """A learned per-slot tilt (keys schedule.num_masks, grad_scale, lr_scale)."""
  return LearnedTiltSchedule(num_masks=num_masks_from(config),
                             grad_scale=float(config.grad_scale), lr_scale=lr_scale_from(config))
