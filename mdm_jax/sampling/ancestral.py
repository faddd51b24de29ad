"""The MDM / Prime ancestral sampler with caching (docs/method/prime.md §5, docs/method/algorithms.md §7.1).

State: digits y [B, L, ell] int32 in [0, b], b = codec.mask_id marks a masked
digit (ell = 1 is plain MDM / MDLM).  Time grid t_k = 1 - k (1 - eps) / T,
k = 0..T.  One step from t = t_k to s = t_{k+1}:

1. logits = network(y_t, t).  CACHED: when no digit of the whole batch changed
   since the last call and the network ignores t (time_conditioning=False),
   the previous (already filtered) distribution is reused and no call is made
   (``jax.lax.cond``).  ``nfe`` counts the real calls.
2. log p(x | y_t) over the V tokens: ``codec.token_logprobs`` (restricted to
   tokens consistent with the observed digits when carry_over=True), then
   temperature -> top-k -> top-p.
3. One draw x^ per token (a V-way categorical, high-dynamic-range Gumbel;
   float32, or float64 with ``sampling.precision="float64"``), encoded to
   digits y^ = f(x^).
4. Each still-masked digit becomes y^ with probability
   (alpha(s) - alpha(t)) / (1 - alpha(t)) (an independent Bernoulli: a float32
   uniform, float64 with ``sampling.precision="float64"``),
   else stays masked; revealed digits never change.  For a value-dependent (GenMD4)
   schedule alpha is read at the drawn digit's value, so a digit becomes v with
   probability p(v) (alpha_v(s) - alpha_v(t)) / (1 - alpha_v(t)).

Steps 3 and 4 are the two-stage form: the unmask decision is never a joint
(V+1)-way categorical over tokens and "stay masked", which in float32 would
suppress rare tokens (docs/method/algorithms.md §7.7).

After the last step every digit that is still masked is filled from one more
draw at t_T ("noise removal"; one more NFE only if a call is needed).  It runs
as iteration T of the same scan, with reveal probability 1.  No call (and no
draw that matters) is made once nothing in the batch is masked.

NFE: the calls are exactly one per distinct incomplete state visited, so with
a linear schedule E[NFE] = T (1 - (1 - pi)^N) + 1 - (1 - eps)^N, pi = (1-eps)/T,
N = B L ell -- MDLM's T (1 - (1 - 1/T)^N) up to O(N eps) (``expected_nfe``).

Randomness is per row (``sampling/common.py``): row b's step-k draws come from
split(fold_in(row_key_b, k), 3), so a sample does not depend on the batch it was
drawn in.  Only the network call is shared by the batch (cached while no row
changed); a row's distribution is the same whether it was recomputed or cached.

Prompting / infilling: ``prompt`` tokens at ``prompt_mask`` positions are
encoded and fixed from the start; they are never masked, so never change.

Digits of one token revealed in the same step come from the same x^ and agree;
with carry_over=True every later draw is consistent with the digits already
revealed, so every decoded id is < V.  With carry_over=False and ell > 1 a
token can end as an invalid code, which ``codec.decode`` maps to -1.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp

from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import Schedule
from mdm_jax.sampling.common import model_logprobs, row_keys, row_uniform, step_keys
from mdm_jax.sampling.filters import sample_categorical
from mdm_jax.sampling.registry import SAMPLERS

Array = jax.Array
ApplyFn = Callable[..., Array]


@flax.struct.dataclass
class SampleResult:
  """What every sampler returns.

  tokens: int32 [B, L] decoded ids (-1 only for an invalid code, impossible
    with carry-over).
  digits: int32 [B, L, ell] final digits (no mask).
  nfe: int32 scalar, real network calls (over the whole batch).
  idle_steps: int32 scalar, steps after which nothing in the whole batch changed.
  num_steps: T (static).
  trajectory: int32 [T+1, B, L, ell] or None; trajectory[0] is the initial
    state and trajectory[k] the digits after step k (before noise removal;
    the state after noise removal is ``digits``).
  aux: None or a dict of extra int/float scalars a sampler reports (e.g.
    "steps" of an adaptive sampler, "remasked" of a corrector).
  """
  tokens: Array
  digits: Array
  nfe: Array
  idle_steps: Array
  num_steps: int = flax.struct.field(pytree_node=False, default=0)
  trajectory: Optional[Array] = None
  aux: Optional[Dict[str, Array]] = None


def expected_idle_fraction(num_elements: int, num_steps: int) -> float:
  """(1 - 1/T)^N: the chance a step reveals none of N elements (docs/method/prime.md §5.2).

  For a linear schedule on the uniform grid each element's reveal step is
  (up to eps) uniform over the T steps.  N = B * L * ell for the whole batch.
  """
  return (1.0 - 1.0 / num_steps) ** num_elements


def expected_nfe(num_elements: int, num_steps: int, eps: float = 1e-5) -> float:
  """Expected network calls of ``ancestral_sample`` with caching (linear schedule).

  Iteration k calls iff something is still masked and iteration k-1 changed
  something (k = 0 always calls), so
  E[NFE] = 1 + sum_k P(step k changes something and leaves a mask)
         = T (1 - (1 - pi)^N) + 1 - (1 - eps)^N,  pi = (1 - eps) / T,
  i.e. MDLM's T (1 - (1 - 1/T)^N) up to O(N eps).
  """
  pi = (1.0 - eps) / num_steps
  n = num_elements
  return num_steps * (1.0 - (1.0 - pi) ** n) + 1.0 - (1.0 - eps) ** n


def per_digit(alpha: Array) -> Array:
  """A multivariate schedule's alpha at one time, [L] or [L, S], as [1, L, S] for digits [B, L, ell]."""
  return (alpha[:, None] if alpha.ndim == 1 else alpha)[None]


