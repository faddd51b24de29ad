"""PUNT and its adaptive parallel-unmasking baselines (docs/method/algorithms.md §3, §7.5).

NOTE: PUNT's paper body could not be read (docs/method/algorithms.md §0, §10).  ``punt``
implements the *reconstruction* of §3.2 -- binary-rank conditional-
independence tests -- which agrees with every verified fact (training-free,
drops the lower-confidence member of dependent groups, O(log |M|) calls per
step), not necessarily the authors' exact statistic, grouping or defaults.

All three samplers here share one loop over *steps*; a step works on whole
tokens (for Prime, a token with any masked digit is "masked" and a commit
writes all of its remaining digits, which carry-over keeps consistent with
the revealed ones):

1. one network call gives P_i = p(. | y) for every masked token i; a proposal
   x^_i ~ P_i is drawn (temperature / top-k / top-p, float32 high-range
   Gumbel);
2. a rule picks the set S of masked tokens to commit (at least one);
3. x^_S is written; everything else stays masked.

Rules (confidences, entropies and divergences use the *unfiltered* P_i, the
convention of LLaDA / FreeCorrection, docs/method/algorithms.md §7.6):

* ``punt`` (§3.2): the K most confident masked tokens are candidates C, ranked
  r = 0 (most confident) .. |C|-1.  For each bit b = B-1 .. 0,
  B = ceil(log2 |C|): the survivors S with bit b of r equal to 0 are written
  into y (set A_b), one call gives Q^(b), and each survivor i with bit b = 1
  (set T_b) is dropped if D(P_i || Q_i^(b)) > punt_eps.  Every survivor is
  thereby tested against every more confident survivor (at their most
  significant differing bit); rank 0 is never tested, so each step commits
  at least one token.  D is KL(P_i || Q_i) ("kl") or |log Q_i(x^_i) -
  log P_i(x^_i)| ("logprob").
  - ``punt_mode="sequential"`` (default): levels run in turn and S shrinks
    between them; a level whose test set is empty over the whole batch makes
    no call.  NFE per step <= 1 + ceil(log2 |C|), with equality whenever no
    level's test set empties (e.g. punt_eps = inf).
  - ``"batched"``: all B test inputs (built from the full C) go into one call
    on B x batch_size sequences; NFE per step = 2 (each call is bigger).
  - Limits: punt_eps = inf -> top-K confidence decoding; punt_eps = 0 (or
    punt_max_candidates = 1) -> one token per step, in confidence order,
    except for tokens whose conditional does not move at all.  With a
    value-independent confidence ("max_prob", the default, "margin",
    "neg_entropy") and an exact denoiser that limit samples the data law
    exactly; "prob" (= P_i(x^_i), value-dependent) does not, since choosing
    where to reveal by the drawn value biases that value.
* ``eb`` (EB-Sampler, Ben-Hamu et al. 2025, §7.5): masked tokens sorted by
  entropy H_i, ascending; commit the longest prefix U with
  sum_U H - max_U H <= eb_gamma (always at least one).  eb_gamma = 0 commits
  one token per step (plus any zero-entropy ones): exact with an exact model.
* ``fast_dllm`` (Fast-dLLM threshold, §7.5): commit every masked token with
  max_x P_i(x) >= fast_dllm_threshold; if none, the single most confident.
  A threshold > 1 is one-by-one decoding in max-prob order (exact likewise).
  The block-wise semi-autoregressive schedule and KV cache of Fast-dLLM are
  not implemented (no blocks: the whole sequence is one block).

Budget: ``num_steps`` caps the number of steps; the last allowed step
commits every token still masked (noise removal), so the output never holds
a mask.  Steps are adaptive, so the loop is a ``lax.while_loop`` that stops
once nothing in the batch is masked.  NFE counts real calls; no step is ever
idle (idle_steps = 0); ``aux["steps"]`` is the number of steps taken.

Time: the network gets t = alpha^{-1}(1 - f) per sequence, f = the fraction of
its generated digits still masked (only a time-conditioned network cares;
a per-position schedule contributes its population rate ``mask_prob``).
Prompt / infill tokens are fixed from the start and never committed over.

Draws: the proposals x^ are the only random numbers (a float32 high-range
Gumbel categorical per token, float64 with ``sampling.precision="float64"``),
row b's from its own key (``sampling/common.py``); every rule then decides per
row (ties by position), and a test call that one row needs changes nothing in a
row that has nothing to test, so a sample does not depend on the batch it was
drawn in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import Schedule
from mdm_jax.sampling.ancestral import SampleResult, initial_digits
from mdm_jax.sampling.common import (CONFIDENCES, descending_ranks, entropy, merge_tokens,
                                     model_logprobs, row_keys, step_keys, time_for_mask_prob,
                                     token_confidence)
from mdm_jax.sampling.filters import sample_categorical
from mdm_jax.sampling.registry import SAMPLERS, SamplerOptions, choices

Array = jax.Array

PUNT_DIVERGENCES = ("kl", "logprob")
PUNT_MODES = ("sequential", "batched")


def divergence(lp: Array, lq: Array, x_hat: Array, kind: str) -> Array:
  """D(P || Q) per token [B, L] from log-probabilities [B, L, V]."""
  if kind == "kl":
    p = jnp.exp(lp)
    kl = jnp.sum(jnp.where(p > 0, p * (lp - lq), 0.0), -1)
    return jnp.maximum(kl, 0.0)
  if kind == "logprob":
    pick = lambda a: jnp.take_along_axis(a, x_hat[..., None], -1)[..., 0]  # noqa: E731
    return jnp.abs(pick(lq) - pick(lp))
  raise ValueError(f"punt_divergence must be one of {PUNT_DIVERGENCES}, got {kind!r}.")


def _adaptive_sample(apply_fn, params, key, *, codec: PrimeCodec, schedule: Schedule,
                     batch_size: int, seq_len: int, num_steps: int, carry_over: bool,
                     temperature, top_k: int, top_p, prompt, prompt_mask, eps: float,
                     top_p_rule: str, select) -> SampleResult:
  """The shared step loop; ``select(ctx) -> (commit [B, L] bool, extra_calls int32)``."""
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}.")
  mask_id = codec.mask_id
  digits0 = initial_digits(codec, batch_size, seq_len, prompt, prompt_mask)
  n_gen = jnp.maximum(jnp.sum(digits0 == mask_id, (-1, -2)), 1).astype(jnp.float32)   # [B]
  top = schedule.mask_prob(jnp.float32(1.0))
  rows = row_keys(key, batch_size)

  def call(digits, t, rng):
    return model_logprobs(apply_fn, params, codec, digits, t, rng, carry_over=carry_over,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          top_p_rule=top_p_rule)

  def cond(carry):
    k, digits, _ = carry
    return (k < num_steps) & jnp.any(digits == mask_id)

  def body(carry):
    k, digits, nfe = carry
    k_net, k_tok, k_sel = step_keys(rows, k, 3)
    masked = digits == mask_id
    tok_masked = jnp.any(masked, -1)                                         # [B, L]
    frac = jnp.sum(masked, (-1, -2)).astype(jnp.float32) / n_gen
    t = jnp.maximum(time_for_mask_prob(schedule, frac * top), eps)           # [B]
    lp_raw, lp = call(digits, t, k_net[0])
    x_hat = sample_categorical(k_tok, lp)                                    # [B, L]
    last = k == num_steps - 1
    ctx = dict(digits=digits, tok_masked=tok_masked, lp=lp_raw, x_hat=x_hat, t=t, key=k_sel[0],
               active=~last, call=call)
    commit, extra = select(ctx)
    commit = jnp.where(last, tok_masked, commit & tok_masked)
    new = merge_tokens(codec, digits, x_hat, commit)
    return k + 1, new, nfe + 1 + extra

  zero = jnp.array(0, jnp.int32)
  steps, digits, nfe = jax.lax.while_loop(cond, body, (zero, digits0, zero))
  return SampleResult(tokens=codec.decode(digits), digits=digits, nfe=nfe, idle_steps=zero,
                      num_steps=num_steps, aux={"steps": steps})


def _common_kwargs(codec, schedule, batch_size, seq_len, num_steps, carry_over, temperature,
                   top_k, top_p, prompt, prompt_mask, eps, top_p_rule):
  return dict(codec=codec, schedule=schedule, batch_size=batch_size, seq_len=seq_len,
              num_steps=num_steps, carry_over=carry_over, temperature=temperature,
              top_k=top_k, top_p=top_p, prompt=prompt, prompt_mask=prompt_mask, eps=eps,
              top_p_rule=top_p_rule)


@dataclasses.dataclass(frozen=True)
class PuntOptions(SamplerOptions):
  """``config.sampling`` keys of ``punt``."""
  punt_eps: float = 0.05
  punt_max_candidates: int = 0
  punt_divergence: str = choices("kl", PUNT_DIVERGENCES)
  punt_confidence: str = choices("max_prob", CONFIDENCES)
  punt_mode: str = choices("sequential", PUNT_MODES)


@dataclasses.dataclass(frozen=True)
class EbOptions(SamplerOptions):
  """``config.sampling`` keys of ``eb``."""
  eb_gamma: float = 0.1


@dataclasses.dataclass(frozen=True)
class FastDllmOptions(SamplerOptions):
  """``config.sampling`` keys of ``fast_dllm``."""
  fast_dllm_threshold: float = 0.9


def _punt_nfe(steps: int, elements: int, opts: PuntOptions):
  """At most min(T, N) steps of 1 + ceil(log2 |C|) calls (sequential) or 2 (batched)."""
  per_step = 2 if opts.punt_mode == "batched" else 1 + math.ceil(math.log2(max(elements, 1)))
  return 1, min(steps, elements) * per_step


def _one_call_per_step(steps: int, elements: int, opts) -> tuple:
  del opts
  return 1, min(steps, elements)


@SAMPLERS.register("punt", options=PuntOptions, takes=("eps",),
                   exact=lambda opts: opts.punt_confidence != "prob", nfe=_punt_nfe)
def punt_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *, codec: PrimeCodec,
                schedule: Schedule, batch_size: int, seq_len: int, num_steps: int,
                carry_over: bool = True, temperature=1.0, top_k: int = 0, top_p=1.0,
                prompt: Optional[Array] = None, prompt_mask: Optional[Array] = None,
                time_conditioning: bool = False, eps: float = 1e-5,
                punt_eps: float = 0.05, punt_max_candidates: int = 0,
                punt_divergence: str = "kl", punt_confidence: str = "max_prob",
                punt_mode: str = "sequential", top_p_rule: str = "holtzman") -> SampleResult:
  """PUNT (reconstructed, docs/method/algorithms.md §3.2); see the module docstring.

  punt_eps: independence tolerance (nats for "kl"); inf = no test.
  punt_max_candidates: K, the candidate cap per step (0 = every masked token).
  punt_divergence: "kl" | "logprob".  punt_confidence: one of CONFIDENCES.
  punt_mode: "sequential" | "batched".
  """
  del time_conditioning   # the state changes every step: nothing to cache
  if punt_divergence not in PUNT_DIVERGENCES:
    raise ValueError(f"punt_divergence must be one of {PUNT_DIVERGENCES}, "
                     f"got {punt_divergence!r}.")
  if punt_confidence not in CONFIDENCES:
    raise ValueError(f"punt_confidence must be one of {CONFIDENCES}, got {punt_confidence!r}.")
  if punt_mode not in PUNT_MODES:
    raise ValueError(f"punt_mode must be one of {PUNT_MODES}, got {punt_mode!r}.")
  if not punt_eps >= 0:
    raise ValueError(f"punt_eps must be >= 0, got {punt_eps}.")
  k_cap = int(punt_max_candidates)
  if k_cap < 0:
    raise ValueError(f"punt_max_candidates must be >= 0, got {k_cap}.")
  k_static = seq_len if k_cap == 0 else min(k_cap, seq_len)
  levels = max(0, math.ceil(math.log2(k_static))) if k_static > 1 else 0
  thr = float(punt_eps)

  def select(ctx):
    digits, tok_masked, lp, x_hat = ctx["digits"], ctx["tok_masked"], ctx["lp"], ctx["x_hat"]
    conf = token_confidence(lp, x_hat, punt_confidence)
    ranks = descending_ranks(conf, tok_masked)
    n_m = jnp.sum(tok_masked, -1)
    cap = n_m if k_cap == 0 else jnp.minimum(n_m, k_cap)
    cand = tok_masked & (ranks < cap[:, None])
    if levels == 0:
      return cand, jnp.array(0, jnp.int32)

    def test(inp, rng):
      lq, _ = ctx["call"](inp, jnp.tile(ctx["t"], inp.shape[0] // batch_size), rng)
      return lq

    if punt_mode == "sequential":
      def level(i, carry):
        surv, extra = carry
        b = levels - 1 - i
        bit = (ranks >> b) & 1
        reveal, tested = surv & (bit == 0), surv & (bit == 1)
        need = ctx["active"] & jnp.any(tested)
        inp = merge_tokens(codec, digits, x_hat, reveal)
        d = jax.lax.cond(
            need, lambda: divergence(lp, test(inp, jax.random.fold_in(ctx["key"], b)), x_hat,
                                     punt_divergence),
            lambda: jnp.zeros(tok_masked.shape, jnp.float32))
        surv = surv & ~(tested & need & (d > thr))
        return surv, extra + need.astype(jnp.int32)

      return jax.lax.fori_loop(0, levels, level, (cand, jnp.array(0, jnp.int32)))

    bits = jnp.stack([(ranks >> (levels - 1 - i)) & 1 for i in range(levels)])  # [B_l, B, L]
    reveal, tested = cand[None] & (bits == 0), cand[None] & (bits == 1)
    need = ctx["active"] & jnp.any(tested)
    inp = jax.vmap(lambda r: merge_tokens(codec, digits, x_hat, r))(reveal)
    inp = inp.reshape((levels * batch_size,) + digits.shape[1:])

    def all_levels():
      lq = test(inp, ctx["key"]).reshape((levels,) + lp.shape)
      return jax.vmap(lambda q: divergence(lp, q, x_hat, punt_divergence))(lq)

    d = jax.lax.cond(need, all_levels, lambda: jnp.zeros(tested.shape, jnp.float32))
    fail = jnp.any(tested & (d > thr), 0) & need
    return cand & ~fail, need.astype(jnp.int32)

  return _adaptive_sample(apply_fn, params, key, select=select, **_common_kwargs(
      codec, schedule, batch_size, seq_len, num_steps, carry_over, temperature, top_k, top_p,
      prompt, prompt_mask, eps, top_p_rule))


@SAMPLERS.register("eb", options=EbOptions, takes=("eps",), exact=True,
                   nfe=_one_call_per_step)
def eb_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *, codec: PrimeCodec,
              schedule: Schedule, batch_size: int, seq_len: int, num_steps: int,
              carry_over: bool = True, temperature=1.0, top_k: int = 0, top_p=1.0,
              prompt: Optional[Array] = None, prompt_mask: Optional[Array] = None,
              time_conditioning: bool = False, eps: float = 1e-5, eb_gamma: float = 0.1,
              top_p_rule: str = "holtzman") -> SampleResult:
  """EB-Sampler (entropy bound eb_gamma, nats); see the module docstring."""
  del time_conditioning
  if not eb_gamma >= 0:
    raise ValueError(f"eb_gamma must be >= 0, got {eb_gamma}.")

  def select(ctx):
    tok_masked = ctx["tok_masked"]
    h = jnp.where(tok_masked, entropy(ctx["lp"]), jnp.inf)
    ranks = descending_ranks(-h, tok_masked)                       # 0 = lowest entropy
    h_sorted = jnp.sort(h, axis=-1)
    before = jnp.cumsum(h_sorted, -1) - h_sorted                   # sum_U H - max_U H
    n_ok = jnp.sum(jnp.isfinite(h_sorted) & (before <= eb_gamma), -1)
    return tok_masked & (ranks < jnp.maximum(n_ok, 1)[:, None]), jnp.array(0, jnp.int32)

  return _adaptive_sample(apply_fn, params, key, select=select, **_common_kwargs(
      codec, schedule, batch_size, seq_len, num_steps, carry_over, temperature, top_k, top_p,
      prompt, prompt_mask, eps, top_p_rule))


@SAMPLERS.register("fast_dllm", options=FastDllmOptions, takes=("eps",), exact=True,
                   nfe=_one_call_per_step)
def fast_dllm_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *,
                     codec: PrimeCodec, schedule: Schedule, batch_size: int, seq_len: int,
                     num_steps: int, carry_over: bool = True, temperature=1.0, top_k: int = 0,
                     top_p=1.0, prompt: Optional[Array] = None,
                     prompt_mask: Optional[Array] = None, time_conditioning: bool = False,
                     eps: float = 1e-5, fast_dllm_threshold: float = 0.9,
                     top_p_rule: str = "holtzman") -> SampleResult:
  """Fast-dLLM confidence threshold (max-prob >= fast_dllm_threshold); see the module docstring."""
  del time_conditioning
  if not fast_dllm_threshold >= 0:
    raise ValueError(f"fast_dllm_threshold must be >= 0, got {fast_dllm_threshold}.")
  log_thr = math.log(fast_dllm_threshold) if fast_dllm_threshold > 0 else -math.inf

  def select(ctx):
    tok_masked = ctx["tok_masked"]
    conf = jnp.max(ctx["lp"], -1)
    over = tok_masked & (conf >= log_thr)
    best = tok_masked & (descending_ranks(conf, tok_masked) == 0)
    return over | (best & ~jnp.any(over, -1, keepdims=True)), jnp.array(0, jnp.int32)

  return _adaptive_sample(apply_fn, params, key, select=select, **_common_kwargs(
      codec, schedule, batch_size, seq_len, num_steps, carry_over, temperature, top_k, top_p,
      prompt, prompt_mask, eps, top_p_rule))
