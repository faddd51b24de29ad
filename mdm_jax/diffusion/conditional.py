"""The valid bound on part of a sequence given another part: -log p(continuation | context).

Zero-shot evaluation (lm-evaluation-harness, ``mdm_jax.cli.lm_eval_model``) asks for the
log-likelihood of a continuation given a visible context.  For a masked diffusion model the
natural answer is the ELBO of the diffusion that runs on the continuation alone: every
position of a row is one of

* *visible*: its digits are given at every time (the context);
* *scored*: masked by the forward process with the schedule's alpha_ij(t) and scored when
  masked (the continuation);
* *absent*: masked at every time and never scored (room after the continuation, when the
  row is longer than the request).

    -log p(cont | ctx) <= int_0^1 E[ sum_{scored masked ij} w_ij(t) * -log p(x_ij | y_t) ] dt

is the MDM ELBO of the continuation's digits under the model's reverse process conditioned
on the visible tokens (the unconditional bound of ``elbo.diffusion_bound`` is the case
with every position scored).  As there, each masked digit is scored by its *marginal*
under the token distribution (Prime's valid form; the plain MDLM term when ell = 1), with
independent digit masking whatever the training used, t drawn in K * B strata over
[t_min, 1] (K = ``num_time_samples`` calls per row), the estimate multiplied by (1 - t_min),
and the exact cost of [0, t_min] under a uniform decoder added for the scored digits only:
sum_{scored ij} (1 - alpha_ij(t_min)) * log b.

``conditional_bound_samples`` returns the K per-row estimates [K, B] so that the caller can
report their mean (the bound) and its standard error.  Value-dependent schedules (GenMD4),
whose masks depend on the digits' values, are not handled here.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mdm_jax.diffusion import prime as prime_lib
from mdm_jax.diffusion.elbo import (ApplyFn, DiffusionLossConfig, SplitNetwork,
                                    digit_marginal_nll, draw_masks, position_terms, sample_times)
from mdm_jax.diffusion.schedules import Schedule

Array = jax.Array


def conditional_bound_samples(apply_fn: ApplyFn, params: Any, tokens: Array, visible: Array,
                              scored: Array, key: Array, *, codec: prime_lib.PrimeCodec,
                              schedule: Schedule, cfg: DiffusionLossConfig,
                              num_time_samples: int = 1,
                              split: Optional[SplitNetwork] = None) -> Array:
  """K Monte Carlo estimates [K, B] (nats) of the bound on the scored positions of each row.

  Args:
    apply_fn, params: the network and its parameters.
    tokens: int [B, L] token ids (any value at absent positions).
    visible, scored: bool [B, L], disjoint (see the module docstring).
    key: PRNG key.
    codec, schedule, cfg: as in ``elbo.diffusion_loss`` (only ``t_min`` and ``carry_over``
      of ``cfg`` are read).
    num_time_samples: K.
    split: the network cut before its head (``model.loss_chunk``); same values.
  """
  if schedule.value_dependent:
    raise ValueError(f"schedule {schedule.name!r} masks by value; the conditional bound "
                     "implements value-independent schedules only.")
  bsz, length = tokens.shape
  visible = visible.astype(bool)
  scored = scored.astype(bool) & ~visible
  digits = codec.encode(tokens)
  ell = codec.ell
  k_u, k_rest = jax.random.split(key)
  keys = jax.random.split(k_rest, num_time_samples)
  p0 = jnp.broadcast_to(schedule.mask_prob_ij(params, jnp.full((1,), cfg.t_min, jnp.float32),
                                              length), (1, length, ell))[0]
  recon = jnp.sum(jnp.where(scored[..., None], p0[None], 0.0), axis=(1, 2)) * math.log(codec.base)

  def term(lg, nz, cl):
    nll = digit_marginal_nll(lg, nz if cfg.carry_over else None, cl, codec)
    return jnp.where(nz == codec.mask_id, nll, 0.0)                    # [B, c, ell]

  def one(k):
    t = sample_times(k_u, bsz, cfg.t_min, True, offset=k * bsz,
                     num_strata=bsz * num_time_samples)
    k_m, k_net = jax.random.split(keys[k])
    p_mask = schedule.mask_prob_ij(params, t, length)                  # [B, L|1, S|1]
    noisy = draw_masks(k_m, digits, p_mask, codec.mask_id)
    noisy = jnp.where(visible[..., None], digits,
                      jnp.where(scored[..., None], noisy, codec.mask_id))
    nll = position_terms(apply_fn, params, noisy, t, term, (noisy, digits), train=False,
                         rng=k_net, split=split)
    w = jnp.broadcast_to(schedule.weight_ij(params, t, length), (bsz, length, ell))
    f = jnp.sum(jnp.where(scored[..., None], w * nll, 0.0), axis=(1, 2)) * (1.0 - cfg.t_min)
    return f + recon

  return jax.lax.map(one, jnp.arange(int(num_time_samples)))