def time_grid(num_steps: int, eps: float = 1e-5) -> Array:
  """t_k = 1 - k (1 - eps) / T for k = 0..T, float32 [T+1]."""
  k = jnp.arange(num_steps + 1, dtype=jnp.float32)
  # ((T - k) + k eps) / T: no cancellation, so t_T == eps in float32.
  return (((num_steps - k) + k * eps) / num_steps).astype(jnp.float32)


def initial_digits(codec: PrimeCodec, batch_size: int, seq_len: int,
                   prompt: Optional[Array] = None,
                   prompt_mask: Optional[Array] = None) -> Array:
  """All digits masked, except the encoded prompt tokens at prompt_mask.

  prompt: int [L] or [B, L]; prompt_mask: bool of the same (broadcastable)
  shape; when prompt_mask is None the positions with prompt >= 0 are fixed.
  """
  shape = (batch_size, seq_len, codec.ell)
  masked = jnp.full(shape, codec.mask_id, jnp.int32)
  if prompt is None:
    if prompt_mask is not None:
      raise ValueError("prompt_mask was given without a prompt.")
    return masked
  prompt = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (batch_size, seq_len))
  if prompt_mask is None:
    prompt_mask = prompt >= 0
  prompt_mask = jnp.broadcast_to(jnp.asarray(prompt_mask, bool), (batch_size, seq_len))
  enc = codec.encode(jnp.where(prompt_mask, prompt, 0))
  return jnp.where(prompt_mask[..., None], enc, masked).astype(jnp.int32)


@SAMPLERS.register("ancestral", takes=("eps", "chunk_point", "return_trajectory"),
                    exact=True, nfe=lambda steps, elements, opts: (1, steps + 1))
