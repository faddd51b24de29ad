"""Samplers that can re-mask what they decoded: FreeCorrection and ReMDM (docs/method/algorithms.md §4).

Three registered samplers:

``maskgit`` -- the base decoder of FreeCorrection (§4.2 minus steps 5-6).
  Token-level (Prime: a token's digits are revealed / re-masked together).
  T = num_steps steps, one network call each.  Step s (t = t_s of the usual
  grid, time_grid):
    keep_n = floor(M0 (1 - alpha(t_{s+1}))), at least 1, and 0 at the last
    step (M0 = generated positions; the project's schedule plays the role of
    MaskGIT's cosine -- §4.3 "the keep count comes from alpha_s"; a per-
    position schedule contributes its population rate ``mask_prob``);
    every masked token proposes x^ ~ p (temperature / top-k / top-p; carry-
    over; float32 high-range Gumbel) with confidence c = log p(x^) under the
    *unfiltered* p;
    the (keep_n - n_re) proposals with the smallest c + maskgit_select_temp *
    Gumbel stay masked, the rest are committed (n_re = 0 here).
  After step s exactly keep_n tokens are masked; NFE = T.

``self_correct`` -- training-free self-correction, FreeCorrection (Ouyang et
  al. 2026), exactly the released image procedure of §4.2 ported per §4.3:
    every step, each token decoded in an *earlier* step (never a prompt token)
    appends to its history H_i the probability that the current network call
    gives to the token it holds (not its decode-time confidence);
    re-mask budget: r = s / T, cap = 0 for r < p0, c0 for p0 <= r < p1, c1 for
    p1 <= r < p2, c2 for r >= p2 ((p0, p1, p2) = correction_phases,
    (c0, c1, c2) = correction_caps), n_re = min(keep_n, cap), and no
    re-masking unless p0 T < s < T - 1;
    the n_re decoded tokens with the smallest mean(H_i) are re-masked
    (deterministic; their histories cleared) and (keep_n - n_re) proposals
    stay masked, so exactly keep_n tokens are masked after the step -- the
    mask schedule and the NFE are those of ``maskgit``; the step simply
    commits n_re extra new tokens.
  A cap >= 1 is an absolute token count per sequence (the released defaults
  16, 8, 4 were tuned for 4096 image tokens); a cap in (0, 1) is a fraction
  of the sequence's generated positions, rounded up (§4.3's c1 L).
  Scores (§4.3).  ``correction_score="raw"`` (faithful): softmax of the raw
  logits at the decoded position, without carry-over (which would make every
  score 1).  NOTE: this project's losses train only masked positions, so raw
  scores at unmasked positions are whatever the network extrapolates there.
  ``"probe"``: in each step where re-masking can happen, one extra call with a
  random fraction correction_probe_frac of the decoded tokens masked gives
  their exact-conditional scores (only probed tokens get a history entry that
  step; a token without one is not re-masked).  NFE = T + the probe calls.
  ``aux["remasked"]``: re-maskings over the whole batch.  With all caps 0,
  ``self_correct`` equals ``maskgit`` sample for sample (same keys, same NFE).

``remdm`` -- ReMDM (Wang et al. 2025; §4.4), the ancestral sampler of
  ancestral.py (same grid, caching, two-stage float32-safe draws, noise
  removal, and the same keys) with re-masking.  Element-level: tokens for MDM,
  digits for Prime.  Step t -> s, alpha' = alpha(t), alpha(s):
    a revealed (non-prompt) element is re-masked with probability sigma;
    a masked element is revealed to y^ = f(x^) with probability
    (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t), else stays masked;
  valid for 0 <= sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t), which
  keeps every element's marginal masking probability at 1 - alpha_s.
  ``remdm_schedule``:
    "cap":     sigma = min(eta, sigma_max)               (eta default 0.008)
    "rescale": sigma = eta sigma_max, eta <= 1           (default 0.015)
    "conf":    sigma_i = sigma_max softmax_i(-psi_i) over the sequence's revealed
               non-prompt elements, psi_i = the (filtered) probability of the
               draw that revealed element i; masked elements get weight 0, so
               they are revealed at the plain MDLM rate (the literal rule of
               §4.4; this variant does not keep the marginals);
    "loop":    three phases: t in (t_on, 1]: plain steps with alpha rescaled to
               reach alpha_on at t_on; t in (t_off, t_on]: alpha frozen at
               alpha_on and sigma = min(eta, sigma_max) (default 0.02; the
               refinement loop at mask ratio 1 - alpha_on); t <= t_off: plain
               steps from alpha_on to 1.
  With a per-position (multivariate, learned-order) schedule alpha_i(t) the
  same rules hold per position, as in ``ancestral`` (not for "loop").
  ``remdm_eta < 0`` picks the variant's default.  sigma = 0 (eta = 0) is
  ``ancestral`` sample for sample.  The final noise removal draws (as
  ``ancestral`` does) rather than taking ReMDM's argmax; no re-masking there.
  ``aux["remasked"]``: re-masked elements over the batch.  idle_steps counts
  steps after which nothing changed (revealed or re-masked).

Prompt / infill positions are fixed and never re-masked by any of them.

Draws, all per row from the row's own key (``sampling/common.py``), so a sample
does not depend on the batch it was drawn in: the proposals (a high-range Gumbel
categorical), MaskGIT's selection Gumbel noise, the probe choice, and ReMDM's
reveal and re-mask uniforms; float32, or float64 with
``sampling.precision="float64"``.  A probe call that one row needs gives history
entries only to the rows that can re-mask in that step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import Schedule
from mdm_jax.sampling.ancestral import SampleResult, initial_digits, per_digit, time_grid
from mdm_jax.sampling.common import (descending_ranks, merge_tokens, model_logprobs, row_gumbel,
                                     row_keys, row_uniform, step_keys)
from mdm_jax.sampling.filters import apply_filters, sample_categorical
from mdm_jax.sampling.registry import SAMPLERS, SamplerOptions, choices

Array = jax.Array

CORRECTION_SCORES = ("raw", "probe")
REMDM_SCHEDULES = ("cap", "rescale", "conf", "loop")
REMDM_DEFAULT_ETA = {"cap": 0.008, "rescale": 0.015, "conf": 0.0, "loop": 0.02}


def _pick(lp: Array, x: Array) -> Array:
  return jnp.take_along_axis(lp, x[..., None], -1)[..., 0]


def _check_phases_caps(phases: Sequence[float], caps: Sequence[float]):
  phases, caps = tuple(float(p) for p in phases), tuple(float(c) for c in caps)
  if len(phases) != 3 or not 0.0 <= phases[0] <= phases[1] <= phases[2] <= 1.0:
    raise ValueError(f"correction_phases must be 3 non-decreasing values in [0, 1], got {phases}.")
  if len(caps) != 3 or any(not c >= 0 for c in caps):
    raise ValueError(f"correction_caps must be 3 values >= 0, got {caps}.")
  return phases, caps


def _maskgit(apply_fn, params, key, *, codec: PrimeCodec, schedule: Schedule, batch_size: int,
             seq_len: int, num_steps: int, carry_over: bool, temperature, top_k: int, top_p,
             prompt, prompt_mask, eps: float, top_p_rule: str, select_temp: float,
             correct: bool, phases=(0.4, 0.6, 0.8), caps=(0.0, 0.0, 0.0), score: str = "raw",
             probe_frac: float = 0.25, return_trajectory: bool = False) -> SampleResult:
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}.")
  if not select_temp >= 0:
    raise ValueError(f"maskgit_select_temp must be >= 0, got {select_temp}.")
  phases, caps = _check_phases_caps(phases, caps)
  if score not in CORRECTION_SCORES:
    raise ValueError(f"correction_score must be one of {CORRECTION_SCORES}, got {score!r}.")
  if not 0.0 < probe_frac <= 1.0:
    raise ValueError(f"correction_probe_frac must be in (0, 1], got {probe_frac}.")
  big_t = num_steps
  mask_id = codec.mask_id
  ts = time_grid(big_t, eps)
  digits0 = initial_digits(codec, batch_size, seq_len, prompt, prompt_mask)
  gen = jnp.any(digits0 == mask_id, -1)                                     # [B, L]
  m0 = jnp.sum(gen, -1).astype(jnp.int32)                                   # [B]
  cap_tab = jnp.stack([
      jnp.full_like(m0, int(c)) if c >= 1 else jnp.ceil(c * m0).astype(jnp.int32)
      for c in caps])                                                       # [3, B]
  rows = row_keys(key, batch_size)

  def step(carry, s):
    digits, hsum, hcnt, nfe, n_remasked = carry
    k_net, k_tok, k_sel, k_pick, k_pnet = step_keys(rows, s, 5)
    last = s == big_t - 1
    tt = jnp.full((batch_size,), ts[s], jnp.float32)
    tok_masked = jnp.any(digits == mask_id, -1)
    decoded = gen & ~tok_masked
    logits = apply_fn(params, digits, tt, train=False, rng=k_net[0]).astype(jnp.float32)
    lp_raw = codec.token_logprobs(logits, digits if carry_over else None)
    lp = apply_filters(lp_raw, temperature, top_k, top_p, top_p_rule)
    x_hat = sample_categorical(k_tok, lp)
    conf = _pick(lp_raw, x_hat)
    keep = jnp.floor(m0 * schedule.mask_prob(ts[s + 1])).astype(jnp.int32)
    keep = jnp.where(last, 0, jnp.minimum(jnp.maximum(keep, 1), m0))        # [B]
    nfe = nfe + 1
    n_re = jnp.zeros_like(m0)
    remask = jnp.zeros_like(gen)
    if correct:
      r = s.astype(jnp.float32) / big_t
      phase = sum((r >= p).astype(jnp.int32) for p in phases)               # 0..3
      cap = jnp.where(phase == 0, 0, cap_tab[jnp.maximum(phase - 1, 0)])
      window = (s.astype(jnp.float32) > phases[0] * big_t) & ~last
      n_re = jnp.where(window, jnp.minimum(keep, cap), 0)
      x_cur = jnp.maximum(codec.decode(jnp.where(digits == mask_id, 0, digits)), 0)
      if score == "raw":
        p_cur = jnp.exp(_pick(codec.token_logprobs(logits, None), x_cur))
        add = decoded
      else:
        # Only rows that can re-mask this step are probed (and get a history entry).
        can = (n_re > 0) & jnp.any(decoded, -1)                             # [B]
        do = jnp.any(can)
        probe = decoded & (row_uniform(k_pick, gen.shape) < probe_frac) & can[:, None]
        x_in = jnp.where(probe[..., None], mask_id, digits).astype(jnp.int32)

        def run_probe():
          lg = apply_fn(params, x_in, tt, train=False, rng=k_pnet[0]).astype(jnp.float32)
          return jnp.exp(_pick(codec.token_logprobs(lg, x_in if carry_over else None), x_cur))

        p_cur = jax.lax.cond(do, run_probe, lambda: jnp.zeros(gen.shape, jnp.float32))
        add = probe & do
        nfe = nfe + do.astype(jnp.int32)
      hsum = hsum + jnp.where(add, p_cur, 0.0)
      hcnt = hcnt + add.astype(jnp.int32)
      eligible = decoded & (hcnt > 0)
      n_re = jnp.minimum(n_re, jnp.sum(eligible, -1).astype(jnp.int32))
      mean = hsum / jnp.maximum(hcnt, 1)
      remask = eligible & (descending_ranks(-mean, eligible) < n_re[:, None])
    # MaskGIT: the (keep - n_re) least confident proposals (with Gumbel noise) stay masked.
    noisy = conf + select_temp * row_gumbel(k_sel, conf.shape)
    n_commit = jnp.sum(tok_masked, -1) - (keep - n_re)
    commit = tok_masked & (descending_ranks(noisy, tok_masked) < n_commit[:, None])
    new = merge_tokens(codec, digits, x_hat, commit)
    if correct:
      new = jnp.where(remask[..., None], mask_id, new).astype(jnp.int32)
      hsum = jnp.where(remask, 0.0, hsum)
      hcnt = jnp.where(remask, 0, hcnt)
      n_remasked = n_remasked + jnp.sum(remask).astype(jnp.int32)
    return (new, hsum, hcnt, nfe, n_remasked), (new if return_trajectory else None)

  zero = jnp.array(0, jnp.int32)
  init = (digits0, jnp.zeros(gen.shape, jnp.float32), jnp.zeros(gen.shape, jnp.int32), zero,
          zero)
  (digits, _, _, nfe, n_remasked), traj = jax.lax.scan(step, init,
                                                       jnp.arange(big_t, dtype=jnp.int32))
  trajectory = None
  if return_trajectory:   # trajectory[s] = digits before step s; digits = after the last
    trajectory = jnp.concatenate([digits0[None], traj[:-1]], axis=0)
  return SampleResult(tokens=codec.decode(digits), digits=digits, nfe=nfe, idle_steps=zero,
                      num_steps=num_steps, trajectory=trajectory,
                      aux={"remasked": n_remasked} if correct else None)


@dataclasses.dataclass(frozen=True)
class MaskgitOptions(SamplerOptions):
  """``config.sampling`` keys of ``maskgit``."""
  maskgit_select_temp: float = 1.0


@dataclasses.dataclass(frozen=True)
class SelfCorrectOptions(MaskgitOptions):
  """``config.sampling`` keys of ``self_correct``."""
  correction_phases: Tuple[float, ...] = (0.4, 0.6, 0.8)
  correction_caps: Tuple[float, ...] = (16.0, 8.0, 4.0)
  correction_score: str = choices("raw", CORRECTION_SCORES)
  correction_probe_frac: float = 0.25


@dataclasses.dataclass(frozen=True)
class RemdmOptions(SamplerOptions):
  """``config.sampling`` keys of ``remdm``."""
  remdm_schedule: str = choices("cap", REMDM_SCHEDULES)
  remdm_eta: float = -1.0
  remdm_t_on: float = 0.55
  remdm_t_off: float = 0.05
  remdm_alpha_on: float = 0.9


@SAMPLERS.register("maskgit", options=MaskgitOptions, takes=("eps", "return_trajectory"),
                   nfe=lambda steps, elements, opts: (steps, steps))
def maskgit_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *,
                   codec: PrimeCodec, schedule: Schedule, batch_size: int, seq_len: int,
                   num_steps: int, carry_over: bool = True, temperature=1.0, top_k: int = 0,
                   top_p=1.0, prompt: Optional[Array] = None,
                   prompt_mask: Optional[Array] = None, time_conditioning: bool = False,
                   eps: float = 1e-5, maskgit_select_temp: float = 1.0,
                   return_trajectory: bool = False, top_p_rule: str = "holtzman") -> SampleResult:
  """MaskGIT decoding, FreeCorrection's base (see the module docstring).  NFE = T."""
  del time_conditioning
  return _maskgit(apply_fn, params, key, codec=codec, schedule=schedule,
                  batch_size=batch_size, seq_len=seq_len, num_steps=num_steps,
                  carry_over=carry_over, temperature=temperature, top_k=top_k, top_p=top_p,
                  prompt=prompt, prompt_mask=prompt_mask, eps=eps, top_p_rule=top_p_rule,
                  select_temp=maskgit_select_temp, correct=False,
                  return_trajectory=return_trajectory)


