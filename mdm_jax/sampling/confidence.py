"""Confidence-ordered decoding (MaskGIT / LLaDA style) for MDM and Prime.

At each of T steps every position with a masked digit proposes a token
x^ ~ p(x | y_t) (after temperature / top-k / top-p; restricted to tokens
consistent with the digits already observed when carry_over=True), scored
by a confidence:

* ``prob``: p(x^), LLaDA's low-confidence remasking;
* ``max_prob``: max_x p(x), which does not depend on the value drawn;
* ``margin``: p(top-1) - p(top-2);
* ``neg_entropy``: -H(p).

With ``block_len`` > 0 the order is semi-autoregressive (LLaDA's block
decoding): positions are taken block by block, left to right, and by
confidence inside a block; a step that finishes a block goes on into the next.
``block_len=1`` is left-to-right decoding, whose order does not depend on the
drawn values, so with one token per step (T >= L) it samples the model's own
left-to-right chain of conditionals exactly.

The most confident positions are revealed *whole* (all their digits): after
step k a sequence keeps round(M * (1 - alpha(t_{k+1}))) masked tokens, M
being its number of masked positions at the start, so the schedule sets the
pace and the confidence sets the order.  Unlike ancestral sampling this is
not an exact sampler of the model; it trades diversity for coherence, which
helps most with small or briefly trained models.  Every step calls the
network (NFE = T).  Prompt positions never change; no mask id or invalid id
is ever emitted (carry_over=True).

Draws: the proposals x^ are a float32 high-range Gumbel categorical per token
(float64 with ``sampling.precision="float64"``), row b's from its own key
(``sampling/common.py``); the order is then deterministic (ties by position) and the
count revealed per row depends only on that row, so a sample does not depend on
the batch it was drawn in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.sampling.ancestral import SampleResult, initial_digits, time_grid
from mdm_jax.sampling.common import (CONFIDENCES, descending_ranks, row_keys, step_keys,
                                     token_confidence)
from mdm_jax.sampling.filters import apply_filters, sample_categorical
from mdm_jax.diffusion.schedules import Schedule
from mdm_jax.sampling.registry import SAMPLERS, SamplerOptions, choices


@dataclasses.dataclass(frozen=True)
class ConfidenceOptions(SamplerOptions):
  """``config.sampling`` keys of ``confidence``."""
  confidence: str = choices("prob", CONFIDENCES)
  block_len: int = 0


# Exact only with a value-independent confidence: choosing where to reveal by the
# probability of the value drawn there ("prob") biases that value.
@SAMPLERS.register("confidence", options=ConfidenceOptions, takes=("eps",),
                   exact=lambda opts: opts.confidence != "prob",
                   nfe=lambda steps, elements, opts: (1, steps))
def confidence_sample(apply_fn, params: Any, key: jax.Array, *, codec: PrimeCodec,
                      schedule: Schedule, batch_size: int, seq_len: int, num_steps: int,
                      carry_over: bool = True, temperature=1.0, top_k: int = 0, top_p=1.0,
                      prompt: Optional[jax.Array] = None,
                      prompt_mask: Optional[jax.Array] = None, time_conditioning: bool = False,
                      eps: float = 1e-5, confidence: str = "prob",
                      top_p_rule: str = "holtzman", block_len: int = 0) -> SampleResult:
  """Draws batch_size sequences; see the module docstring.  Traceable (jit it)."""
  del time_conditioning   # the network is called every step anyway
  if confidence not in CONFIDENCES:
    raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}.")
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}.")
  if block_len < 0:
    raise ValueError(f"sampling.block_len must be >= 0 (0 = no blocks), got {block_len}.")
  mask_id = codec.mask_id
  ts = time_grid(num_steps, eps)
  digits0 = initial_digits(codec, batch_size, seq_len, prompt, prompt_mask)
  block = jnp.arange(seq_len, dtype=jnp.int32) // block_len if block_len else None   # [L]
  m0 = jnp.sum(jnp.any(digits0 == mask_id, -1), -1).astype(jnp.float32)       # [B]
  rows = row_keys(key, batch_size)

  def step(carry, k):
    digits, nfe = carry
    t, s = ts[k], ts[k + 1]
    k_net, k_tok = step_keys(rows, k, 2)
    tok_masked = jnp.any(digits == mask_id, -1)                                # [B, L]
    logits = apply_fn(params, digits, jnp.full((batch_size,), t, jnp.float32), train=False,
                      rng=k_net[0])
    lp = codec.token_logprobs(logits.astype(jnp.float32), digits if carry_over else None)
    lp = apply_filters(lp, temperature, top_k, top_p, top_p_rule)
    x_hat = sample_categorical(k_tok, lp)
    conf = token_confidence(lp, x_hat, confidence)
    keep_masked = jnp.where(k == num_steps - 1, 0.0,
                            jnp.round(m0 * schedule.mask_prob(s)))             # [B]
    n_reveal = jnp.maximum(jnp.sum(tok_masked, -1) - keep_masked, 0)           # [B]
    ranks = descending_ranks(conf, tok_masked, block)        # earliest unfinished block first
    chosen = tok_masked & (ranks < n_reveal[:, None])
    new = jnp.where(chosen[..., None], codec.encode(x_hat), digits).astype(jnp.int32)
    return (new, nfe + jnp.any(tok_masked).astype(jnp.int32)), None

  (digits, nfe), _ = jax.lax.scan(step, (digits0, jnp.array(0, jnp.int32)),
                                  jnp.arange(num_steps, dtype=jnp.int32))
  return SampleResult(tokens=codec.decode(digits), digits=digits, nfe=nfe,
                      idle_steps=jnp.array(0, jnp.int32), num_steps=num_steps)