def ancestral_sample(apply_fn: ApplyFn, params: Any, key: Array, *,
                     codec: PrimeCodec, schedule: Schedule, batch_size: int, seq_len: int,
                     num_steps: int, carry_over: bool = True, temperature=1.0,
                     top_k: int = 0, top_p=1.0, prompt: Optional[Array] = None,
                     prompt_mask: Optional[Array] = None, time_conditioning: bool = False,
                     eps: float = 1e-5, return_trajectory: bool = False,
                     use_cache: bool = True, top_p_rule: str = "holtzman",
                     chunk_point: float = 1.0) -> SampleResult:
  """Draws batch_size sequences of seq_len tokens with T = num_steps steps.

  Traceable; jit it with the keyword arguments closed over (functools.partial)
  or as static_argnames -- everything except params, key, prompt and
  prompt_mask (and optionally temperature / top_p) must be static.

  Args:
    apply_fn: (params, digits [B, L, ell] int32, t [B] f32, *, train, rng)
      -> logits [B, L, V].
    params: network parameters.
    key: PRNG key (typed or raw).
    codec: the PrimeCodec (ell = 1 for MDM).
    schedule: masking schedule; only alpha is used.
    batch_size, seq_len, num_steps: B, L, T.
    carry_over: restrict each draw to tokens consistent with observed digits.
    temperature, top_k, top_p, top_p_rule: filters (see filters.py).
    prompt, prompt_mask: fixed tokens (see ``initial_digits``).
    time_conditioning: the network uses t, so it is called every step.
    eps: the grid ends at t_T = eps.
    return_trajectory: also return the digits after every step.
    use_cache: False forces a network call every step (same samples for a
      time-agnostic network; for tests and timing).
    chunk_point: Prime v2 grouped noise (``prime.chunk_point``): while t > chunk_point
      a token's digits share one reveal draw, so whole tokens are revealed at once,
      mirroring training; 1 = every digit on its own.
  Returns:
    SampleResult.
  """
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}.")
  mask_id = codec.mask_id
  force_call = bool(time_conditioning) or not use_cache
  ts = time_grid(num_steps, eps)
  digits0 = initial_digits(codec, batch_size, seq_len, prompt, prompt_mask)
  # A multivariate (per-position, e.g. learned-order) schedule: alpha_i(t) [L] from the params
  # (mdm_jax/diffusion/schedules/), so each position is revealed at its own rate.
  position_alpha = (schedule.position_alpha_fn(params, seq_len)
                    if schedule.per_position else None)
  # A value-dependent (GenMD4) schedule: alpha depends on the drawn value, so the reveal
  # probability is read at y^ (docs/method/algorithms.md §2.7).
  value_alpha = schedule.value_alpha_fn(params) if schedule.value_dependent else None

  def log_probs(digits, t, rng):
    return model_logprobs(apply_fn, params, codec, digits, t, rng, carry_over=carry_over,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          top_p_rule=top_p_rule)[1]

  lp0 = jnp.zeros((batch_size, seq_len, codec.vocab_size), jnp.float32)
  rows = row_keys(key, batch_size)                                 # [B] per-row keys

  def step(carry, k):
    # k < T: the step t_k -> t_{k+1}; k == T: noise removal (reveal probability 1).
    digits, lp_cache, dirty, nfe, idle = carry
    final = k == num_steps
    t, s = ts[k], ts[jnp.minimum(k + 1, num_steps)]
    k_net, k_tok, k_rev = step_keys(rows, k, 3)
    masked = digits == mask_id
    # A draw is needed only while something is masked; a call only if y changed
    # since the last one (or the network uses t / the cache is off).
    need = jnp.any(masked) & (dirty | force_call)
    lp = jax.lax.cond(need, lambda: log_probs(digits, t, k_net[0]), lambda: lp_cache)
    nfe = nfe + need.astype(jnp.int32)
    x_hat = sample_categorical(k_tok, lp)                          # [B, L], row b from k_tok[b]
    y_hat = codec.encode(x_hat)                                    # [B, L, ell]
    if value_alpha is not None:
      a_t, a_s = value_alpha(t, y_hat), value_alpha(s, y_hat)
    elif position_alpha is not None:
      a_t, a_s = per_digit(position_alpha(t)), per_digit(position_alpha(s))
    else:
      a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    p_reveal = jnp.clip((a_s - a_t) / jnp.maximum(1.0 - a_t, 1e-30), 0.0, 1.0)
    p_reveal = jnp.where(final, 1.0, p_reveal).astype(jnp.float32)
    u = row_uniform(k_rev, digits.shape)                           # in [0, 1)
    if chunk_point < 1.0:   # grouped: one draw per token (digits above c are masked together)
      u = jnp.where(t > chunk_point, u[..., :1], u)
    reveal = masked & (u < p_reveal)
    new = jnp.where(reveal, y_hat, digits).astype(jnp.int32)
    changed = jnp.any(reveal)
    idle = idle + ((~changed) & (~final)).astype(jnp.int32)
    out = new if return_trajectory else None
    return (new, lp, (dirty & ~need) | changed, nfe, idle), out

  init = (digits0, lp0, jnp.array(True), jnp.array(0, jnp.int32), jnp.array(0, jnp.int32))
  (digits, _, _, nfe, idle), traj = jax.lax.scan(
      step, init, jnp.arange(num_steps + 1, dtype=jnp.int32))

  trajectory = None
  if return_trajectory:
    trajectory = jnp.concatenate([digits0[None], traj[:num_steps]], axis=0)
  return SampleResult(tokens=codec.decode(digits), digits=digits, nfe=nfe, idle_steps=idle,
                      num_steps=num_steps, trajectory=trajectory)