@SAMPLERS.register("self_correct", options=SelfCorrectOptions,
                   takes=("eps", "return_trajectory"),
                   nfe=lambda steps, elements, opts: (
                       steps, 2 * steps if opts.correction_score == "probe" else steps))
def self_correct_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *,
                        codec: PrimeCodec, schedule: Schedule, batch_size: int, seq_len: int,
                        num_steps: int, carry_over: bool = True, temperature=1.0,
                        top_k: int = 0, top_p=1.0, prompt: Optional[Array] = None,
                        prompt_mask: Optional[Array] = None, time_conditioning: bool = False,
                        eps: float = 1e-5, maskgit_select_temp: float = 1.0,
                        correction_phases: Sequence[float] = (0.4, 0.6, 0.8),
                        correction_caps: Sequence[float] = (16.0, 8.0, 4.0),
                        correction_score: str = "raw", correction_probe_frac: float = 0.25,
                        return_trajectory: bool = False,
                        top_p_rule: str = "holtzman") -> SampleResult:
  """FreeCorrection training-free self-correction (see the module docstring)."""
  del time_conditioning
  return _maskgit(apply_fn, params, key, codec=codec, schedule=schedule,
                  batch_size=batch_size, seq_len=seq_len, num_steps=num_steps,
                  carry_over=carry_over, temperature=temperature, top_k=top_k, top_p=top_p,
                  prompt=prompt, prompt_mask=prompt_mask, eps=eps, top_p_rule=top_p_rule,
                  select_temp=maskgit_select_temp, correct=True, phases=correction_phases,
                  caps=correction_caps, score=correction_score,
                  probe_frac=correction_probe_frac, return_trajectory=return_trajectory)


