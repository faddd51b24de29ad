"""First-hitting sampler (Zheng et al. 2024; docs/method/algorithms.md §7.2), for MDM and Prime.

Elements are tokens for MDM (ell = 1) and digits for Prime (ell > 1): a
sequence with n masked elements at "time" m = 1 - alpha(t) has, under the
forward process, n reveal times whose levels (1 - alpha(tau_i)) / m are i.i.d.
U(0, 1).  The sampler jumps straight from one reveal to the next instead of
walking a time grid:

1. the next reveal level is m' = m u^(1/n), u ~ U(0, 1) (the largest of n
   uniforms), and t' = alpha^{-1}(1 - m') (bisection; only a time-conditioned
   network looks at it);
2. one masked element, chosen uniformly, is revealed: its token x^ is drawn
   from p(x | y) (temperature / top-k / top-p, Prime's carry-over, float32
   high-range Gumbel) and the element takes its digit of f(x^).

One network call per reveal event, so NFE = number of events = number of
masked elements, and no step is ever idle.  With an exact denoiser and
carry-over the output law is exactly the data law (any uniformly random
reveal order of exact conditionals is exact; for Prime the digit draw is the
exact conditional of that digit given every observed digit).

Budget (num_steps).  ``num_steps`` caps the number of events E.  While the
remaining budget allows it (n <= E - e at event e) every event reveals one
element and the sampler is the exact one above; when it does not, event e
reveals k = ceil(n / (E - e)) elements chosen uniformly (the parallel variant
of §7.2), all drawn from the same p(x | y) -- digits of one token revealed
together come from one x^, so they agree -- and the level jumps to the k-th
largest of the n uniforms, m' = m Beta(n - k + 1, k).  That variant is an
approximation (like any parallel update) and finishes in exactly E events.
So: exact iff num_steps >= the number of masked elements (seq_len * ell with
no prompt); NFE = min(num_steps, that number).

Schedules: the times use ``schedule.mask_prob`` only.  For a per-position
(multivariate, learned-order) schedule that is its population rate and the
reveal order stays uniform -- still exact for an exact denoiser (every order
is), but the learned order is not followed; use ``ancestral`` for that.

Prompt / infill digits are fixed from the start and never chosen.  Levels and
events are tracked per sequence; a batch runs until its longest sequence is
done (a call is made while any sequence has a masked element).  Each call
draws a V-way categorical for every token, simpler than drawing only at the
chosen one and negligible next to the network.

Draws, all per row from the row's own key (``sampling/common.py``), so a sample
does not depend on the batch it was drawn in: the level (a Beta), the elements to
reveal (uniform scores) and the token (a high-range Gumbel categorical); float32,
or float64 with ``sampling.precision="float64"`` (the level itself is kept in
float32).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import Schedule
from mdm_jax.sampling.ancestral import SampleResult, initial_digits
from mdm_jax.sampling.common import (descending_ranks, model_logprobs, row_beta, row_keys,
                                     row_uniform, step_keys, time_for_mask_prob)
from mdm_jax.sampling.filters import sample_categorical
from mdm_jax.sampling.registry import SAMPLERS

Array = jax.Array


@SAMPLERS.register("first_hitting", takes=("eps",), exact=True,
                    nfe=lambda steps, elements, opts: (min(steps, elements),) * 2)
def first_hitting_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *,
                         codec: PrimeCodec, schedule: Schedule, batch_size: int, seq_len: int,
                         num_steps: int, carry_over: bool = True, temperature=1.0,
                         top_k: int = 0, top_p=1.0, prompt: Optional[Array] = None,
                         prompt_mask: Optional[Array] = None, time_conditioning: bool = False,
                         eps: float = 1e-5, top_p_rule: str = "holtzman") -> SampleResult:
  """Draws batch_size sequences by first-hitting events; see the module docstring.

  Arguments as in ``ancestral_sample``; ``num_steps`` is the event budget E.
  ``time_conditioning`` needs no special handling (every event changes the
  state, so there is nothing to cache); ``eps`` is the smallest time passed
  to the network.  Returns a SampleResult with nfe = events, idle_steps = 0.
  """
  del time_conditioning
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}.")
  mask_id = codec.mask_id
  n_el = seq_len * codec.ell
  digits0 = initial_digits(codec, batch_size, seq_len, prompt, prompt_mask)
  level0 = jnp.full((batch_size,), schedule.mask_prob(jnp.float32(1.0)), jnp.float32)
  rows = row_keys(key, batch_size)

  def cond(carry):
    e, digits, _ = carry
    return (e < num_steps) & jnp.any(digits == mask_id)

  def body(carry):
    e, digits, level = carry
    k_net, k_sel, k_lvl, k_tok = step_keys(rows, e, 4)
    flat = digits.reshape(batch_size, n_el)
    masked = flat == mask_id
    n = jnp.sum(masked, -1).astype(jnp.int32)                            # [B]
    left = num_steps - e                                                 # >= 1
    k = jnp.where(n > 0, (n + left - 1) // left, 0)                      # ceil(n / left)
    # The k-th largest of n i.i.d. U(0, 1) is Beta(n - k + 1, k); for k = 1 it is u^(1/n).
    a = jnp.maximum(n - k + 1, 1).astype(jnp.float32)
    b = jnp.maximum(k, 1).astype(jnp.float32)
    frac = row_beta(k_lvl, a, b).astype(jnp.float32)
    level = jnp.where(n > 0, level * frac, level)
    t = jnp.maximum(time_for_mask_prob(schedule, level), eps)
    # k uniformly chosen masked elements per sequence.
    ranks = descending_ranks(row_uniform(k_sel, flat.shape), masked)
    reveal = masked & (ranks < k[:, None])
    _, lp = model_logprobs(apply_fn, params, codec, digits, t, k_net[0], carry_over=carry_over,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           top_p_rule=top_p_rule)
    y_hat = codec.encode(sample_categorical(k_tok, lp)).reshape(batch_size, n_el)
    new = jnp.where(reveal, y_hat, flat).reshape(digits.shape).astype(jnp.int32)
    return e + 1, new, level

  nfe, digits, _ = jax.lax.while_loop(cond, body, (jnp.array(0, jnp.int32), digits0, level0))
  return SampleResult(tokens=codec.decode(digits), digits=digits, nfe=nfe,
                      idle_steps=jnp.array(0, jnp.int32), num_steps=num_steps)
