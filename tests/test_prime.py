
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.diffusion import prime


def _brute_base(v, ell):
  b = 1 if ell > 1 else v
  while b ** ell < v or (ell > 1 and b < 2):
    b += 1
  return b


def test_integer_base_exhaustive_and_known_cases():
  assert prime.integer_base(32768, 5) == 8          # float ceil(V**(1/5)) gives 9
  assert prime.integer_base(50257, 2) == 225
  assert prime.integer_base(50257, 6) == 7
  for v in list(range(1, 300)) + [32000, 32768, 50257, 65536, 65537]:
    for ell in range(1, 17):
      assert prime.integer_base(v, ell) == _brute_base(v, ell), (v, ell)


@pytest.mark.parametrize("v,ell,permute", [(84, 2, False), (84, 3, True), (256, 2, False),
                                           (256, 4, True), (1000, 3, True), (50257, 2, True),
                                           (50257, 6, False), (20, 1, True), (7, 8, False)])
def test_roundtrip_digits_range_and_validity(v, ell, permute):
  c = prime.PrimeCodec.create(v, ell, permute=permute, perm_seed=3)
  x = np.arange(v)
  d = c.encode(x)
  assert d.shape == (v, ell) and d.dtype == np.int32
  assert d.min() >= 0 and d.max() < c.base
  np.testing.assert_array_equal(c.decode(d), x)
  # Every produced code is valid (< V) and codes are distinct.
  codes = c.digits_to_code(d)
  assert codes.max() < v and len(np.unique(codes)) == v
  # Invalid codes are exactly [V, b**ell) and decode to -1.
  if c.num_invalid_codes:
    bad = np.arange(v, c.num_codes)
    bad_digits = (bad[:, None] // c.powers) % c.base
    assert np.all(c.decode(bad_digits) == -1)
  # jnp path agrees with numpy path.
  np.testing.assert_array_equal(np.asarray(c.encode(jnp.asarray(x))), d)


def test_msb_first_and_flat_layout():
  c = prime.PrimeCodec.create(1000, 3)   # b = 10: digits are decimal digits
  np.testing.assert_array_equal(c.encode(np.array([123, 7])), [[1, 2, 3], [0, 0, 7]])
  tokens = np.array([[123, 456]])
  flat = c.flatten(c.encode(tokens))
  np.testing.assert_array_equal(flat, [[1, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(c.unflatten(flat), c.encode(tokens))


def test_permutation_is_seeded_and_a_bijection_of_valid_ids():
  a = prime.PrimeCodec.create(500, 2, permute=True, perm_seed=1)
  b = prime.PrimeCodec.create(500, 2, permute=True, perm_seed=1)
  c = prime.PrimeCodec.create(500, 2, permute=True, perm_seed=2)
  np.testing.assert_array_equal(a.perm, b.perm)
  assert not np.array_equal(a.perm, c.perm)
  assert sorted(a.perm.tolist()) == list(range(500))


def test_masking_probability_and_independence():
  c = prime.PrimeCodec.create(84, 2)
  digits = jnp.asarray(c.encode(np.random.default_rng(0).integers(0, 84, (400, 128))))
  for p in (0.0, 0.1, 0.5, 0.9, 1.0):
    noisy = prime.mask_digits(jax.random.key(1), digits, jnp.full((400,), p), c.mask_id)
    m = np.asarray(noisy == c.mask_id)
    n = m.size
    assert abs(m.mean() - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9
    both = (m[..., 0] & m[..., 1]).mean()
    assert abs(both - p * p) <= 4 * np.sqrt(max(p * p * (1 - p * p), 1e-12) / (n / 2)) + 1e-9
    # Unmasked digits are the clean ones.
    assert np.all(np.where(~m, np.asarray(noisy) == np.asarray(digits), True))


def test_grouped_masking_all_or_nothing_per_token():
  c = prime.PrimeCodec.create(84, 3)
  digits = jnp.asarray(c.encode(np.random.default_rng(0).integers(0, 84, (400, 64))))
  p = jnp.where(jnp.arange(400) % 2 == 0, 0.3, 0.7)
  grouped = jnp.arange(400) < 200
  m = np.asarray(prime.mask_digits(jax.random.key(3), digits, p, c.mask_id, grouped)
                 == c.mask_id)
  g, ind = m[:200], m[200:]
  assert np.all(g.all(-1) | ~g.any(-1))                 # whole tokens masked or not
  partial = ind.any(-1) & ~ind.all(-1)
  assert partial.mean() > 0.3                            # independent rows do mix
  for rows, q in ((slice(0, 200, 2), 0.3), (slice(1, 200, 2), 0.7),
                  (slice(200, 400, 2), 0.3), (slice(201, 400, 2), 0.7)):
    frac, n = m[rows].mean(), m[rows].size / 3           # per-digit probability unchanged
    assert abs(frac - q) <= 4 * np.sqrt(q * (1 - q) / n)


def _brute_consistent(c, noisy):
  table = c.digit_table()
  out = np.ones(noisy.shape[:-1] + (c.vocab_size,), bool)
  for j in range(c.ell):
    obs = noisy[..., j:j + 1]
    out &= (obs == c.mask_id) | (table[:, j] == obs)
  return out


@pytest.mark.parametrize("v,ell,permute", [(84, 2, False), (84, 3, True), (30, 4, True),
                                           (20, 1, False)])
def test_carry_over_restriction(v, ell, permute):
  c = prime.PrimeCodec.create(v, ell, permute=permute)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, v, (6, 5))
  digits = c.encode(tokens)
  noisy = np.where(rng.random(digits.shape) < 0.5, c.mask_id, digits)
  logits = jnp.asarray(rng.normal(size=(6, 5, v)) * 3, jnp.float32)
  lp = np.asarray(c.token_logprobs(logits, jnp.asarray(noisy)))
  cons = _brute_consistent(c, noisy)
  np.testing.assert_array_equal(np.asarray(c.consistent_tokens(jnp.asarray(noisy))), cons)
  p = np.exp(lp)
  assert np.all(p[~cons] == 0.0)                      # no mass on inconsistent tokens
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.take_along_axis(cons, tokens[..., None], -1))   # x0 always consistent
  # Restricted = renormalised softmax on the consistent set.
  ref = np.where(cons, np.exp(np.asarray(logits)), 0.0)
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(p, ref, rtol=1e-4, atol=1e-7)
  # Digit marginals: point masses on observed slots, brute force elsewhere.
  marg = np.exp(np.asarray(c.digit_log_marginals(
      c.restricted_code_logprobs(logits, jnp.asarray(noisy)))))
  table = c.digit_table()
  for j in range(ell):
    bf = np.stack([(ref * (table[:, j] == val)).sum(-1) for val in range(c.base)], -1)
    np.testing.assert_allclose(marg[..., j, :], bf, rtol=1e-4, atol=1e-6)
    obs = noisy[..., j] != c.mask_id
    np.testing.assert_allclose(
        np.take_along_axis(marg[..., j, :], digits[..., j:j + 1], -1)[..., 0][obs], 1.0,
        rtol=1e-5)


def test_no_mass_on_invalid_codes():
  c = prime.PrimeCodec.create(20, 3)   # b = 3, 27 codes, 7 invalid
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 20)), jnp.float32)
  lp = c.restricted_code_logprobs(logits).reshape(4, -1)
  assert np.all(np.exp(np.asarray(lp))[:, 20:] == 0.0)
