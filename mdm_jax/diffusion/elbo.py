"""The masked-diffusion ELBO over per-element hazards, Prime's two forms, and the bound.

All objectives return a per-sequence loss in nats (summed over tokens, not
averaged) so that a perplexity is ``exp(sum of losses / number of tokens)``
over an evaluation set, always normalised by the number of *original* tokens
(never by L * ell).

Continuous-time masked-diffusion ELBO (MDLM / MD4 form), for per-element schedules
alpha_ij (``mdm_jax.diffusion.schedules``; ``Schedule.hazards`` gives the mask
probabilities and weights, which broadcast onto the [B, L, ell] elements, so a
univariate schedule is the case where every element has the same alpha):

    NELBO(x) = int_0^1 E_{y_t ~ q(.|x)} [ sum_{masked ij} w_ij(t) * -log p(x_ij | y_t) ] dt,
    w_ij(t) = -alpha_ij'(t) / (1 - alpha_ij(t)).

We draw t ~ U[t_min, 1] (stratified over the batch), multiply by (1 - t_min)
so the Monte Carlo estimate is unbiased for the integral over [t_min, 1], and
add the exact cost of the interval [0, t_min] under a uniform decoder,
sum_ij (1 - alpha_ij(t_min)) * log b, which keeps the reported value a
*strict* upper bound on -log p(x) for any t_min.  With a time-agnostic network and a
per-position schedule the bound equals the expected autoregressive loss over decoding
orders (docs/method/algorithms.md §2.3).

Prime (ell > 1) has two forms, chosen by ``prime.loss``:

* ``marginal`` (default; the only one ever reported as a likelihood): every
  masked digit j of token i is scored by its marginal under the token
  distribution, -log sum_x p(x | y_t) 1[digit_j(x) = y0_ij].  This is the
  MDM ELBO of the digit sequence, hence a valid bound (docs/method/prime.md §3.4).
* ``joint`` (the published objective, kept for comparison): one
  -log p(x0_i | y_t) per token with at least one masked digit.  It is NOT an
  upper bound on the NLL when a token's digits are dependent (docs/method/prime.md §3.3);
  the published perplexities that used it were withdrawn by their authors.

Both reduce to the plain MDM ELBO when ell = 1 (tested).

Learned schedules (``schedule.learned``): the mask pattern is discrete, so the gradient
of E_z[f(z; w)] with respect to the schedule's parameters w has a score part,
E[f d log q_w(z|t)/dw].  Training then draws ``schedule.num_masks`` = K >= 2 masks of the
same sequence at the same t (one network call on a K-times larger batch) and adds the
leave-one-out (RLOO) score term

    S = sum_k sg(f_k - mean_{j != k} f_j) log q_w(z_k | t) / K

with zero value (``S - sg(S)``), so the loss value stays the plain ELBO estimate and its
gradient is unbiased for both the network and w (GenMD4's estimator with per-position
exponents; docs/method/algorithms.md §2.5).  Evaluation uses one mask.

Value-dependent schedules (``schedule.value_dependent``, GenMD4): an element holding value
x is masked with probability t**w_x, so the model's unmasking rate to value d is
w_d p(d | y_t) / t and each masked element costs (1/t) [w_x (-log p(x)) - w_x +
sum_d w_d p(d)] (``value_element_costs`` with the schedule's ``value_weights``; p is the
element's digit marginal), with GenMD4's reconstruction term for [0, t_min]
(``schedule.reconstruction``).

The t-free order estimator (``schedule.estimator == "order"``, ``order_loss``) replaces
the time draw by a Plackett-Luce prefix of the decoding order in training
(docs/method/algorithms.md §2.5 (b)); evaluation still draws t.

Every objective needs the logits only through per-position terms (a token's NLL, a
digit's marginal NLL, a value-dependent element cost), so with a ``SplitNetwork`` (the
network cut before its output head, ``model.loss_chunk`` positions per slice) the head
and those terms run one slice of positions at a time under ``jax.checkpoint``
(``position_terms``): only one slice's [B, c, V] logits exist at once, forward or
backward, at the price of the head's matmul once more in the backward pass.  The
values are the same as with full logits (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from mdm_jax.diffusion import prime as prime_lib
from mdm_jax.diffusion.schedules import Schedule

Array = jax.Array
# apply_fn(params, inputs [B, L, ell] int, t [B] f32, *, train: bool, rng) -> logits [B, L, V]
ApplyFn = Callable[..., Array]

# head_fn(params, features [B, c, D]) -> logits [B, c, V'] with V' >= V (columns >= V padded)
HeadFn = Callable[[Any, Array], Array]

LOSS_FORMS = ("marginal", "joint")
WEIGHTINGS = ("elbo", "flat")


@dataclasses.dataclass(frozen=True)
class DiffusionLossConfig:
  """Static settings of the diffusion objective."""
  form: str = "marginal"          # marginal | joint
  carry_over: bool = True
  t_min: float = 1e-3
  antithetic: bool = True
  weighting: str = "elbo"         # elbo | flat (training only; evaluation is always elbo)
  chunk_point: float = 1.0        # grouped noise (Prime v2): for t > chunk_point a token's
                                  # digits are masked together; 1 = independent (Prime)

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"training.loss_weighting must be one of {WEIGHTINGS}, "
                       f"got {self.weighting!r}.")
    if self.form not in LOSS_FORMS:
      raise ValueError(f"prime.loss must be one of {LOSS_FORMS}, got {self.form!r}.")
    if not 0.0 <= self.chunk_point <= 1.0:
      raise ValueError(f"prime.chunk_point must be in [0, 1], got {self.chunk_point}.")
    if not 0.0 < self.t_min < 1.0:
      raise ValueError(f"training.t_min must be in (0, 1), got {self.t_min}.")


@dataclasses.dataclass(frozen=True)
class SplitNetwork:
  """A network cut before its output head, for losses computed a slice of positions at a time.

  ``features(params, inputs, t, *, train, rng)`` returns the final features [B, L, D];
  ``head(params, x)`` maps features [B, c, D] to float32 logits [B, c, V'] (V' >= V: a
  padded head's extra columns hold a very negative logit and are never read as tokens);
  ``chunk`` is the number of positions per slice (the largest divisor of L not above it).
  """
  features: ApplyFn
  head: HeadFn
  chunk: int

  def __post_init__(self):
    if int(self.chunk) < 1:
      raise ValueError(f"model.loss_chunk must be >= 1 here, got {self.chunk}.")


def chunk_length(length: int, chunk: int) -> int:
  """The largest divisor of ``length`` that is at most ``chunk`` (positions per slice)."""
  c = max(1, min(int(chunk), int(length)))
  while length % c:
    c -= 1
  return c


_UNROLLED = [False]


@contextlib.contextmanager
def unrolled_slices():
  """Within it, ``position_terms`` traces its slices as straight-line code instead of a
  loop (same values), so a cost analysis that counts a loop body once counts every slice
  (``mdm_jax.benchmarks.tpu_compile``)."""
  before = _UNROLLED[0]
  _UNROLLED[0] = True
  try:
    yield
  finally:
    _UNROLLED[0] = before


def position_terms(apply_fn: ApplyFn, params: Any, inputs: Array, t: Array, term_fn,
                   side: Tuple[Array, ...], *, train: bool, rng: Optional[Array],
                   split: Optional[SplitNetwork] = None):
  """``term_fn(logits, *side)`` over all positions: a pytree of [B, L, ...] arrays.

  ``term_fn`` maps logits [B, c, V] and the matching slices of ``side`` (arrays [B, L,
  ...]) to per-position outputs [B, c, ...]; it may close over anything else.  Without
  ``split`` it sees the full logits of ``apply_fn``.  With it the network runs up to its
  features and ``term_fn(head(features slice), ...)`` runs slice by slice in a
  ``lax.scan`` under ``jax.checkpoint``, so the backward pass recomputes each slice's
  logits instead of storing all of them.
  """
  if split is None:
    logits = apply_fn(params, inputs, t, train=train, rng=rng)
    chex.assert_equal(logits.shape[:2], inputs.shape[:2])
    return term_fn(logits, *side)
  x = split.features(params, inputs, t, train=train, rng=rng)            # [B, L, D]
  bsz, length = x.shape[:2]
  c = chunk_length(length, split.chunk)
  n = length // c
  if n == 1:
    return term_fn(split.head(params, x), *side)

  def to_slices(a):                                                      # [n, B, c, ...]
    return jnp.swapaxes(a.reshape((bsz, n, c) + a.shape[2:]), 0, 1)

  def one(xs):
    xc, *sc = xs
    return term_fn(split.head(params, xc), *sc)

  body = jax.checkpoint(one)
  _, out = jax.lax.scan(lambda carry, xs: (carry, body(xs)), None,
                        (to_slices(x),) + tuple(map(to_slices, side)),
                        unroll=n if _UNROLLED[0] else 1)
  return jax.tree.map(
      lambda o: jnp.swapaxes(o, 0, 1).reshape((bsz, length) + o.shape[3:]), out)


def sample_times(key: Array, batch: int, t_min: float, antithetic: bool = True,
                 offset: int = 0, num_strata: Optional[int] = None) -> Array:
  """t in [t_min, 1], shape [batch], f32.

  Stratified ("antithetic" in MDLM/MD4) sampling: one shared u ~ U(0,1) and
  t_k = ((u + offset + k) / num_strata) mod 1 for k < batch, so the batch
  (or several calls with different offsets) covers [0, 1) evenly.
  """
  if antithetic:
    n = num_strata or batch
    u = jax.random.uniform(key, (), jnp.float32)
    r = jnp.mod((u + offset + jnp.arange(batch, dtype=jnp.float32)) / n, 1.0)
  else:
    r = jax.random.uniform(key, (batch,), jnp.float32)
  return t_min + (1.0 - t_min) * r


# ----------------------------------------------------------------- per-token NLL
def mdm_token_nll(logits: Array, noisy_tokens: Array, tokens: Array,
                  mask_id: int) -> Array:
  """Reference MDLM "SUBS" cross-entropy: -log softmax(logits)[x] on masked tokens.

  Args: logits [B, L, V] (or a padded head's [B, L, V'], extra columns very negative);
  noisy_tokens, tokens [B, L].  Returns f32 [B, L].
  """
  chex.assert_equal_shape([noisy_tokens, tokens])
  chex.assert_rank(logits, 3)
  logits = logits.astype(jnp.float32)
  lse = jax.scipy.special.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return jnp.where(noisy_tokens == mask_id, lse - picked, 0.0)


def digit_marginal_nll(logits: Array, noisy_digits: Optional[Array], digits: Array,
                       codec: prime_lib.PrimeCodec) -> Array:
  """-log p(c_j = d_j | y_t) for every slot j: f32 [B, L, ell].

  p(code | y_t) is the softmax of the code logits x (restricted to the codes
  consistent with the observed digits when ``noisy_digits`` is given), so the
  slot-j marginal of the true digit is lse(x with slot j fixed to d_j) - lse(x).
  Fixing a slot is a gather of b**(ell-1) logits; nothing of size [B, L, V] is
  normalised or materialised besides the one logsumexp, which makes this a few
  passes over the logits cheaper (forward and backward) than normalising the code
  distribution and summing out every marginal (``codec.digit_log_marginals``).
  """
  x = codec.code_logits(logits.astype(jnp.float32))
  lead = x.shape[:-1]
  ell, base = codec.ell, codec.base
  x = x.reshape(lead + (base,) * ell)
  if noisy_digits is not None:
    bias = codec.slot_bias(noisy_digits)                    # [B, L, ell, b]
    for j in range(ell):
      shape = lead + tuple(base if k == j else 1 for k in range(ell))
      x = x + bias[..., j, :].reshape(shape)
  axes = tuple(range(len(lead), len(lead) + ell))
  lse_all = jax.scipy.special.logsumexp(x, axis=axes)       # [B, L]
  out = []
  for j in range(ell):
    shape = lead + tuple(1 if k == j else base for k in range(ell))
    idx = jnp.broadcast_to(
        digits[..., j].reshape(lead + (1,) * ell).astype(jnp.int32), shape)
    fixed = jnp.take_along_axis(x, idx, axis=len(lead) + j)
    out.append(lse_all - jax.scipy.special.logsumexp(fixed, axis=axes))
  return jnp.stack(out, axis=-1)


def prime_token_nll(logits: Array, noisy_digits: Array, digits: Array,
                    codec: prime_lib.PrimeCodec, form: str = "marginal",
                    carry_over: bool = True) -> Array:
  """Per-token Prime loss [B, L] (f32).

  Args:
    logits: [B, L, V] token logits.
    noisy_digits: int [B, L, ell] with codec.mask_id at masked digits.
    digits: int [B, L, ell] clean digits.
    codec: the Prime codec.
    form: "marginal" (valid bound) or "joint" (published, not a bound).
    carry_over: restrict p(x|y_t) to tokens consistent with observed digits.
  """
  b, l = logits.shape[:2]
  chex.assert_shape([noisy_digits, digits], (b, l, codec.ell))
  masked = noisy_digits == codec.mask_id                    # [B, L, ell]
  if form == "marginal":
    nll = digit_marginal_nll(logits, noisy_digits if carry_over else None, digits, codec)
    return jnp.sum(jnp.where(masked, nll, 0.0), axis=-1)
  logp = codec.restricted_code_logprobs(
      logits, noisy_digits if carry_over else None)        # [B, L, b, ..., b]
  if form == "joint":
    flat = logp.reshape((b, l, codec.num_codes))
    code = codec.digits_to_code(digits)
    picked = jnp.take_along_axis(flat, code[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.any(masked, axis=-1), -picked, 0.0)
  raise ValueError(f"Unknown Prime loss form {form!r}; valid: {LOSS_FORMS}.")


# ----------------------------------------------------------------- sequence losses
def draw_masks(key: Array, digits: Array, p_mask: Array, mask_id: int,
               row_ids: Optional[Array] = None, grouped: Optional[Array] = None) -> Array:
  """Noisy digits [B, L, ell] with mask probabilities ``p_mask`` [B, L|1, S|1].

  With ``row_ids`` each row's mask is drawn from fold_in(key, row_id), so the result
  does not depend on how a global batch is cut into microbatches or shards.
  ``grouped`` (bool [B]) masks a token's digits all together (grouped noise).
  """
  if row_ids is None:
    return prime_lib.mask_digits(key, digits, p_mask, mask_id, grouped)
  g = jnp.zeros((digits.shape[0],), bool) if grouped is None else grouped
  return jax.vmap(lambda r, d, q, gr: prime_lib.mask_digits(
      jax.random.fold_in(key, r), d[None], q[None], mask_id,
      None if grouped is None else gr[None])[0])(row_ids, digits, p_mask, g)


def reconstruction_bound(schedule: Schedule, t_min: float, length: int,
                         codec: prime_lib.PrimeCodec, params: Any = None) -> Array:
  """Exact cost of [0, t_min] when the digits still masked at t_min are filled
  uniformly: E[#masked digits] * log b (a value-free schedule; the value of
  ``Schedule.reconstruction`` for any sequence).  Tiny (t_min = 1e-3) but keeps the
  bound strict."""
  p = schedule.hazards(params, jnp.full((1,), t_min, jnp.float32), length).mask_prob
  return jnp.sum(jnp.broadcast_to(p, (1, length, codec.ell))) * math.log(codec.base)


def diffusion_loss(apply_fn: ApplyFn, params: Any, tokens: Array, key: Array, *,
                   codec: prime_lib.PrimeCodec, schedule: Schedule,
                   cfg: DiffusionLossConfig, train: bool = True,
                   t: Optional[Array] = None, row_ids: Optional[Array] = None,
                   num_masks: Optional[int] = None,
                   split: Optional[SplitNetwork] = None) -> Tuple[Array, Dict[str, Array]]:
  """Monte Carlo NELBO (or the joint objective) per sequence, in nats.

  Args:
    apply_fn: the network.
    params: its parameters (a learned schedule's under ``params["schedule"]``).
    tokens: int [B, L] clean tokens.
    key: PRNG key (time, mask and dropout randomness all derive from it).
    codec, schedule, cfg: see module docstring.
    train: enables dropout (and, for a learned schedule, K = ``schedule.num_masks`` masks).
    t: optional [B] times to use instead of sampling them.
    row_ids: optional int [B] global row indices; when given, each sequence's
      mask is drawn from fold_in(key, row_id), so the result does not depend
      on how a global batch is cut into microbatches or shards.
    num_masks: masks per sequence (default: ``schedule.num_masks`` when training a
      learned schedule, else 1).
    split: the same network cut before its head: the loss then runs a slice of
      positions at a time (``position_terms``); the value is the same.
  Returns:
    (loss [B] f32, metrics) where loss includes the [0, t_min] term.
  """
  chex.assert_rank(tokens, 2)
  schedule.check(cfg, codec)
  if train and schedule.estimator == "order":
    return order_loss(apply_fn, params, tokens, key, codec=codec, schedule=schedule, cfg=cfg,
                      t=t, row_ids=row_ids, num_masks=num_masks, split=split)
  bsz, length = tokens.shape
  k_t, k_m, k_net = jax.random.split(key, 3)
  if t is None:
    t = sample_times(k_t, bsz, cfg.t_min, cfg.antithetic)
  if num_masks is None:
    num_masks = schedule.num_masks if (train and schedule.learned) else 1
  digits = codec.encode(tokens)
  grouped = (t > cfg.chunk_point) if cfg.chunk_point < 1.0 and codec.ell > 1 else None
  hazards = schedule.hazards(params, t, length, digits)              # each -> [B, L, ell]
  p_mask = jax.lax.stop_gradient(hazards.mask_prob)
  keys = [k_m] + [jax.random.fold_in(k_m, j) for j in range(1, num_masks)]
  noisy = jnp.concatenate([draw_masks(k, digits, p_mask, codec.mask_id, row_ids, grouped)
                           for k in keys], axis=0)                      # [K B, L, ell]
  if row_ids is not None:
    k_net = jax.random.fold_in(k_net, row_ids[0])   # dropout differs per microbatch
  tt = jnp.tile(t, num_masks) if num_masks > 1 else t
  clean = jnp.tile(digits, (num_masks, 1, 1)) if num_masks > 1 else digits
  masked = noisy == codec.mask_id

  def terms(fn, *side):   # fn(logits, noisy, clean, *side) per position, over all K B rows
    return position_terms(apply_fn, params, noisy, tt, fn, (noisy, clean) + side, train=train,
                          rng=k_net, split=split)

  def tile(a):            # [B, ...] -> [K B, ...]
    return jnp.tile(a, (num_masks,) + (1,) * (a.ndim - 1)) if num_masks > 1 else a

  if cfg.weighting == "flat":
    # Mean cross-entropy over the partly masked tokens, scaled to a sequence:
    # not a bound, but free of the 1/t weight's spikes at small batch sizes.
    nll = terms(lambda lg, nz, cl: prime_token_nll(lg, nz, cl, codec, cfg.form, cfg.carry_over))
    n = jnp.sum(jnp.any(masked, axis=-1), axis=-1).astype(jnp.float32)
    f = (jnp.sum(nll, axis=-1) * length / jnp.maximum(n, 1.0)).reshape(num_masks, bsz)
    loss = jnp.mean(f, axis=0)
  else:
    # One sum over elements: sum_ij w_ij(t) cost_ij, the weights broadcast from the
    # schedule's [B, L|1, ell|1] onto the costs [K B, L, ell].
    if schedule.value_dependent:
      # The cost carries the rate of every value: w_x (-log p(x)) - w_x + sum_d w_d p(d).
      rates = tile(jnp.broadcast_to(schedule.value_weights(params, t),
                                    (bsz, length, codec.ell, codec.base)))
      weight = jnp.ones((), jnp.float32)
      cost = terms(lambda lg, nz, cl, r: value_element_costs(lg, nz, cl, r, codec,
                                                             cfg.carry_over), rates)
    elif cfg.form == "joint":
      # One cost per token, -log p(x0_i | y_t), weighted by its (shared) hazard:
      # ``Schedule.check`` refuses per-digit hazards with this form.
      weight = tile(hazards.weight[:, :, :1])
      cost = terms(lambda lg, nz, cl: prime_token_nll(lg, nz, cl, codec, "joint",
                                                      cfg.carry_over))[..., None]
    else:
      weight = tile(hazards.weight)
      cost = terms(lambda lg, nz, cl: jnp.where(nz == codec.mask_id, digit_marginal_nll(
          lg, nz if cfg.carry_over else None, cl, codec), 0.0))      # [K B, L, ell]
    f = jnp.sum(weight * cost, axis=(1, 2)) * (1.0 - cfg.t_min)
    f = f.reshape(num_masks, bsz)
    loss = (f[0] if num_masks == 1 else jnp.mean(f, axis=0)) + schedule.reconstruction(
        params, cfg.t_min, digits, codec)
  if num_masks >= 2 and schedule.learned:        # RLOO score term, zero value
    log_q = schedule.log_q(params, tt, masked, clean).reshape(num_masks, bsz)
    loss = loss + rloo_score(f, log_q)
  return loss, _mask_metrics(masked[:bsz], schedule, params, length)


def rloo_score(f: Array, log_q: Array) -> Array:
  """The leave-one-out score term [B] for K >= 2 draws: f, log_q [K, B].  Zero value;
  its gradient is sum_k (f_k - mean_{j != k} f_j) d log_q_k / K."""
  k = f.shape[0]
  fs = jax.lax.stop_gradient(f)
  loo = (jnp.sum(fs, axis=0, keepdims=True) - fs) / (k - 1)
  score = jnp.sum((fs - loo) * log_q, axis=0) / k
  return score - jax.lax.stop_gradient(score)


def _mask_metrics(m0: Array, schedule: Schedule, params: Any, length: int) -> Dict[str, Array]:
  return {
      "masked_fraction": jnp.mean(m0.astype(jnp.float32)),
      "partial_fraction": jnp.mean(
          (jnp.any(m0, -1) & jnp.any(~m0, -1)).astype(jnp.float32)),
      **schedule.train_metrics(params, length),
  }


def value_dependent_terms(logits: Array, noisy: Array, clean: Array, w: Array, t: Array,
                          codec: prime_lib.PrimeCodec, carry_over: bool = True) -> Array:
  """Per-sequence NELBO integrand [B] of a value-dependent schedule at times t [B].

  Every masked element (digit slot j of a token, clean value x) with predicted marginal
  p over its b values costs (1/t) [w[j, x] (-log p(x)) - w[j, x] + sum_d w[j, d] p(d)]:
  the continuous-time ELBO when the model unmasks slot j to d at rate w[j, d] p(d) / t
  and the truth at rate w[j, x] / t.  w: exponents [ell, b].
  """
  return jnp.sum(value_dependent_elements(logits, noisy, clean, w, t, codec, carry_over),
                 axis=(1, 2))


def value_dependent_elements(logits: Array, noisy: Array, clean: Array, w: Array, t: Array,
                             codec: prime_lib.PrimeCodec, carry_over: bool = True) -> Array:
  """The element costs of ``value_dependent_terms`` [B, L, ell] (0 where observed)."""
  return value_element_costs(logits, noisy, clean, w[None, None] / t[:, None, None, None],
                             codec, carry_over)


def value_element_costs(logits: Array, noisy: Array, clean: Array, rates: Array,
                        codec: prime_lib.PrimeCodec, carry_over: bool = True) -> Array:
  """Element costs [B, L, ell] (0 where observed) for value weights ``rates`` [B, L|1, ell, b]
  (``Schedule.value_weights``): h_x (-log p(x)) - h_x + sum_d h_d p(d), with h the weight
  of each value and p the element's digit marginal; h_x (-log p(x)) when h is constant."""
  lp = codec.digit_log_marginals(codec.restricted_code_logprobs(
      logits, noisy if carry_over else None))                          # [B, L, ell, b]
  h_x = jnp.take_along_axis(rates, clean[..., None], axis=-1)[..., 0]  # [B, L, ell]
  lp_x = jnp.take_along_axis(lp, clean[..., None], axis=-1)[..., 0]
  rate = jnp.sum(jnp.exp(lp) * rates, axis=-1)
  term = h_x * (-lp_x) - h_x + rate
  return jnp.where(noisy == codec.mask_id, term, 0.0)


def order_loss(apply_fn: ApplyFn, params: Any, tokens: Array, key: Array, *,
               codec: prime_lib.PrimeCodec, schedule: Schedule, cfg: DiffusionLossConfig,
               t: Optional[Array] = None, row_ids: Optional[Array] = None,
               num_masks: Optional[int] = None,
               split: Optional[SplitNetwork] = None) -> Tuple[Array, Dict[str, Array]]:
  """The t-free Plackett-Luce estimator of the (untruncated) ELBO per sequence [B].

  With N = L * ell digits and log-weights ``schedule.element_log_w`` [N]: the number k of
  decoded digits comes from the times t (stratified over the global batch, k = floor(N
  (t - t_min) / (1 - t_min))); K = ``schedule.num_masks`` ordered prefixes of length k
  are drawn by the Gumbel-top-k trick; each costs

      f = N sum_{j undecoded} (w_j / W_rest) (-log p(x_j | decoded digits)),

  and the leave-one-out score term uses the prefix's Plackett-Luce log-probability
  sum_{m < k} [log w_{s_m} - logsumexp_{m' >= m} log w_{s_m'}]
  (docs/method/algorithms.md §2.5 (b)).  The network is called once per prefix with the
  times t (ignored by the time-agnostic network this needs).
  """
  bsz, length = tokens.shape
  ell = codec.ell
  n = length * ell
  k_t, k_m, k_net = jax.random.split(key, 3)
  if t is None:
    t = sample_times(k_t, bsz, cfg.t_min, cfg.antithetic)
  if num_masks is None:
    num_masks = max(int(schedule.num_masks), 1)
  r = (t - cfg.t_min) / (1.0 - cfg.t_min)
  seen = jnp.clip(jnp.floor(r * n), 0, n - 1).astype(jnp.int32)        # digits decoded [B]
  digits = codec.encode(tokens)
  lw = schedule.element_log_w(params, length, ell)                     # [N]
  lw_sg = jax.lax.stop_gradient(lw)

  def gumbel(k):
    if row_ids is None:
      return jax.random.gumbel(k, (bsz, n), jnp.float32)
    return jax.vmap(lambda r_: jax.random.gumbel(jax.random.fold_in(k, r_), (n,),
                                                 jnp.float32))(row_ids)

  keys = [k_m] + [jax.random.fold_in(k_m, j) for j in range(1, num_masks)]
  order = jnp.concatenate([jnp.argsort(-(lw_sg[None] + gumbel(k)), axis=-1) for k in keys],
                          axis=0)                                      # [K B, N]
  seen_k = jnp.tile(seen, num_masks)
  rank = jnp.argsort(order, axis=-1)                                   # place of each digit
  masked_flat = rank >= seen_k[:, None]                                # [K B, N]
  masked = codec.unflatten(masked_flat)
  clean = jnp.tile(digits, (num_masks, 1, 1))
  noisy = jnp.where(masked, codec.mask_id, clean).astype(jnp.int32)
  if row_ids is not None:
    k_net = jax.random.fold_in(k_net, row_ids[0])
  tt = jnp.tile(t, num_masks)
  nll = codec.flatten(position_terms(
      apply_fn, params, noisy, tt,
      lambda lg, nz, cl: digit_marginal_nll(lg, nz if cfg.carry_over else None, cl, codec),
      (noisy, clean), train=True, rng=k_net, split=split))             # [K B, N]
  w = jnp.where(masked_flat, jnp.exp(lw)[None], 0.0)
  f = n * jnp.sum(w * nll, axis=-1) / jnp.sum(w, axis=-1)
  lw_sorted = lw[order]                                                # [K B, N]
  rest = jnp.flip(jax.lax.cumlogsumexp(jnp.flip(lw_sorted, 1), axis=1), 1)
  before = jnp.arange(n)[None, :] < seen_k[:, None]
  log_p = jnp.sum(jnp.where(before, lw_sorted - rest, 0.0), axis=-1)
  f = f.reshape(num_masks, bsz)
  loss = jnp.mean(f, axis=0)
  if num_masks >= 2 and schedule.learned:
    loss = loss + rloo_score(f, log_p.reshape(num_masks, bsz))
  return loss, _mask_metrics(masked[:bsz], schedule, params, length)


def mdm_elbo_reference(apply_fn: ApplyFn, params: Any, tokens: Array, key: Array, *,
                       schedule: Schedule, vocab_size: int, t_min: float = 1e-3,
                       antithetic: bool = True, train: bool = False) -> Array:
  """The plain MDM (MDLM/MD4) ELBO, written independently of the Prime code.

  Uses the same key splits as ``diffusion_loss`` so both see the same times and
  masks; ``diffusion_loss`` with ell = 1 must match it exactly (tested).
  """
  bsz, length = tokens.shape
  k_t, k_m, k_net = jax.random.split(key, 3)
  t = sample_times(k_t, bsz, t_min, antithetic)
  u = jax.random.uniform(k_m, tokens.shape + (1,), jnp.float32)[..., 0]
  noisy = jnp.where(u < schedule.mask_prob(t)[:, None], vocab_size, tokens)
  logits = apply_fn(params, noisy[..., None], t, train=train, rng=k_net)
  nll = mdm_token_nll(logits, noisy, tokens, vocab_size)
  recon = schedule.mask_prob(jnp.float32(t_min)) * length * math.log(vocab_size)
  return schedule.weight(t) * (1.0 - t_min) * jnp.sum(nll, -1) + recon


def diffusion_bound(apply_fn: ApplyFn, params: Any, tokens: Array, key: Array, *,
                    codec: prime_lib.PrimeCodec, schedule: Schedule,
                    cfg: DiffusionLossConfig, num_time_samples: int = 1,
                    split: Optional[SplitNetwork] = None,
                    row_ids: Optional[Array] = None) -> Array:
  """Evaluation: the NELBO per sequence averaged over K stratified times.

  Every draw is per row, so a row's bound depends only on the key, its row id and its
  tokens -- not on the eval batch size, the other rows or the mesh.  Row r's K times
  are t_min + (1 - t_min) (u_r + k) / K, k < K, one uniform u_r ~ U(0, 1) from
  fold_in(k_u, r): stratified over the row's own K samples (each time is marginally
  uniform, so the average is an unbiased estimate of the bound), and its k-th mask
  from fold_in(key_k, r) (``draw_masks``); one network call (one mask) per k.
  ``row_ids`` (int [B]) are the rows' global indices in the eval set; default
  0..B-1.  Always evaluates the *marginal* (valid) bound with independent digit
  masking, whatever form or grouped noise (``chunk_point``) was used for training;
  a valid bound for every schedule and every value of its parameters.
  """
  bound_cfg = dataclasses.replace(cfg, form="marginal", weighting="elbo", chunk_point=1.0)
  bsz = tokens.shape[0]
  rows = (jnp.arange(bsz, dtype=jnp.int32) if row_ids is None
          else jnp.asarray(row_ids).astype(jnp.int32))
  k_u, k_rest = jax.random.split(key)
  keys = jax.random.split(k_rest, num_time_samples)
  u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(k_u, r), (), jnp.float32))(rows)

  def one(k, carry):
    r = (u + k.astype(jnp.float32)) / num_time_samples          # in [0, 1)
    t = cfg.t_min + (1.0 - cfg.t_min) * r
    loss, _ = diffusion_loss(apply_fn, params, tokens, keys[k], codec=codec,
                             schedule=schedule, cfg=bound_cfg, train=False, t=t, num_masks=1,
                             split=split, row_ids=rows)
    return carry + loss

  total = jax.lax.fori_loop(0, num_time_samples, one, jnp.zeros((bsz,), jnp.float32))
  return total / num_time_samples
