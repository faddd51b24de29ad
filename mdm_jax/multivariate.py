"""Multivariate (per-position) masking schedules: learned decoding orders.

Every position i gets its own schedule alpha_i(t) (algorithms.md §2).  Position
i (each of its ell Prime digits, independently) is still unmasked at time t
with probability alpha_i(t); equivalently it is masked at a random time tau_i
with P(tau_i <= t) = 1 - alpha_i(t).  Sampling runs t from 1 to 0, so a
position with a *late* masking time is *decoded early*.

Continuous-time ELBO (exact for per-position schedules; §2.2)::

    NELBO(x) = sum_i int_0^1 w_i(t) E_{y_t}[ 1{i masked} * -log p(x_i | y_t) ] dt,
    w_i(t) = -alpha_i'(t) / (1 - alpha_i(t)),

i.e. the univariate ELBO of ``losses.diffusion_loss`` with each masked
(sub-)token weighted by its own hazard.  It goes through the same per-token
Prime/MDM loss (``losses.prime_token_nll``), the same [t_min, 1] sampling with
the (1 - t_min) factor, and the same strict reconstruction term for [0, t_min]
(now sum_i (1 - alpha_i(t_min)) * ell * log b), so the evaluation value is a
valid bound for *every* schedule parameter.  With a time-agnostic network the
bound equals the expected autoregressive loss over decoding orders (§2.3).

Families (``config.schedule.name``; one config line switches from ``cosine``):

* ``learned_poly``: alpha_i(t) = 1 - t**w_i, weight w_i / t.  The decoding
  order is Plackett-Luce(w): a larger w_i is masked later, decoded earlier.
  log w comes from ``schedule.order``: ``free`` (one parameter per position,
  initialised to 0, i.e. w = 1, the linear MDM schedule) or ``mlp`` (a small
  network on sinusoidal position features; zero-initialised last layer, so
  also w = 1 at the start).  log w is centred (mean 0): with t >= t_min the
  ELBO is almost invariant to a common scale of w (§2.4), so that direction
  is removed instead of left to drift; it is clipped to +-``max_log_w``.
  Its parameters live in the model's params pytree under ``"schedule"`` (see
  ``attach``), so the optimizer, EMA, sharding and checkpoints carry them.
* ``left_to_right``: a fixed family with sharpness kappa in [0, 1].  Position
  i is masked uniformly inside the window [a_i, a_i + d], a_i = kappa (L-1-i)/L,
  d = 1 - kappa (L-1)/L: alpha_i(t) = 1 - clip((t - a_i) / d, 0, 1), weight
  1 / (t - a_i) inside the window and 0 outside.  kappa = 0 is the linear MDM
  schedule (all windows are [0, 1]); as kappa -> 1 adjacent windows stop
  overlapping and at kappa = 1 they tile [0, 1], so the order is exactly left to
  right and, for a time-agnostic network, the ELBO *is* the left-to-right AR
  loss of the same network on prefix inputs (tested).  The Plackett-Luce route
  to the same limit, log w_i = lambda (L-1-i) with lambda -> inf, needs times
  within exp(-lambda L) of 1, which float32 cannot represent beyond lambda L ~ 15,
  so the fixed-order family uses windows instead.

* ``slot_poly`` (Prime, per *digit* rather than per position): alpha_j(t) = 1 - t**w_j
  for digit slot j of every token, weight w_j / t on each masked digit, with
  log w_j = kappa (ell-1-j)/(ell-1) shifted to min 0 (kappa = ``schedule.slot_tilt``).
  kappa > 0 masks the leading digits later, so generation decodes them first: coarse
  to fine, and with ``data.token_order=context`` the leading digit is a word class, so
  the sampler writes the sentence's classes before its words.  The same ELBO with a
  per-digit hazard (each masked digit scored by its marginal, ``losses.digit_marginal_nll``);
  only the ``marginal`` form defines it.  kappa = 0 is the linear schedule, draw for draw.

Gradient estimator for the schedule parameters (§2.5 (a)).  The mask pattern
is discrete, so the pathwise derivative through it is zero; the gradient of
E_z[f(z; w)] is E[d f/dw] + E[f d log q_w(z|t)/dw].  Training draws
``schedule.num_masks`` = K >= 2 independent masks of the same sequence at the
same t (one network call on a K-times larger batch) and uses the
leave-one-out (RLOO) score term

    S = mean_k f_k + sum_k sg(f_k - mean_{j != k} f_j) log q_w(z_k | t) / K,

whose autodiff is an unbiased gradient for both the network and w: the direct
part flows through the weights w_i / t, the score part through
log q_w(z|t) = sum_{i, digits} [masked ? w_i log t : log(1 - t**w_i)].  This is
GenMD4's estimator (md4 ``genmd4.py``) with per-position instead of per-token-
value exponents; it needs no assumption on the network (a time-conditioned one
is fine) and estimates the same quantity that evaluation reports.  The
reported loss *value* is the plain ELBO estimate (mean over the K masks): the
score term is added as ``S - sg(S)``.  Tested against finite differences of an
exact enumeration (tests/test_multivariate.py).  Cost: K network passes per
sequence while training (evaluation uses one).

Sampling: ``ancestral_sample`` reveals a masked position with its own
probability (alpha_i(s) - alpha_i(t)) / (1 - alpha_i(t)), so generation
unmasks positions in the learned order (tested with ``left_to_right``, and
against the Plackett-Luce law for ``learned_poly``).

Picture: ``write_order`` writes ``<workdir>/order/step_N.{json,png}`` with the
mean masking (= unmasking) time E[tau_i] and the mean decoding rank of every
position; the training loop calls it after every evaluation (process 0).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax import losses as losses_lib
from mdm_jax import prime as prime_lib
from mdm_jax.schedules import SCHEDULES

Array = jax.Array
FAMILIES = ("poly", "window", "slot")
ORDER_PARAMS = ("free", "mlp")


# ----------------------------------------------------------------- log w modules
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
    return _centre_and_clip(theta, self.max_log_w)


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
    return _centre_and_clip(out, self.max_log_w)


def _centre_and_clip(log_w: Array, max_log_w: float) -> Array:
  return jnp.clip(log_w - jnp.mean(log_w), -max_log_w, max_log_w)


class ScheduledModel(nn.Module):
  """The backbone plus the schedule's parameters in ONE params pytree.

  The backbone's parameters stay at the top level (``params["embed"]``, ...,
  exactly as without a learned schedule); the schedule's live under
  ``params["schedule"]``.  Calling it runs the backbone only.
  """
  net: nn.Module
  schedule: nn.Module

  def setup(self):
    nn.share_scope(self, self.net)

  def __call__(self, digits, t, train: bool = False):
    if self.is_initializing():
      self.schedule(digits.shape[1])
    return self.net(digits, t, train=train)


def attach(model: nn.Module, schedule: "MultivariateSchedule") -> nn.Module:
  """The model whose params also hold the (learned) schedule's parameters."""
  if not schedule.learned:
    return model
  return ScheduledModel(net=model, schedule=schedule.order_module)