def remdm_alpha(schedule: Schedule, remdm_schedule: str, t_on: float, t_off: float,
                alpha_on: float) -> Callable[[Array], Array]:
  """alpha(t) as ReMDM uses it: the schedule's, or the three-phase "loop" one."""
  if remdm_schedule != "loop":
    return schedule.alpha

  def alpha(t):
    t = jnp.asarray(t, jnp.float32)
    ph1 = alpha_on * schedule.alpha(jnp.clip((t - t_on) / (1.0 - t_on), 0.0, 1.0))
    ph3 = alpha_on + (1.0 - alpha_on) * schedule.alpha(jnp.clip(t / t_off, 0.0, 1.0))
    return jnp.where(t > t_on, ph1, jnp.where(t > t_off, alpha_on, ph3))

  return alpha


# Re-masking a token and drawing it again from the model keeps an independent
# position's law; "conf" re-masks by the drawn value's confidence, which does not.
@SAMPLERS.register("remdm", options=RemdmOptions, takes=("eps", "return_trajectory"),
                   exact=lambda opts: opts.remdm_schedule != "conf",
                   nfe=lambda steps, elements, opts: (1, steps + 1))
def remdm_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *,
                 codec: PrimeCodec, schedule: Schedule, batch_size: int, seq_len: int,
                 num_steps: int, carry_over: bool = True, temperature=1.0, top_k: int = 0,
                 top_p=1.0, prompt: Optional[Array] = None,
                 prompt_mask: Optional[Array] = None, time_conditioning: bool = False,
                 eps: float = 1e-5, remdm_schedule: str = "cap", remdm_eta: float = -1.0,
                 remdm_t_on: float = 0.55, remdm_t_off: float = 0.05,
                 remdm_alpha_on: float = 0.9, return_trajectory: bool = False,
                 use_cache: bool = True, top_p_rule: str = "holtzman") -> SampleResult:
  """ReMDM remasking on top of the ancestral sampler (see the module docstring)."""
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}.")
  if remdm_schedule not in REMDM_SCHEDULES:
    raise ValueError(f"remdm_schedule must be one of {REMDM_SCHEDULES}, got {remdm_schedule!r}.")
  eta = REMDM_DEFAULT_ETA[remdm_schedule] if remdm_eta < 0 else float(remdm_eta)
  if remdm_schedule == "rescale" and eta > 1:
    raise ValueError(f"remdm_eta must be <= 1 for the rescale schedule, got {eta}.")
  if remdm_schedule == "loop" and not 0.0 < remdm_t_off < remdm_t_on < 1.0:
    raise ValueError(f"ReMDM loop needs 0 < remdm_t_off < remdm_t_on < 1, got "
                     f"{remdm_t_off}, {remdm_t_on}.")
  if remdm_schedule == "loop" and not 0.0 < remdm_alpha_on < 1.0:
    raise ValueError(f"remdm_alpha_on must be in (0, 1), got {remdm_alpha_on}.")
  mask_id = codec.mask_id
  force_call = bool(time_conditioning) or not use_cache
  ts = time_grid(num_steps, eps)
  alpha = remdm_alpha(schedule, remdm_schedule, remdm_t_on, remdm_t_off, remdm_alpha_on)
  # A multivariate (per-position, e.g. learned-order) schedule: alpha_i(t) [L], exactly as
  # ancestral_sample uses it (sigma and sigma_max become per position).
  position_alpha = (schedule.position_alpha_fn(params, seq_len)
                    if schedule.per_position else None)
  if position_alpha is not None and remdm_schedule == "loop":
    raise ValueError("remdm_schedule='loop' rescales a single alpha(t); it is not defined for "
                     "a per-position (multivariate) schedule. Use cap, rescale or conf.")
  digits0 = initial_digits(codec, batch_size, seq_len, prompt, prompt_mask)
  fixed = digits0 != mask_id                                                # prompt digits
  flat_shape = (batch_size, seq_len * codec.ell)

  def log_probs(digits, t, rng):
    return model_logprobs(apply_fn, params, codec, digits, t, rng, carry_over=carry_over,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          top_p_rule=top_p_rule)[1]

  lp0 = jnp.zeros((batch_size, seq_len, codec.vocab_size), jnp.float32)
  rows = row_keys(key, batch_size)

  def step(carry, k):
    digits, lp_cache, dirty, nfe, idle, psi, n_remasked = carry
    final = k == num_steps
    t, s = ts[k], ts[jnp.minimum(k + 1, num_steps)]
    k_net, k_tok, k_rev = step_keys(rows, k, 3)          # exactly ancestral's keys
    k_re = jax.vmap(lambda r: jax.random.fold_in(         # a separate stream for re-masking
        jax.random.fold_in(r, k), 0x52454D))(rows)
    masked = digits == mask_id
    need = jnp.any(masked) & (dirty | force_call)
    lp = jax.lax.cond(need, lambda: log_probs(digits, t, k_net[0]), lambda: lp_cache)
    nfe = nfe + need.astype(jnp.int32)
    x_hat = sample_categorical(k_tok, lp)
    y_hat = codec.encode(x_hat)
    if position_alpha is not None:
      a_t, a_s = per_digit(position_alpha(t)), per_digit(position_alpha(s))
    else:
      a_t, a_s = alpha(t), alpha(s)
    sigma_max = jnp.clip((1.0 - a_s) / jnp.maximum(a_t, 1e-30), 0.0, 1.0)
    revealed = ~masked & ~fixed
    if remdm_schedule == "cap":
      sigma = jnp.minimum(eta, sigma_max)
    elif remdm_schedule == "rescale":
      sigma = eta * sigma_max
    elif remdm_schedule == "loop":
      sigma = jnp.where((t > remdm_t_off) & (t <= remdm_t_on), jnp.minimum(eta, sigma_max), 0.0)
    else:   # conf: softmax over the sequence's revealed elements of -psi
      logit = jnp.where(revealed, -psi, -jnp.inf).reshape(flat_shape)
      w = jnp.where(jnp.any(revealed.reshape(flat_shape), -1, keepdims=True),
                    jax.nn.softmax(logit, -1), 0.0)
      sigma = sigma_max * jnp.nan_to_num(w).reshape(digits.shape)
    sigma = jnp.where(final, 0.0, jnp.asarray(sigma, jnp.float32))
    sig_unmask = jnp.where(masked, sigma, 0.0) if remdm_schedule == "conf" else sigma
    # (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t); sigma = 0 is ancestral's expression.
    p_reveal = jnp.clip((a_s - a_t + sig_unmask * a_t) / jnp.maximum(1.0 - a_t, 1e-30), 0.0, 1.0)
    p_reveal = jnp.where(final, 1.0, p_reveal).astype(jnp.float32)
    u = row_uniform(k_rev, digits.shape)
    reveal = masked & (u < p_reveal)
    u2 = row_uniform(k_re, digits.shape)
    remask = revealed & (u2 < sigma)
    new = jnp.where(reveal, y_hat, jnp.where(remask, mask_id, digits)).astype(jnp.int32)
    psi = jnp.where(reveal, jnp.exp(_pick(lp, x_hat))[..., None], psi)
    changed = jnp.any(reveal) | jnp.any(remask)
    idle = idle + ((~changed) & (~final)).astype(jnp.int32)
    n_remasked = n_remasked + jnp.sum(remask).astype(jnp.int32)
    out = new if return_trajectory else None
    return (new, lp, (dirty & ~need) | changed, nfe, idle, psi, n_remasked), out

  zero = jnp.array(0, jnp.int32)
  init = (digits0, lp0, jnp.array(True), zero, zero, jnp.zeros(digits0.shape, jnp.float32), zero)
  (digits, _, _, nfe, idle, _, n_remasked), traj = jax.lax.scan(
      step, init, jnp.arange(num_steps + 1, dtype=jnp.int32))
  trajectory = None
  if return_trajectory:
    trajectory = jnp.concatenate([digits0[None], traj[:num_steps]], axis=0)
  return SampleResult(tokens=codec.decode(digits), digits=digits, nfe=nfe, idle_steps=idle,
                      num_steps=num_steps, trajectory=trajectory, aux={"remasked": n_remasked})
