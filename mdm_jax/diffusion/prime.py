"""Prime: the sub-token codec and the partial-masking process.

Each token id x in [0, V) is written as ell base-b digits ("sub-tokens"),
most significant first, with b the *smallest integer* such that b**ell >= V
(computed with integers; a floating-point ceil(V ** (1/ell)) is off by one for
some exact powers, e.g. V=32768, ell=5).  Optionally the ids are first sent
through a fixed, seeded permutation of [0, V) ("index shuffling"); because the
permutation maps [0, V) onto itself, the invalid codes are always exactly
[V, b**ell) and no codec function ever produces one.

Layout: a batch of tokens [..., L] becomes digits [..., L, ell]; a masked digit
holds the integer ``b`` (``codec.mask_id``).  For ell = 1 the codec is the
identity (up to the permutation) and the mask id is V, as in MDLM.

The network predicts one V-way distribution per token.  Everything that
connects it to digits works in *code space*: the V logits are scattered onto
the b**ell codes (invalid codes get a large negative logit), the code axis is
reshaped to ell axes of size b (row-major = big-endian digits), "carry-over"
adds a per-slot bias that is 0 on the observed digit (or everywhere when the
slot is masked) and very negative elsewhere, and a digit marginal is a
log-sum-exp over the other ell-1 axes.  Nothing of size V x V or
(batch, length, ell, V) is ever built; the largest object has the size of the
logits padded to b**ell.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

# A large finite negative logit: a fully-masked-out row stays finite (no NaN from
# softmax of all -inf), while exp(NEG_INF - max) underflows to exactly 0 in f32.
NEG_INF = -1e9


def integer_base(vocab_size: int, ell: int) -> int:
  """The smallest integer b >= 2 (or V when ell == 1) with b**ell >= vocab_size."""
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
  if ell < 1:
    raise ValueError(f"prime.ell must be >= 1, got {ell}.")
  if ell == 1:
    return vocab_size
  lo = max(2, int(round(vocab_size ** (1.0 / ell))) - 2)
  while lo > 2 and lo ** ell >= vocab_size:
    lo -= 1
  b = lo
  while b ** ell < vocab_size:
    b += 1
  return b


def inverse_permutation(perm) -> np.ndarray:
  """``inverse_permutation(p)[p[i]] == i`` (int32 [V]); p must be a permutation of 0..V-1."""
  perm = np.asarray(perm, np.int64)
  inv = np.empty(len(perm), np.int32)
  inv[perm] = np.arange(len(perm), dtype=np.int32)
  return inv


@dataclasses.dataclass(frozen=True, eq=False)
class PrimeCodec:
  """Base-b, ell-digit codec over a vocabulary of size V.

  Attributes:
    vocab_size: V.
    ell: digits per token.
    base: b.
    perm: int32 [V] token id -> code (a permutation of [0, V)), or None.
  """
  vocab_size: int
  ell: int
  base: int
  perm: Optional[np.ndarray] = None

  # ------------------------------------------------------------ construction
  @classmethod
  def create(cls, vocab_size: int, ell: int, permute: bool = False,
             perm_seed: int = 0) -> "PrimeCodec":
    b = integer_base(vocab_size, ell)
    perm = None
    if permute:
      perm = np.random.default_rng(perm_seed).permutation(vocab_size).astype(np.int32)
    return cls(vocab_size=vocab_size, ell=ell, base=b, perm=perm)

  @property
  def mask_id(self) -> int:
    """The integer that marks a masked digit (b)."""
    return self.base

  @property
  def num_codes(self) -> int:
    return self.base ** self.ell

  @property
  def num_invalid_codes(self) -> int:
    return self.num_codes - self.vocab_size

  @property
  def inv_perm(self) -> Optional[np.ndarray]:
    return None if self.perm is None else inverse_permutation(self.perm)

  @property
  def powers(self) -> np.ndarray:
    """b**(ell-1), ..., b, 1 (most significant first)."""
    return np.array([self.base ** (self.ell - 1 - j) for j in range(self.ell)], np.int64)

  def digit_table(self) -> np.ndarray:
    """int32 [V, ell]: the digits of every token (a V x ell table, not V x V)."""
    return np.asarray(self.encode(np.arange(self.vocab_size, dtype=np.int32)))

  # ------------------------------------------------------------ codec
  def token_to_code(self, tokens):
    xp = jnp if isinstance(tokens, jax.Array) else np
    tokens = xp.asarray(tokens)
    if self.perm is None:
      return tokens.astype(xp.int32)
    return xp.asarray(self.perm)[tokens]

  def code_to_token(self, codes):
    """Inverse of token_to_code; invalid codes (>= V) map to -1."""
    xp = jnp if isinstance(codes, jax.Array) else np
    codes = xp.asarray(codes).astype(xp.int32)
    valid = codes < self.vocab_size
    safe = xp.where(valid, codes, 0)
    tok = safe if self.perm is None else xp.asarray(self.inv_perm)[safe]
    return xp.where(valid, tok, -1).astype(xp.int32)

  def encode(self, tokens):
    """int tokens [...] -> int32 digits [..., ell], most significant digit first."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    codes = self.token_to_code(tokens).astype(xp.int32)
    powers = xp.asarray(self.powers.astype(np.int32))
    return ((codes[..., None] // powers) % self.base).astype(xp.int32)

  def digits_to_code(self, digits):
    xp = jnp if isinstance(digits, jax.Array) else np
    powers = xp.asarray(self.powers.astype(np.int32))
    return xp.sum(xp.asarray(digits).astype(xp.int32) * powers, axis=-1).astype(xp.int32)

  def decode(self, digits):
    """int digits [..., ell] (no masks) -> tokens [...]; invalid codes give -1."""
    return self.code_to_token(self.digits_to_code(digits))

  def flatten(self, digits):
    """[..., L, ell] -> [..., L*ell]: token i's digits at i*ell .. i*ell+ell-1."""
    return digits.reshape(digits.shape[:-2] + (digits.shape[-2] * self.ell,))

  def unflatten(self, flat):
    return flat.reshape(flat.shape[:-1] + (flat.shape[-1] // self.ell, self.ell))

  # ------------------------------------------------------------ code space
  def code_logits(self, token_logits: jax.Array) -> jax.Array:
    """[..., V] token logits -> [..., b**ell] code logits; invalid codes = NEG_INF.

    Logits of a padded output head ([..., V'] with V' > V) are accepted: only the first
    V columns are read, so no padded column ever becomes a code.
    """
    width = token_logits.shape[-1]
    if width < self.vocab_size:
      raise ValueError(f"token logits have {width} columns; the codec needs V = "
                       f"{self.vocab_size}.")
    x = token_logits if width == self.vocab_size else token_logits[..., :self.vocab_size]
    if self.perm is not None:
      x = jnp.take(x, jnp.asarray(self.inv_perm), axis=-1)
    pad = self.num_codes - self.vocab_size
    if pad:
      x = jnp.concatenate(
          [x, jnp.full(x.shape[:-1] + (pad,), NEG_INF, x.dtype)], axis=-1)
    return x

  def slot_bias(self, noisy_digits: jax.Array) -> jax.Array:
    """Carry-over bias [..., ell, b]: 0 where digit value v is allowed in slot j.

    A slot is unconstrained when masked; an observed slot allows only its digit.
    """
    vals = jnp.arange(self.base, dtype=jnp.int32)
    d = noisy_digits[..., None]
    allowed = (d == self.mask_id) | (d == vals)
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)

  def restricted_code_logprobs(self, token_logits: jax.Array,
                               noisy_digits: Optional[jax.Array] = None) -> jax.Array:
    """log p(code | y_t) in f32, shape [..., b, ..., b] (ell axes of size b).

    With ``noisy_digits`` ([..., ell]) the distribution is restricted to the
    tokens consistent with the observed digits (carry-over); without it the
    plain softmax over the V valid tokens is returned.
    """
    x = self.code_logits(token_logits.astype(jnp.float32))
    lead = x.shape[:-1]
    x = x.reshape(lead + (self.base,) * self.ell)
    if noisy_digits is not None:
      chex.assert_shape(noisy_digits, lead + (self.ell,))
      bias = self.slot_bias(noisy_digits)
      for j in range(self.ell):
        shape = lead + tuple(self.base if k == j else 1 for k in range(self.ell))
        x = x + bias[..., j, :].reshape(shape)
    axes = tuple(range(len(lead), len(lead) + self.ell))
    return x - jax.scipy.special.logsumexp(x, axis=axes, keepdims=True)

  def digit_log_marginals(self, code_logprobs: jax.Array) -> jax.Array:
    """[..., b, ..., b] code log-probs -> [..., ell, b] per-slot log marginals."""
    nlead = code_logprobs.ndim - self.ell
    outs = []
    for j in range(self.ell):
      others = tuple(nlead + k for k in range(self.ell) if k != j)
      outs.append(jax.scipy.special.logsumexp(code_logprobs, axis=others)
                  if others else code_logprobs)
    return jnp.stack(outs, axis=-2)

  def token_logprobs(self, token_logits: jax.Array,
                     noisy_digits: Optional[jax.Array] = None) -> jax.Array:
    """log p(x | y_t) over the V tokens [..., V] (restricted when noisy_digits is given)."""
    lp = self.restricted_code_logprobs(token_logits, noisy_digits)
    lp = lp.reshape(lp.shape[:lp.ndim - self.ell] + (self.num_codes,))[..., :self.vocab_size]
    if self.perm is not None:
      lp = jnp.take(lp, jnp.asarray(self.perm), axis=-1)
    return lp

  def consistent_tokens(self, noisy_digits: jax.Array) -> jax.Array:
    """bool [..., V]: tokens whose digits agree with every observed digit.

    Built slot by slot from the V x ell digit table: O(V * ell) work per token,
    never a V x V object.
    """
    table = jnp.asarray(self.digit_table())             # [V, ell]
    allowed = self.slot_bias(noisy_digits) == 0.0       # [..., ell, b]
    out = None
    for j in range(self.ell):
      ok = jnp.take(allowed[..., j, :], table[:, j], axis=-1)  # [..., V]
      out = ok if out is None else (out & ok)
    return out


def codec_from_config(vocab_size: int, prime_config) -> PrimeCodec:
  """Builds the codec for a ``config.prime`` block and a tokenizer's vocab size."""
  return PrimeCodec.create(vocab_size, int(prime_config.ell),
                           permute=bool(prime_config.permute),
                           perm_seed=int(prime_config.perm_seed))


def mask_digits(key: jax.Array, digits: jax.Array, mask_prob: jax.Array,
                mask_id: int, grouped: Optional[jax.Array] = None) -> jax.Array:
  """The forward process: each digit is masked independently with mask_prob.

  Args:
    key: PRNG key.
    digits: int [B, L, ell] clean digits.
    mask_prob: [B] per-sequence masking probability 1 - alpha(t) (or any shape
      broadcastable to digits).
    mask_id: the mask integer (codec.mask_id).
    grouped: optional bool [B]: where true, the ell digits of each token share one
      uniform draw, so the token is masked all or nothing (Prime v2's grouped
      noise, ``prime.chunk_point``); each digit is still masked with mask_prob.
  Returns:
    int32 [B, L, ell] noisy digits.
  """
  mask_prob = jnp.asarray(mask_prob, jnp.float32)
  if mask_prob.ndim == 1:
    mask_prob = mask_prob[:, None, None]
  u = jax.random.uniform(key, digits.shape, jnp.float32)
  if grouped is not None:
    grouped = jnp.asarray(grouped, bool)
    if grouped.ndim == 1:
      grouped = grouped[:, None, None]
    u = jnp.where(grouped, u[..., :1], u)
  return jnp.where(u < mask_prob, mask_id, digits).astype(jnp.int32)