# ----------------------------------------------------------------- the schedule
@dataclasses.dataclass(frozen=True, eq=False)
class MultivariateSchedule:
  """Per-position schedules alpha_i(t); every method takes the model params.

  ``alpha(t)`` / ``mask_prob(t)`` (one argument) are the *population*
  schedule -- the fraction of positions unmasked at t at initialisation
  (w = 1: linear) or for the fixed family -- for samplers that only need a
  global unmasking rate.  The per-position forms are ``alpha_i`` etc.
  """
  name: str
  family: str                                  # poly | window
  learned: bool
  order_module: Optional[nn.Module] = None     # poly: params["schedule"] -> log w [L]
  sharpness: float = 1.0                       # window: kappa
  num_masks: int = 2                           # masks per sequence in training (RLOO)
  slot_tilt: float = 0.0                       # slot: kappa (> 0: leading digits decoded first)
  ell: int = 1                                 # slot: digits per token (set by ``for_codec``)
  grad_scale: float = 1.0                      # multiplies d loss / d (schedule params)
  multivariate: bool = dataclasses.field(default=True, init=False)

  # ---- parameters
  def log_w(self, params, length: int) -> Array:
    """poly: log-exponents [L] (zeros, i.e. w = 1, when not learned)."""
    if self.order_module is None:
      return jnp.zeros((length,), jnp.float32)
    lw = self.order_module.apply({"params": params["schedule"]}, length)
    if self.grad_scale != 1.0:   # same value, gradient scaled (see learned_poly)
      lw = jax.lax.stop_gradient(lw) + self.grad_scale * (lw - jax.lax.stop_gradient(lw))
    return lw

  def window(self, length: int) -> Tuple[Array, float]:
    """window: starts a_i [L] and the common width d."""
    k = float(self.sharpness)
    i = jnp.arange(length, dtype=jnp.float32)
    return k * (length - 1 - i) / length, 1.0 - k * (length - 1) / length

  def for_codec(self, codec: prime_lib.PrimeCodec) -> "MultivariateSchedule":
    """The schedule for this codec's ell (the slot family has one exponent per digit)."""
    return dataclasses.replace(self, ell=int(codec.ell)) if self.family == "slot" else self

  def slot_log_w(self) -> Array:
    """slot: log-exponents [ell], kappa (ell - 1 - j) / (ell - 1) shifted so the smallest is 0.

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

  # ---- per-digit schedule, t [B] -> [B, L, S] (f32); S = ell for the slot family, else 1
  def mask_prob_ij(self, params, t: Array, length: int) -> Array:
    """1 - alpha_ij(t): position i, digit j (S = 1: the same for every digit of a token)."""
    if self.family != "slot":
      return self.mask_prob_i(params, t, length)[..., None]
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    w = jnp.exp(self.slot_log_w())[None, None, :]
    return jnp.broadcast_to(jnp.exp(w * jnp.log(t)), (t.shape[0], length, self.ell))

  def weight_ij(self, params, t: Array, length: int) -> Array:
    """The ELBO weight -alpha_ij'(t) / (1 - alpha_ij(t)) [B, L, S]."""
    if self.family != "slot":
      return self.weight_i(params, t, length)[..., None]
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    w = jnp.exp(self.slot_log_w())[None, None, :]
    return jnp.broadcast_to(w / t, (t.shape[0], length, self.ell))

  # ---- per-position schedule, t [B] -> [B, L] (f32)
  def mask_prob_i(self, params, t: Array, length: int) -> Array:
    """1 - alpha_i(t) (the slot family: the mean over a token's digits)."""
    if self.family == "slot":
      return jnp.mean(self.mask_prob_ij(params, t, length), axis=-1)
    t = jnp.asarray(t, jnp.float32)[:, None]
    if self.family == "poly":
      w = jnp.exp(self.log_w(params, length))[None, :]
      return jnp.exp(w * jnp.log(t))
    a, d = self.window(length)
    return jnp.clip((t - a[None, :]) / d, 0.0, 1.0)

  def alpha_i(self, params, t: Array, length: int) -> Array:
    return 1.0 - self.mask_prob_i(params, t, length)

  def weight_i(self, params, t: Array, length: int) -> Array:
    """The ELBO weight -alpha_i'(t) / (1 - alpha_i(t)) >= 0 (not defined per token for slot)."""
    if self.family == "slot":
      raise ValueError("The slot schedule weights each digit on its own: use weight_ij.")
    t = jnp.asarray(t, jnp.float32)[:, None]
    if self.family == "poly":
      return jnp.exp(self.log_w(params, length))[None, :] / t
    a, d = self.window(length)
    u = t - a[None, :]
    inside = (u > 0) & (u < d)
    return jnp.where(inside, 1.0 / jnp.where(inside, u, 1.0), 0.0)

  def log_q(self, params, t: Array, masked: Array) -> Array:
    """log q_w(z | t) per sequence [B] for the mask pattern ``masked`` [B, L, ell] (poly)."""
    if self.family != "poly":
      raise ValueError(f"{self.name}: log q is only needed for learned (poly) schedules.")
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    w = jnp.exp(self.log_w(params, masked.shape[1]))[None, :, None]
    log_m = w * jnp.log(t)                                   # log t**w
    log_keep = jnp.log(jnp.maximum(-jnp.expm1(log_m), 1e-30))  # log(1 - t**w)
    return jnp.sum(jnp.where(masked, log_m, log_keep), axis=(1, 2))

  def reconstruction(self, params, t_min: float, length: int,
                     codec: prime_lib.PrimeCodec) -> Array:
    """Exact cost of [0, t_min] under a uniform decoder (see losses.reconstruction_bound)."""
    p = self.mask_prob_ij(params, jnp.full((1,), t_min, jnp.float32), length)
    return jnp.sum(p) * (codec.ell // p.shape[-1]) * math.log(codec.base)

  # ---- population (univariate) view, for samplers that need one rate
  def alpha(self, t):
    t = jnp.asarray(t, jnp.float32)
    if self.family == "poly":
      return 1.0 - t
    if self.family == "slot":
      w = jnp.exp(self.slot_log_w())
      return 1.0 - jnp.mean(jnp.exp(w * jnp.log(t)[..., None]), axis=-1)
    # mean over positions of the window schedule, for a nominal L = 1024
    return jnp.mean(self.alpha_i(None, jnp.reshape(t, (-1,)), 1024), -1).reshape(t.shape)

  def mask_prob(self, t):
    return 1.0 - self.alpha(t)

  # ---- the order
  def mean_mask_time(self, params, length: int) -> Array:
    """E[tau_i] [L]: the mean time at which position i is masked (and unmasked when sampling)."""
    if self.family == "poly":
      w = jnp.exp(self.log_w(params, length))
      return w / (w + 1.0)
    if self.family == "slot":   # the mean over a token's digits
      w = jnp.exp(self.slot_log_w())
      return jnp.full((length,), jnp.mean(w / (w + 1.0)), jnp.float32)
    a, d = self.window(length)
    return a + 0.5 * d

  def sample_mask_times(self, params, key: Array, num: int, length: int) -> Array:
    """tau [num, L] from the forward process (inverse transform of U(0,1))."""
    u = jax.random.uniform(key, (num, length), jnp.float32, minval=1e-12, maxval=1.0)
    if self.family == "slot":
      raise ValueError("The slot schedule masks digits, not positions: no per-position times.")
    if self.family == "poly":
      w = jnp.exp(self.log_w(params, length))[None, :]
      return jnp.exp(jnp.log(u) / w)
    a, d = self.window(length)
    return a[None, :] + d * u

  def position_alpha_fn(self, params, length: int) -> Callable[[Array], Array]:
    """A closure scalar t -> alpha_ij(t) [L, S] (S = ell for slot, else 1), for the samplers."""
    return lambda t: 1.0 - self.mask_prob_ij(params, jnp.reshape(t, (1,)), length)[0]


def is_multivariate(schedule) -> bool:
  return bool(getattr(schedule, "multivariate", False))


@SCHEDULES.register("learned_poly")
def learned_poly(config=None) -> MultivariateSchedule:
  """Learned per-position polynomial exponents: alpha_i = 1 - t**w_i (Plackett-Luce order)."""
  get = (lambda k, d: config.get(k, d)) if config is not None else (lambda k, d: d)
  order = str(get("order", "free"))
  max_log_w = float(get("max_log_w", 5.0))
  if order == "free":
    module = FreeOrder(max_log_w=max_log_w)
  elif order == "mlp":
    module = PositionMLPOrder(hidden=int(get("order_hidden", 64)), max_log_w=max_log_w)
  else:
    raise ValueError(f"schedule.order must be one of {ORDER_PARAMS}, got {order!r}.")
  k = int(get("num_masks", 2))
  if k < 1:
    raise ValueError(f"schedule.num_masks must be >= 1 (2 for the RLOO estimator), got {k}.")
  # Adam is invariant to a constant gradient scale, so grad_scale changes nothing but the
  # schedule's share of the *global* gradient norm: its score-function gradient is noisy and
  # ~5x the network's, and would otherwise dominate training.grad_clip.
  return MultivariateSchedule(name="learned_poly", family="poly", learned=True,
                              order_module=module, num_masks=k,
                              grad_scale=float(get("grad_scale", 0.05)))


@SCHEDULES.register("left_to_right")
def left_to_right(config=None) -> MultivariateSchedule:
  """Fixed windows: sharpness 0 = linear MDM, 1 = exactly left-to-right AR."""
  kappa = float(config.get("sharpness", 1.0)) if config is not None else 1.0
  if not 0.0 <= kappa <= 1.0:
    raise ValueError(f"schedule.sharpness must be in [0, 1], got {kappa}.")
  return MultivariateSchedule(name="left_to_right", family="window", learned=False,
                              sharpness=kappa, num_masks=1)


@SCHEDULES.register("slot_poly")
def slot_poly(config=None) -> MultivariateSchedule:
  """Per-digit polynomial exponents: alpha_j = 1 - t**w_j, ELBO weight w_j / t.

  log w_j = kappa (ell - 1 - j) / (ell - 1), shifted so that min_j w_j = 1 (see
  ``slot_log_w``).  kappa = ``schedule.slot_tilt`` > 0 masks a token's leading (most
  significant) digits later, so the sampler decodes them first (coarse to fine: with
  ``data.token_order=context`` the leading digit is a word class); 0 is the linear
  schedule; < 0 decodes the trailing digits first.  Fixed, so no extra training cost.
  """
  kappa = float(config.get("slot_tilt", 1.0)) if config is not None else 1.0
  if not math.isfinite(kappa) or abs(kappa) > 10.0:
    raise ValueError(f"schedule.slot_tilt must be a finite number in [-10, 10], got {kappa}.")
  return MultivariateSchedule(name="slot_poly", family="slot", learned=False,
                              slot_tilt=kappa, num_masks=1)


# ----------------------------------------------------------------- losses
def _draw_masks(key, digits, p_mask, mask_id, row_ids):
  """Noisy digits [B, L, ell] with mask probabilities p_mask [B, L, S] (S = 1 or ell)."""
  p = p_mask
  if row_ids is None:
    return prime_lib.mask_digits(key, digits, p, mask_id)
  return jax.vmap(lambda r, d, q: prime_lib.mask_digits(
      jax.random.fold_in(key, r), d[None], q[None], mask_id)[0])(row_ids, digits, p)


def diffusion_loss(apply_fn, params, tokens: Array, key: Array, *,
                   codec: prime_lib.PrimeCodec, schedule: MultivariateSchedule,
                   cfg: losses_lib.DiffusionLossConfig, train: bool = True,
                   t: Optional[Array] = None, row_ids: Optional[Array] = None,
                   num_masks: Optional[int] = None) -> Tuple[Array, Dict[str, Array]]:
  """The multivariate NELBO per sequence (nats) and its gradient surrogate.

  Same arguments, key splits and conventions as ``losses.diffusion_loss``
  (with one mask and equal exponents it returns the same numbers).
  ``num_masks`` defaults to ``schedule.num_masks`` when training a learned
  schedule and to 1 otherwise; with K >= 2 masks the RLOO score term for the
  schedule parameters is added with zero value (module docstring).
  """
  chex.assert_rank(tokens, 2)
  if cfg.weighting != "elbo":
    raise ValueError("training.loss_weighting='flat' is not defined for multivariate "
                     "schedules: use 'elbo'.")
  bsz, length = tokens.shape
  k_t, k_m, k_net = jax.random.split(key, 3)
  if t is None:
    t = losses_lib.sample_times(k_t, bsz, cfg.t_min, cfg.antithetic)
  if num_masks is None:
    num_masks = schedule.num_masks if (train and schedule.learned) else 1
  digits = codec.encode(tokens)
  slot = schedule.family == "slot"
  if slot and cfg.form != "marginal":
    raise ValueError("schedule.name='slot_poly' weights every digit on its own, which only the "
                     "marginal form defines: set prime.loss='marginal'.")
  p_mask = schedule.mask_prob_ij(params, t, length)                      # [B, L, S]
  keys = [k_m] + [jax.random.fold_in(k_m, j) for j in range(1, num_masks)]
  noisy = jnp.concatenate(
      [_draw_masks(k, digits, jax.lax.stop_gradient(p_mask), codec.mask_id, row_ids)
       for k in keys], axis=0)                                           # [K B, L, ell]
  if row_ids is not None:
    k_net = jax.random.fold_in(k_net, row_ids[0])
  tt = jnp.tile(t, num_masks)
  logits = apply_fn(params, noisy, tt, train=train, rng=k_net)
  chex.assert_shape(logits, (num_masks * bsz, length, codec.vocab_size))
  clean = jnp.tile(digits, (num_masks, 1, 1))
  if slot:   # every masked digit with its own weight
    nll = losses_lib.digit_marginal_nll(logits, noisy if cfg.carry_over else None, clean, codec)
    nll = jnp.where(noisy == codec.mask_id, nll, 0.0)                    # [K B, L, ell]
    weight = schedule.weight_ij(params, t, length) * (1.0 - cfg.t_min)   # [B, L, ell]
    f = jnp.sum(jnp.tile(weight, (num_masks, 1, 1)) * nll, axis=(1, 2)).reshape(num_masks, bsz)
  else:
    nll = losses_lib.prime_token_nll(logits, noisy, clean, codec, cfg.form,
                                     cfg.carry_over)                     # [K B, L]
    weight = schedule.weight_i(params, t, length) * (1.0 - cfg.t_min)    # [B, L]
    f = jnp.sum(jnp.tile(weight, (num_masks, 1)) * nll, axis=-1).reshape(num_masks, bsz)
  loss = jnp.mean(f, axis=0) + schedule.reconstruction(params, cfg.t_min, length, codec)
  masked = noisy == codec.mask_id
  if num_masks >= 2 and schedule.learned:
    log_q = schedule.log_q(params, tt, masked).reshape(num_masks, bsz)
    fs = jax.lax.stop_gradient(f)
    loo = (jnp.sum(fs, axis=0, keepdims=True) - fs) / (num_masks - 1)
    score = jnp.sum((fs - loo) * log_q, axis=0) / num_masks
    loss = loss + (score - jax.lax.stop_gradient(score))
  m0 = masked[:bsz]
  metrics = {
      "masked_fraction": jnp.mean(m0.astype(jnp.float32)),
      "partial_fraction": jnp.mean(
          (jnp.any(m0, -1) & jnp.any(~m0, -1)).astype(jnp.float32)),
  }
  if schedule.learned:
    lw = schedule.log_w(params, length)
    metrics["schedule_log_w_std"] = jnp.std(lw)
    metrics["schedule_log_w_slope"] = _slope(lw)
  return loss, metrics


def _slope(v: Array) -> Array:
  """Least-squares slope of v against position / L (negative: left decoded first)."""
  x = (jnp.arange(v.shape[0], dtype=jnp.float32) + 0.5) / v.shape[0]
  x = x - jnp.mean(x)
  return jnp.sum(x * (v - jnp.mean(v))) / jnp.sum(x * x)


def diffusion_bound(apply_fn, params, tokens: Array, key: Array, *,
                    codec: prime_lib.PrimeCodec, schedule: MultivariateSchedule,
                    cfg: losses_lib.DiffusionLossConfig, num_time_samples: int = 1) -> Array:
  """Evaluation NELBO per sequence: K stratified times, one mask each, marginal form.

  Mirrors ``losses.diffusion_bound``; a valid bound for every schedule parameter.
  """
  bound_cfg = dataclasses.replace(cfg, form="marginal", weighting="elbo")
  bsz = tokens.shape[0]
  k_u, k_rest = jax.random.split(key)
  keys = jax.random.split(k_rest, num_time_samples)

  def one(k, carry):
    t = losses_lib.sample_times(k_u, bsz, cfg.t_min, True, offset=k * bsz,
                                num_strata=bsz * num_time_samples)
    loss, _ = diffusion_loss(apply_fn, params, tokens, keys[k], codec=codec, schedule=schedule,
                             cfg=bound_cfg, train=False, t=t, num_masks=1)
    return carry + loss

  total = jax.lax.fori_loop(0, num_time_samples, one, jnp.zeros((bsz,), jnp.float32))
  return total / num_time_samples


# ----------------------------------------------------------------- the order picture
def order_summary(schedule: MultivariateSchedule, params, length: int, *, step: int = 0,
                  num_samples: int = 2048, seed: int = 0) -> Dict[str, Any]:
  """Mean masking/unmasking time and mean decoding rank (0 = decoded first) per position."""
  taus = schedule.sample_mask_times(params, jax.random.key(seed), num_samples, length)
  rank = jnp.argsort(jnp.argsort(-taus, axis=-1), axis=-1)     # latest-masked decodes first
  out = {
      "step": int(step), "schedule": schedule.name, "seq_len": int(length),
      "mean_unmask_time": np.asarray(schedule.mean_mask_time(params, length)).tolist(),
      "mean_decode_rank": np.asarray(jnp.mean(rank.astype(jnp.float32), 0)).tolist(),
      "note": ("Generation runs t from 1 to 0: a position with a larger mean unmasking time "
               "is decoded earlier; rank 0 is decoded first."),
  }
  if schedule.family == "poly":
    lw = np.asarray(schedule.log_w(params, length))
    out["log_w"] = lw.tolist()
    x = np.arange(length)
    out["rank_position_corr"] = float(np.corrcoef(x, out["mean_decode_rank"])[0, 1]) \
        if np.std(out["mean_decode_rank"]) > 0 else 0.0
  return out


def write_order(schedule: MultivariateSchedule, params, length: int, workdir: str,
                step: int) -> Tuple[str, str]:
  """Writes <workdir>/order/step_N.json and .png; returns their paths.

  The PNG shows (top) a heat map of the mean unmasking time of every position
  at every step written so far, and (bottom) this step's mean unmasking time
  and mean decoding rank against position.
  """
  params = jax.device_get(params)
  d = os.path.join(workdir, "order")
  os.makedirs(d, exist_ok=True)
  summ = order_summary(schedule, params, length, step=step)
  jpath = os.path.join(d, f"step_{step}.json")
  with open(jpath, "w") as f:
    json.dump(summ, f)
  history = []
  for p in glob.glob(os.path.join(d, "step_*.json")):
    try:
      with open(p) as f:
        h = json.load(f)
    except (OSError, ValueError):
      continue
    if len(h.get("mean_unmask_time", [])) == length:
      history.append((int(h["step"]), h["mean_unmask_time"]))
  history.sort()
  ppath = os.path.join(d, f"step_{step}.png")
  _plot_order(summ, history, ppath)
  return jpath, ppath


def _plot_order(summ, history, path):
  times = np.asarray([h for _, h in history], np.float32)
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    _write_png_gray(path, times)
    return
  fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 6), gridspec_kw={"height_ratios": [1.2, 1]})
  im = ax0.imshow(times, aspect="auto", cmap="viridis", interpolation="nearest",
                  extent=(-0.5, times.shape[1] - 0.5, len(history) - 0.5, -0.5))
  ax0.set_yticks(range(len(history)))
  ax0.set_yticklabels([str(s) for s, _ in history])
  ax0.set_ylabel("training step")
  ax0.set_title(f"{summ['schedule']}: mean unmasking time per position\n"
                "(sampling runs t = 1 -> 0; bright = decoded early)", fontsize=10)
  fig.colorbar(im, ax=ax0, label="E[tau_i]")
  x = np.arange(summ["seq_len"])
  ax1.plot(x, summ["mean_unmask_time"], color="tab:blue", label="E[tau_i]")
  ax1.set_xlabel("position i")
  ax1.set_ylabel("mean unmasking time", color="tab:blue")
  ax2 = ax1.twinx()
  ax2.plot(x, summ["mean_decode_rank"], color="tab:red", alpha=0.7, label="mean decode rank")
  ax2.set_ylabel("mean decode rank (0 = first)", color="tab:red")
  ax1.set_title(f"step {summ['step']}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _write_png_gray(path, img):
  """A minimal 8-bit grayscale PNG writer (used when matplotlib is missing)."""
  import struct  # pylint: disable=import-outside-toplevel
  import zlib  # pylint: disable=import-outside-toplevel
  img = np.asarray(img, np.float32)
  if img.ndim == 1:
    img = img[None]
  lo, hi = float(np.min(img)), float(np.max(img))
  a = np.uint8(np.round(255 * (img - lo) / max(hi - lo, 1e-12)))
  a = np.repeat(np.repeat(a, 8, axis=0), 4, axis=1)
  raw = b"".join(b"\x00" + row.tobytes() for row in a)

  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", a.shape[1], a.shape[0],
                                                            8, 0, 0, 0, 0))
         + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
  with open(path, "wb") as f:
    f.write(png)
