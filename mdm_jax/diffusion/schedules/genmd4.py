"""``genmd4``: state-dependent schedules, one learned exponent per (digit slot, digit value).

GenMD4 (Shi et al. 2024; docs/method/algorithms.md §2.7) lets an element's masking rate
depend on its own clean value: an element whose value is v is still unmasked at time t
with probability alpha_v(t) = 1 - t**w_v, w = softplus(theta) initialised so that w = 1
(the linear schedule).

**Which value.**  With ell = 1 the element is the token and there is one exponent per
token value, w in R^V: GenMD4 exactly.  With Prime (ell > 1) the elements are digits,
and we give one exponent per (digit slot j, digit value d), w in R^{ell x b}: digit j
of a token is masked at t with probability t**w[j, d_j].  Why this and not one exponent
per token value:

* Prime's valid bound is the masked-diffusion ELBO of the *digit* sequence, in which
  every masked digit is scored by its marginal (docs/method/prime.md §3.4).  A rate
  that depends on the digit's own value keeps that structure: the reverse rate of "slot
  j becomes d" is w[j, d] p_j(d | y_t) / t, with p_j the digit marginal the loss already
  computes, so nothing of size V x V or [B, L, ell, V] is built.  A rate that depends on
  the whole token would make a digit's reverse rate a w-weighted sum over the tokens
  that share it, a different loss per slot.
* It contains the fixed coarse-to-fine family: w[j, d] = w_j for every d is
  ``slot_poly``, so the learner can find "class digit first" (a row of slot 0 above slot
  1) and, within a slot, which classes or word endings to keep longest.
* It has ell * b parameters (128 at ell = 2 on BPE-4096) instead of V, so each is seen
  often enough to be learned in a short run.

**Loss** (per masked element of value x at time t, predicted marginal p over its b
values; the continuous-time ELBO of a CTMC whose unmasking rate depends on the value):

    (1/t) [ w_x (-log p(x)) - w_x + sum_d w_d p(d) ],

which is >= 0, 0 when p = delta_x, and (w/t) * cross-entropy when w is constant.
The ELBO's [0, t_min] part is GenMD4's reconstruction term: an element still masked at
t_min (probability t_min**w_x) is decoded from softmax_d(w_d log t_min), the law of a
masked element's value at t_min under uniform values; it costs -log of that
probability.  Both are in ``mdm_jax.diffusion.elbo``; the number reported at evaluation
is this bound with one mask, valid for every value of w.

**Gradient.**  Training draws ``schedule.num_masks`` = 2 masks per sequence at the same
t and adds the leave-one-out score term with ``log_q`` below (§2.5 (a)); the direct part
flows through the weights, the reconstruction term and the rate term.

**Sampling** (``ancestral`` only): a masked element moves to value v between t and s < t
with probability p(v) (alpha_v(s) - alpha_v(t)) / (1 - alpha_v(t)); the sampler draws v
from p and then reveals it with that value's probability (``value_alpha_fn``).

Allowed with ``prime.loss=marginal``, ``training.loss_weighting=elbo``,
``prime.chunk_point=1`` and the ``ancestral`` sampler; anything else is refused at config
time.  ``schedule.lr_scale`` multiplies the step the optimiser takes on theta (theta is
stored divided by it), ``schedule.grad_scale`` keeps its gradient out of the global-norm
clip.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.schedules.base import (SCHEDULES, Hazards, Schedule, lr_scale_from,
                                              num_masks_from)

Array = jax.Array
SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))      # softplus(0.5413) = 1


class ValueExponents(nn.Module):
  """w = softplus(lr_scale * phi) [ell, b], phi stored so that w = 1 at init."""
  ell: int
  base: int
  lr_scale: float = 1.0

  @nn.compact
  def __call__(self, length: int) -> Array:
    del length
    phi = self.param("theta", nn.initializers.constant(SOFTPLUS_INV_ONE / self.lr_scale),
                     (self.ell, self.base), jnp.float32)
    return jax.nn.softplus(self.lr_scale * phi)


def scale_gradient(x: Array, scale: float) -> Array:
  """x with its gradient multiplied by ``scale``."""
  if scale == 1.0:
    return x
  return jax.lax.stop_gradient(x) + scale * (x - jax.lax.stop_gradient(x))


def gather_values(table: Array, digits: Array) -> Array:
  """table [ell, b] read at digits [..., ell]: table[j, digits[..., j]] -> [..., ell]."""
  return table[jnp.arange(table.shape[0]), digits]


class GenMD4Schedule(Schedule):
  """alpha(t) = 1 - t**w[j, d] for digit slot j holding value d (see the module docstring)."""
  value_dependent = True

  def __init__(self, name: str = "genmd4", ell: int = 0, base: int = 0, num_masks: int = 2,
               grad_scale: float = 1.0, lr_scale: float = 1.0, learned: bool = True):
    self.name = name
    self.ell, self.base = int(ell), int(base)
    self.num_masks = int(num_masks)
    self.grad_scale = float(grad_scale)
    self.lr_scale = float(lr_scale)
    self.learned = bool(learned)

  def for_codec(self, codec) -> "GenMD4Schedule":
    return GenMD4Schedule(self.name, codec.ell, codec.base, self.num_masks, self.grad_scale,
                          self.lr_scale, self.learned)

  def module(self) -> ValueExponents:
    if not self.ell:
      raise ValueError("genmd4: call for_codec(codec) first (the table is [ell, base]).")
    return ValueExponents(self.ell, self.base, self.lr_scale)

  def param_module(self):
    return self.module() if self.learned and self.ell else None

  def check(self, loss_cfg, codec) -> None:
    allowed = ("schedule.name='genmd4' is defined with prime.loss='marginal', "
               "training.loss_weighting='elbo', prime.chunk_point=1 and sampling.sampler="
               "'ancestral' (any prime.ell)")
    if loss_cfg.form != "marginal":
      raise ConfigError(f"{allowed}; got prime.loss={loss_cfg.form!r}: a per-value rate weights "
                        "every digit on its own, which the joint loss does not.")
    if loss_cfg.weighting != "elbo":
      raise ConfigError(f"{allowed}; got training.loss_weighting={loss_cfg.weighting!r}.")
    if loss_cfg.chunk_point < 1.0 and codec.ell > 1:
      raise ConfigError(f"{allowed}; got prime.chunk_point={loss_cfg.chunk_point}.")

  # ---- exponents
  def exponents(self, params) -> Array:
    """w [ell, b] (ones when not learned)."""
    if not self.learned:
      return jnp.ones((self.ell, self.base), jnp.float32)
    w = self.module().apply({"params": params["schedule"]}, 0)
    return scale_gradient(w, self.grad_scale)

  def value_exponents(self, params, digits: Array) -> Array:
    """w of every element [B, L, ell] for the clean digits [B, L, ell]."""
    return gather_values(self.exponents(params), digits)

  def value_mask_prob(self, params, t: Array, digits: Array) -> Array:
    """P(masked at t) = t**w[j, d] per element [B, L, ell]."""
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    return jnp.exp(self.value_exponents(params, digits) * jnp.log(t))

  def value_alpha_fn(self, params) -> Callable[[Array, Array], Array]:
    """(scalar t, digits [B, L, ell]) -> alpha [B, L, ell] for the sampler."""
    w = self.exponents(params)
    return lambda t, digits: 1.0 - jnp.exp(gather_values(w, digits) * jnp.log(t))

  def reconstruction(self, params, t_min: float, digits: Array, codec=None) -> Array:
    """The [0, t_min] term per sequence [B]: sum over elements of
    P(masked at t_min) * -log softmax_d(w[j, d] log t_min)[x] (GenMD4's decoder at t_min,
    never worse than the uniform one of ``Schedule.reconstruction``)."""
    del codec
    w = self.exponents(params)
    log_t = math.log(t_min)
    log_dec = jax.nn.log_softmax(w * log_t, axis=-1)                  # [ell, b]
    p = jnp.exp(gather_values(w, digits) * log_t)
    return jnp.sum(p * -gather_values(log_dec, digits), axis=(1, 2))

  def log_q(self, params, t, masked, digits):
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    log_m = self.value_exponents(params, digits) * jnp.log(t)
    log_keep = jnp.log(jnp.maximum(-jnp.expm1(log_m), 1e-30))
    return jnp.sum(jnp.where(masked, log_m, log_keep), axis=(1, 2))

  # ---- the interface
  def hazards(self, params, t, length, digits=None) -> Hazards:
    """t**w[j, x] and w[j, x] / t for every element holding clean value x [B, L, ell]."""
    if digits is None:
      raise ValueError("genmd4 is value-dependent: hazards needs the clean digits.")
    t = jnp.asarray(t, jnp.float32)
    return Hazards(self.value_mask_prob(params, t, digits),
                   self.value_exponents(params, digits) / t[:, None, None])

  def value_weights(self, params, t):
    """w[j, d] / t for every slot j and value d [B, 1, ell, b]."""
    t = jnp.asarray(t, jnp.float32)
    return self.exponents(params)[None, None] / t[:, None, None, None]

  # ---- the value-free parts
  def mask_prob_ij(self, params, t, length):
    raise ValueError("genmd4 is value-dependent: use value_mask_prob(params, t, digits).")

  def weight_ij(self, params, t, length):
    raise ValueError("genmd4 is value-dependent: its weight is w[j, d] / t per element.")

  def alpha(self, t):
    """The population rate at initialisation (w = 1): linear."""
    return 1.0 - jnp.asarray(t, jnp.float32)

  def train_metrics(self, params, length):
    if not self.learned:
      return {}
    lw = jnp.log(jnp.maximum(self.exponents(params), 1e-30))
    out = {"schedule_log_w_std": jnp.std(lw), "schedule_log_w_max": jnp.max(lw),
           "schedule_log_w_min": jnp.min(lw)}
    for j in range(self.ell if self.ell > 1 else 0):
      out[f"schedule_log_w_slot{j}"] = jnp.mean(lw[j])
    return out

  def parameter_summary(self, params, step: int = 0) -> Optional[Dict[str, Any]]:
    """The learned exponents, for ``<workdir>/schedule/step_N.json``."""
    w = np.asarray(self.exponents(jax.device_get(params)))
    return {"step": int(step), "schedule": self.name, "ell": self.ell, "base": self.base,
            "w": w.tolist(),
            "note": "w[j][d]: exponent of digit slot j holding value d (ell = 1: token value d, "
                    "in code order); digit j is masked at t with probability t**w."}


@SCHEDULES.register("genmd4")
def genmd4(config) -> GenMD4Schedule:
  """GenMD4 per-value exponents (keys schedule.num_masks, grad_scale, lr_scale)."""
  return GenMD4Schedule(num_masks=num_masks_from(config), grad_scale=float(config.grad_scale),
                        lr_scale=lr_scale_from(config))
