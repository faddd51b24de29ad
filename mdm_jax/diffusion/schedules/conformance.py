"""Checks that a masking schedule keeps the ``Schedule`` contract (``base.py``).

``check_schedule(schedule, codec)`` builds a tiny problem (a few positions, a fixed
random network on a Prime codec) and checks, for the schedule as it will run:

* **shapes**: ``hazards`` returns two rank-3 arrays [B, L|1, S|1] that broadcast to
  [B, L, S], with probabilities in [0, 1] and finite weights >= 0;
* **ends**: alpha(0) = 1 and alpha(1) = 0 for every element (nothing is masked at t = 0
  and everything at t = 1, where the samplers start; the ELBO has no prior term), and
  the same for the population rate ``mask_prob(t)``;
* **weight**: w = -alpha'/(1 - alpha) = m'/m, against ``jax.jvp`` of the mask
  probabilities in t, wherever an element can be masked;
* **log q**: exp(``log_q``) of every mask pattern is its probability under independent
  Bernoulli draws with the mask probabilities (so the probabilities sum to 1); for the
  order estimator, ``element_log_w`` is the Plackett-Luce law of the same masking times
  (m = t**w);
* **ELBO**: ``elbo.diffusion_loss`` at fixed times (in training mode for a learned
  schedule, so its leave-one-out term runs too) agrees, within Monte Carlo error, with
  the ELBO integrand computed by enumerating every mask pattern: sum over masked
  elements of h_x (-log p(x)) - h_x + sum_d h_d p(d), with h the weight of each value d
  (constant in d unless the schedule is value-dependent, where this is w (-log p(x))),
  times (1 - t_min), plus the schedule's [0, t_min] term.

A family the combination does not define (``Schedule.check`` raises ``ConfigError``)
is not checked: the error propagates.  Any failed check raises ``ConformanceError``
naming the schedule and the check.  ``check_registered(name, codec)`` builds a
registered family from its default ``config.schedule`` block first; the test suite runs
it over every name in ``SCHEDULES``, so a newly registered family is checked too.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.diffusion import elbo
from mdm_jax.diffusion import prime as prime_lib
from mdm_jax.diffusion.schedules import SCHEDULES, Schedule, schedule_block

Array = jax.Array


class ConformanceError(AssertionError):
  """A schedule breaks the contract of ``Schedule``."""


def _require(ok: bool, schedule: Schedule, what: str) -> None:
  if not ok:
    raise ConformanceError(f"schedule {schedule.name!r}: {what}")


def table_network(codec: prime_lib.PrimeCodec, length: int, seed: int = 0):
  """A fixed random network: logits [B, L, V] are a linear function of the one-hot noisy
  digits of the whole sequence (so every prediction depends on what is observed)."""
  classes = codec.mask_id + 1
  table = 1.5 * jax.random.normal(jax.random.key(seed),
                                  (length, codec.ell, classes, length, codec.vocab_size))

  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    return jnp.einsum("blsc,lsciv->biv", jax.nn.one_hot(digits, classes), table)
  return apply_fn


def schedule_params(schedule: Schedule, length: int, seed: int = 0,
                    scale: float = 0.3) -> Optional[Dict[str, Any]]:
  """The model-side parameter tree of a schedule (``{"schedule": ...}``), moved away from
  its initialisation by ``scale`` times Gaussian noise; None for a fixed schedule."""
  module = schedule.param_module()
  if module is None:
    return None
  init = module.init(jax.random.key(seed), length)["params"]
  leaves, tree = jax.tree.flatten(init)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return {"schedule": jax.tree.unflatten(tree, moved)}


def _patterns(shape) -> Array:
  """Every mask pattern of an array of the given shape: bool [2**n, *shape]."""
  n = int(np.prod(shape))
  return jnp.asarray(list(itertools.product([0, 1], repeat=n)), bool).reshape((-1,) + shape)


def check_schedule(schedule: Schedule, codec: prime_lib.PrimeCodec, *, length: int = 2,
                   seed: int = 0, rows_per_time: int = 512,
                   levels: Sequence[float] = (0.3, 0.55, 0.85),
                   loss_cfg: Optional[elbo.DiffusionLossConfig] = None) -> Dict[str, float]:
  """Runs every check of the module docstring; returns the largest error of each.

  The ELBO is compared at the times where the population mask probability
  ``mask_prob(t)`` reaches ``levels`` (so masks are neither rare nor certain there).
  ``schedule`` is taken through ``for_codec(codec)`` first.  ``length`` * ell elements
  are enumerated (2**(length * ell) patterns), so keep both small.  Raises
  ``ConformanceError`` on a failed check and ``ConfigError`` when the schedule does not
  define this codec with ``loss_cfg`` (default: ``DiffusionLossConfig()``).
  """
  schedule = schedule.for_codec(codec)
  cfg = loss_cfg or elbo.DiffusionLossConfig()
  schedule.check(cfg, codec)
  ell = codec.ell
  dense = np.linspace(0.0, 1.0, 4001, dtype=np.float32)
  times = tuple(float(t) for t in np.interp(
      levels, np.maximum.accumulate(np.asarray(schedule.mask_prob(jnp.asarray(dense)))), dense))
  params = schedule_params(schedule, length, seed)
  tokens = jax.random.randint(jax.random.key(seed + 2), (1, length), 0, codec.vocab_size)
  digits = codec.encode(tokens)                                        # [1, L, S]
  m = len(times)
  full = (length, ell)
  apply_fn = table_network(codec, length, seed)
  pats = _patterns(full)                                               # [P, L, S]
  train = schedule.learned and schedule.estimator == "time"
  shapes = []

  def hazards(t):
    clean = jnp.broadcast_to(digits, (t.shape[0],) + full)
    h = schedule.hazards(params, t, length, clean)
    shapes.append(tuple(a.shape for a in h) + (t.shape[0],))
    return h

  def wide(a, lead):
    return jnp.broadcast_to(a, (lead,) + full)

  def quantities(key):
    """Everything the checks read, in one traced function (one compilation)."""
    q = {}
    ts = jnp.asarray(times, jnp.float32)
    h = hazards(ts)
    q["p"], q["w"] = wide(h.mask_prob, m), wide(h.weight, m)
    ends = jnp.asarray([0.0, 1.0], jnp.float32)
    q["p_ends"] = wide(hazards(ends).mask_prob, 2)
    q["pop_ends"] = schedule.mask_prob(ends)
    # weight against jax.jvp of the mask probabilities in t
    grid = jnp.asarray([0.07, 0.23, 0.38, 0.55, 0.71, 0.93], jnp.float32)
    mp, dmp = jax.jvp(lambda t: hazards(t).mask_prob, (grid,), (jnp.ones_like(grid),))
    q["grid_p"] = wide(mp, grid.shape[0])
    q["grid_w_jvp"] = wide(dmp / jnp.maximum(mp, 1e-30), grid.shape[0])
    q["grid_w"] = wide(hazards(grid).weight, grid.shape[0])
    # log q of every pattern at every time, and the Bernoulli law
    n_p = pats.shape[0]
    t_q = jnp.repeat(ts, n_p)
    pats_m = jnp.tile(pats, (m, 1, 1))
    q["q"] = jnp.exp(schedule.log_q(params, t_q, pats_m, jnp.broadcast_to(digits, pats_m.shape)))
    pm_q = wide(hazards(t_q).mask_prob, t_q.shape[0])
    q["bern"] = jnp.prod(jnp.where(pats_m, pm_q, 1.0 - pm_q), axis=(1, 2))
    if schedule.estimator == "order":
      q["order_log_w"] = schedule.element_log_w(params, length, ell)
      mh = wide(hazards(jnp.full((1,), 0.5, jnp.float32)).mask_prob, 1)
      q["order_implied"] = codec.flatten(jnp.log(jnp.log(mh) / jnp.log(0.5)))[0]
    # the ELBO integrand by enumerating every mask pattern
    noisy = jnp.where(pats, codec.mask_id, digits).astype(jnp.int32)  # [P, L, S]
    clean_p = jnp.broadcast_to(digits, noisy.shape)
    lp = codec.digit_log_marginals(codec.restricted_code_logprobs(
        apply_fn(None, noisy, None), noisy if cfg.carry_over else None))  # [P, L, S, b]
    pm = q["p"]                                                        # [M, L, S]
    prob = jnp.prod(jnp.where(pats[None], pm[:, None], 1.0 - pm[:, None]), axis=(2, 3))
    if schedule.value_dependent:
      rates = schedule.value_weights(params, ts)
    else:
      rates = h.weight[..., None]
    rates = jnp.broadcast_to(rates, (m,) + full + (codec.base,))[:, None]  # [M, 1, L, S, b]
    pick = lambda a: jnp.take_along_axis(a, clean_p[None, ..., None], axis=-1)[..., 0]
    h_x, lp_x = pick(rates), pick(lp[None])
    cost = h_x * -lp_x - h_x + jnp.sum(rates * jnp.exp(lp)[None], axis=-1)  # [M, P, L, S]
    f = jnp.sum(jnp.where(pats[None], cost, 0.0), axis=(2, 3))          # [M, P]
    recon = schedule.reconstruction(params, cfg.t_min, digits, codec)[0]
    q["exact"] = jnp.sum(prob * f, axis=1) * (1.0 - cfg.t_min) + recon
    # ... and the Monte Carlo ELBO of diffusion_loss at the same times
    rows = jnp.broadcast_to(tokens, (m * rows_per_time, length))
    q["loss"], _ = elbo.diffusion_loss(apply_fn, params, rows, key, codec=codec,
                                       schedule=schedule, cfg=cfg, train=train,
                                       t=jnp.repeat(ts, rows_per_time))
    return q

  key = jax.random.key(seed + 3)
  # A small program run once: compiled without the backend's expensive optimisations.
  compiled = jax.jit(quantities).lower(key).compile({"xla_backend_optimization_level": 0})
  q = jax.device_get(compiled(key))
  out: Dict[str, float] = {}

  # ---- shapes and ranges
  for mask_shape, weight_shape, b in shapes:
    for what, shape in (("mask_prob", mask_shape), ("weight", weight_shape)):
      _require(len(shape) == 3 and shape[0] == b
               and all(n in (1, f) for n, f in zip(shape[1:], full)), schedule,
               f"hazards().{what} has shape {shape}; expected [{b}, {length} or 1, {ell} or 1].")
  p, w = q["p"], q["w"]
  _require(np.all((p >= 0) & (p <= 1)), schedule, f"mask probabilities outside [0, 1]: {p}")
  _require(np.all(np.isfinite(w) & (w >= 0)), schedule, f"weights not finite and >= 0: {w}")

  # ---- ends: alpha(0) = 1, alpha(1) = 0
  out["mask_prob_at_0"] = float(np.max(q["p_ends"][0]))
  out["alpha_at_1"] = float(np.max(1.0 - q["p_ends"][1]))
  _require(out["mask_prob_at_0"] <= 1e-6, schedule,
           f"alpha(0) != 1: elements masked at t = 0 with probability {q['p_ends'][0]}.")
  _require(out["alpha_at_1"] <= 1e-6, schedule,
           f"alpha(1) != 0: elements unmasked at t = 1 with probability {1 - q['p_ends'][1]} "
           "(the samplers start fully masked and the ELBO counts no prior term).")
  pop = q["pop_ends"]
  _require(abs(pop[0]) <= 1e-6 and abs(1.0 - pop[1]) <= 1e-6, schedule,
           f"the population mask_prob(t) is {pop} at t = 0, 1 (expected 0, 1).")

  # ---- weight = m'/m (= -alpha'/(1 - alpha))
  got, want, where = q["grid_w"], q["grid_w_jvp"], q["grid_p"] > 1e-6
  err = np.abs(got - want) / (1e-3 + np.abs(want))
  out["weight_rel_error"] = float(np.max(np.where(where, err, 0.0)))
  _require(out["weight_rel_error"] < 1e-3, schedule,
           f"weight != -alpha'/(1 - alpha): got {got[where]}, want {want[where]} (jax.jvp).")

  # ---- log q
  out["log_q_error"] = float(np.max(np.abs(q["q"] - q["bern"])))
  _require(out["log_q_error"] < 1e-5, schedule,
           f"exp(log_q) is not the Bernoulli law of the mask probabilities: {q['q']} vs "
           f"{q['bern']}.")
  if schedule.estimator == "order":
    lw, implied = q["order_log_w"], q["order_implied"]
    out["order_log_w_error"] = float(np.max(np.abs(lw - implied)))
    _require(out["order_log_w_error"] < 1e-4, schedule,
             f"element_log_w {lw} is not the law of the masking times (m = t**w gives "
             f"{implied}).")

  # ---- the ELBO
  exact = np.asarray(q["exact"], np.float64)
  loss = np.asarray(q["loss"], np.float64).reshape(m, rows_per_time)
  mean, se = loss.mean(1), loss.std(1) / np.sqrt(rows_per_time)
  gap = np.abs(mean - exact)
  out["elbo_gap_in_se"] = float(np.max(gap / np.maximum(se, 1e-12)))
  _require(np.all(gap <= 5.0 * se + 1e-4 * np.abs(exact) + 1e-5), schedule,
           f"the ELBO at t = {list(times)} is {mean} +- {se} (diffusion_loss) but "
           f"{exact} by enumerating the masks.")
  return out


def check_registered(name: str, codec: prime_lib.PrimeCodec, config=None,
                     **kwargs) -> Dict[str, float]:
  """``check_schedule`` for the registered family ``name``, built from its
  ``config.schedule`` block (``config``'s keys over the defaults of ``configs/base.py``)."""
  block = schedule_block(config)
  block.name = name
  return check_schedule(SCHEDULES.get(name)(block), codec, **kwargs)
