"""``plackett_luce``: learned per-position orders trained by the t-free order estimator.

The schedule is ``learned_poly``'s: position i (each of its Prime digits on its own) is
masked at time t with probability t**w_i, log w from ``schedule.order`` (``free`` or
``mlp``, w = 1 at the start), so the decoding order is Plackett-Luce(w) over the
L * ell digits, each digit carrying its position's weight (docs/method/algorithms.md
§2.3).  What changes is how training estimates the objective (§2.5 (b)).  For a
time-agnostic network the untruncated ELBO is the expected any-order autoregressive
loss, and choosing the next digit to decode given the decoded set D (probability
w_j / W_rest, W_rest the sum of w over the undecoded digits) gives

    ELBO = N E_{k ~ U{0..N-1}} E_{D ~ PL prefix of length k}
           [ sum_{j not in D} (w_j / W_rest) (-log p(x_j | x_D)) ],   N = L * ell.

Per sequence training draws k (stratified over the batch through the trainer's times),
``schedule.num_masks`` = 2 ordered prefixes of length k by the Gumbel-top-k trick on
log w, runs the network once on each, and adds the leave-one-out score term with the
prefix's Plackett-Luce log-probability sum_m [log w_{s_m} - log sum_{j not before m}
w_j] (``mdm_jax.diffusion.elbo.order_loss``).  There is no time and so no 1/t tail: the
estimator stays well behaved when w is far from flat, the left-to-right limit
included, where the time-sampled one's variance grows without bound.

Evaluation is unchanged: the time-sampled bound with one mask, valid for every w.
Needs ``model.time_conditioning=False`` (the network sees no time in training) and
``prime.loss=marginal``; refused at config time otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.schedules.base import SCHEDULES
from mdm_jax.diffusion.schedules.learned_poly import LearnedPolySchedule, learned_poly

Array = jax.Array


class PlackettLuceSchedule(LearnedPolySchedule):
  """``learned_poly``'s schedule, trained with the t-free order estimator."""
  estimator = "order"
  needs_time_agnostic = True

  def check(self, loss_cfg, codec) -> None:
    super().check(loss_cfg, codec)
    if loss_cfg.form != "marginal":
      raise ConfigError("schedule.name='plackett_luce' scores every masked digit by its "
                        "marginal: it is defined with prime.loss='marginal', "
                        "training.loss_weighting='elbo' and model.time_conditioning=False.")

  def element_log_w(self, params, length: int, ell: int) -> Array:
    """log w of every digit in the order of ``codec.flatten`` [L * ell]."""
    return jnp.repeat(self.log_w(params, length), ell)


@SCHEDULES.register("plackett_luce")
def plackett_luce(config) -> PlackettLuceSchedule:
  """Per-position exponents trained with the t-free estimator (keys as ``learned_poly``)."""
  base = learned_poly(config)
  return PlackettLuceSchedule(name="plackett_luce", order_module=base.order_module,
                              num_masks=base.num_masks, grad_scale=base.grad_scale)
