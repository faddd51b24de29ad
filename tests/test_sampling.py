"""Tests for mdm_jax.sampling: exactness against oracle models, invariants, NFE, filters.

Which statements are exactly true (and tested as such):
* L = 1, exact posterior, carry-over: the ancestral sampler reproduces p(x)
  exactly for any T and any ell (docs/method/prime.md §5.1).
* L = 2, ell = 1: the reveal times do not depend on the values, so the output
  law is exactly (1 - c) p + c p0 (x) p1, c = P(both tokens revealed in the
  same step) -- a closed form for any T.
* L = 2, ell = 2: the output law equals that of the sampler's Markov chain,
  computed exactly by propagating probabilities over all 4^4 partially masked
  states; that law tends to p as T grows (checked without sampling).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mdm_jax import sampling
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.sampling import filters
from mdm_jax.diffusion.schedules import linear

EPS = 1e-5
P_MIN = 1e-3


def rkey(seed):
  """RBG keys: the samplers accept any key implementation, and on CPU a program with
  threefry keys takes ~3x longer to compile. test_default_threefry_keys covers the default."""
  return jax.random.key(seed, impl="rbg")


# --------------------------------------------------------------------------- helpers
def random_joint(rng, v, length, corr=2.5):
  """A strictly positive, strongly correlated joint table over [V]^L."""
  logits = rng.normal(size=(v,) * length)
  if length >= 2:
    eye = np.zeros((v,) * length)
    for x in range(v):
      eye[(x,) * length] = 1.0
    logits = logits + corr * eye
  p = np.exp(logits)
  return p / p.sum()


def oracle_apply_fn(joint, codec):
  """apply_fn returning log p(x_i | observed digits) per position (exact, by enumeration)."""
  v = codec.vocab_size
  length = joint.ndim
  seqs = np.array(list(itertools.product(range(v), repeat=length)), np.int32)   # [N, L]
  seq_digits = jnp.asarray(codec.encode(seqs))                                  # [N, L, ell]
  log_joint = jnp.asarray(np.log(joint.reshape(-1)), jnp.float32)
  onehot = jnp.asarray(np.eye(v, dtype=np.float32)[seqs])                       # [N, L, V]

  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    d = digits[:, None]                                                        # [B, 1, L, ell]
    ok = (d == codec.mask_id) | (d == seq_digits[None])
    ok = jnp.all(ok, axis=(-1, -2))                                            # [B, N]
    post = jax.nn.softmax(jnp.where(ok, log_joint, -1e9), axis=-1)
    post = jnp.where(ok, post, 0.0)
    marg = jnp.einsum("bn,nlv->blv", post, onehot)
    return jnp.where(marg > 0, jnp.log(jnp.maximum(marg, 1e-30)), -1e9)

  return apply_fn


def random_apply_fn(codec, seed=0, scale=2.0):
  """A deterministic, time-agnostic, non-oracle model: logits depend on all digits."""
  rng = np.random.default_rng(seed)
  emb = jnp.asarray(rng.normal(size=(codec.ell, codec.mask_id + 1, codec.vocab_size)) * scale,
                    jnp.float32)

  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    own = sum(emb[j][digits[..., j]] for j in range(codec.ell))                # [B, L, V]
    return own + 0.5 * jnp.mean(own, axis=1, keepdims=True)

  return apply_fn


def dummy_apply_fn(vocab_size):
  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    return jnp.zeros(digits.shape[:2] + (vocab_size,), jnp.float32)
  return apply_fn


def run_ancestral(apply_fn, codec, key, **kw):
  fn = functools.partial(sampling.ancestral_sample, apply_fn, codec=codec, schedule=linear(),
                         eps=EPS, **kw)
  return jax.jit(fn)(None, key)


def chi2_pvalue(counts, probs):
  counts = np.asarray(counts, np.float64).ravel()
  probs = np.asarray(probs, np.float64).ravel()
  keep = probs > 0
  assert counts[~keep].sum() == 0, "samples fell on zero-probability outcomes"
  exp = probs[keep] / probs[keep].sum() * counts.sum()
  return stats.chisquare(counts[keep], exp).pvalue


def joint_counts(tokens, v):
  tokens = np.asarray(tokens)
  idx = np.zeros(tokens.shape[0], np.int64)
  for i in range(tokens.shape[1]):
    idx = idx * v + tokens[:, i]
  return np.bincount(idx, minlength=v ** tokens.shape[1])


def reveal_step_probs(num_steps, eps=EPS):
  """P(an element is revealed at step k), k < T, and at noise removal (linear schedule)."""
  t = 1.0 - np.arange(num_steps + 1) * (1.0 - eps) / num_steps
  return t[:-1] - t[1:], t[-1]


# --------------------------------------------------------------------------- 1. exactness
@pytest.mark.parametrize("ell", [1, 2, 3])
def test_single_token_exact_for_small_T(ell):
  v = 6
  codec = PrimeCodec.create(v, ell)
  p = random_joint(np.random.default_rng(ell), v, 1)
  res = run_ancestral(oracle_apply_fn(p, codec), codec, rkey(10 + ell),
                      batch_size=20000, seq_len=1, num_steps=4)
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < v
  assert chi2_pvalue(joint_counts(tok, v), p) > P_MIN


def test_two_tokens_mdm_exact_mixture_law():
  """ell = 1, L = 2, T = 3: law = (1-c) p + c p0 x p1 exactly; and it is not p."""
  v, num_steps = 6, 3
  codec = PrimeCodec.create(v, 1)
  p = random_joint(np.random.default_rng(7), v, 2, corr=3.0)
  res = run_ancestral(oracle_apply_fn(p, codec), codec, rkey(3),
                      batch_size=20000, seq_len=2, num_steps=num_steps)
  counts = joint_counts(res.tokens, v)
  pi, last = reveal_step_probs(num_steps)
  c = float(np.sum(pi ** 2) + last ** 2)
  law = (1 - c) * p + c * np.outer(p.sum(1), p.sum(0))
  assert chi2_pvalue(counts, law) > P_MIN
  assert chi2_pvalue(counts, p) < 1e-8      # the test can tell the two apart


def exact_chain_law(joint, codec, num_steps, eps=EPS):
  """Law of the sampler's output by exact propagation over all partially masked states."""
  v, ell, m = codec.vocab_size, codec.ell, codec.mask_id
  length = joint.ndim
  states = np.array(list(itertools.product(range(m + 1), repeat=length * ell)))
  states = states.reshape(-1, length, ell)                                     # [S, L, ell]
  seqs = np.array(list(itertools.product(range(v), repeat=length)))
  seq_digits = codec.encode(seqs)                                              # [N, L, ell]
  ok = np.all((states[:, None] == m) | (states[:, None] == seq_digits[None]), axis=(-1, -2))
  post = ok * joint.reshape(-1)[None]
  reach = post.sum(1) > 0
  post = np.where(reach[:, None], post / np.maximum(post.sum(1, keepdims=True), 1e-300), 0)
  q = np.einsum("sn,nlv->slv", post, np.eye(v)[seqs])                          # [S, L, V]
  table = codec.digit_table()                                                  # [V, ell]
  src, dst = states[:, None], states[None]                                     # [S,1,L,ell],[1,S,L,ell]
  struct = np.all((src == m) | (dst == src), axis=(-1, -2))
  rev = (src == m) & (dst != m)                                                # [S, S, L, ell]
  n_rev = rev.sum((-1, -2))
  n_stay = ((src == m) & (dst == m)).sum((-1, -2))
  agree = ~rev[..., None] | (table.T[None, None, None] == dst[..., None])      # [S,S,L,ell,V]
  fac = np.einsum("slv,stlv->stl", q, np.all(agree, axis=3).astype(np.float64))
  a = struct * np.prod(fac, axis=-1)
  t = 1.0 - np.arange(num_steps + 1) * (1.0 - eps) / num_steps
  rs = list((t[:-1] - t[1:]) / t[:-1]) + [1.0]                                 # + noise removal
  dist = np.zeros(len(states))
  dist[np.all(states == m, axis=(1, 2))] = 1.0
  for r in rs:
    k = a * r ** n_rev * (1.0 - r) ** n_stay
    rows = k.sum(1)
    assert np.allclose(rows[reach], 1.0), "transition kernel is not stochastic"
    dist = dist @ k
  final = np.all(states != m, axis=(1, 2))
  assert np.isclose(dist[final].sum(), 1.0)
  out = np.zeros((v,) * length)
  toks = codec.decode(states[final])
  for x, w in zip(toks, dist[final]):
    if w > 0:
      assert np.all(x >= 0)
      out[tuple(x)] += w
  return out


def test_two_tokens_prime_matches_exact_chain_and_converges():
  v, ell = 6, 2
  codec = PrimeCodec.create(v, ell)                    # b = 3, 9 codes, 3 invalid
  p = random_joint(np.random.default_rng(11), v, 2, corr=3.0)
  law4 = exact_chain_law(p, codec, 4)
  assert 0.5 * np.abs(law4 - p).sum() > 0.02           # T = 4 is visibly not exact ...
  res = run_ancestral(oracle_apply_fn(p, codec), codec, rkey(5),
                      batch_size=20000, seq_len=2, num_steps=4)
  counts = joint_counts(res.tokens, v)
  assert chi2_pvalue(counts, law4) > P_MIN             # ... but the sampler is that chain
  assert chi2_pvalue(counts, p) < 1e-6
  # and the chain converges to p, at rate O(1/T) (TV ~ 0.6 / T here)
  tv64 = 0.5 * np.abs(exact_chain_law(p, codec, 64) - p).sum()
  tv256 = 0.5 * np.abs(exact_chain_law(p, codec, 256) - p).sum()
  assert tv256 < 5e-3 and tv256 < tv64 / 3


# --------------------------------------------------------------------------- 2. categorical
def test_sample_categorical_chi_square_with_rare_entry():
  probs = np.array([0.55, 0.3, 0.1499, 1e-4], np.float64)
  n = 2_000_000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 4))
  draws = np.asarray(jax.jit(filters.sample_categorical)(rkey(0), logits))
  counts = np.bincount(draws, minlength=4)
  assert counts[3] > 100
  assert chi2_pvalue(counts, probs) > P_MIN


# --------------------------------------------------------------------------- 3. validity
def test_never_mask_or_invalid_ids():
  v, ell = 20, 3
  codec = PrimeCodec.create(v, ell)                    # b = 3, 27 codes, 7 invalid
  assert codec.num_invalid_codes == 7
  # T = 2: half the digits come from the first draw, the rest from noise removal,
  # so without carry-over the two draws would often disagree.
  res = run_ancestral(random_apply_fn(codec, scale=0.1), codec, rkey(2),
                      batch_size=64, seq_len=12, num_steps=2)
  tok, dig = np.asarray(res.tokens), np.asarray(res.digits)
  assert tok.shape == (64, 12) and dig.shape == (64, 12, ell)
  assert tok.min() >= 0 and tok.max() < v
  assert dig.min() >= 0 and dig.max() < codec.base
  np.testing.assert_array_equal(codec.encode(tok), dig)


def test_without_carry_over_invalid_codes_appear():
  """Power check for the test above: without carry-over ell=3, V=20 does hit invalid codes."""
  codec = PrimeCodec.create(20, 3)
  res = run_ancestral(random_apply_fn(codec, scale=0.1), codec, rkey(0),
                      batch_size=64, seq_len=12, num_steps=8, carry_over=False)
  assert np.any(np.asarray(res.tokens) == -1)
  assert np.all(np.asarray(res.digits) < codec.base)


def test_mdm_and_ar_never_emit_mask():
  v = 7
  codec = PrimeCodec.create(v, 1)
  res = run_ancestral(random_apply_fn(codec), codec, rkey(1),
                      batch_size=32, seq_len=10, num_steps=5, carry_over=False)
  assert np.asarray(res.tokens).min() >= 0 and np.asarray(res.tokens).max() < v

  def ar_fn(params, inputs, t, *, train=False, rng=None):
    # V+1 logits, the extra one (the BOS/mask row) hugely favoured: must never be drawn.
    big = jnp.full(inputs.shape[:2] + (1,), 50.0)
    return jnp.concatenate([jnp.zeros(inputs.shape[:2] + (v,)), big], axis=-1)
  res = jax.jit(functools.partial(sampling.ar_sample, ar_fn, vocab_size=v, batch_size=32,
                                  seq_len=6, bos_id=v))(None, rkey(0))
  assert np.asarray(res.tokens).max() < v and np.asarray(res.tokens).min() >= 0


# --------------------------------------------------------------------------- 4. prompts
def test_prompt_and_infill_fixed_and_reveals_monotone():
  v, ell, b, length, num_steps = 20, 3, 8, 10, 16
  codec = PrimeCodec.create(v, ell)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, v, size=(b, length)).astype(np.int32)
  pmask = rng.random((b, length)) < 0.4
  pmask[:, 0] = True                                   # a prefix and scattered infill slots
  res = run_ancestral(random_apply_fn(codec), codec, rkey(2), batch_size=b,
                      seq_len=length, num_steps=num_steps, prompt=jnp.asarray(prompt),
                      prompt_mask=jnp.asarray(pmask), return_trajectory=True,
                      temperature=0.7, top_k=5, top_p=0.9)
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < v             # validity with filters, ell = 3
  np.testing.assert_array_equal(codec.encode(tok), np.asarray(res.digits))
  np.testing.assert_array_equal(tok[pmask], prompt[pmask])
  traj = np.asarray(res.trajectory)
  assert traj.shape == (num_steps + 1, b, length, ell)
  enc = codec.encode(prompt)
  for k in range(num_steps + 1):
    np.testing.assert_array_equal(traj[k][pmask], enc[pmask])
  assert np.all(traj[0][~pmask] == codec.mask_id)
  states = np.concatenate([traj, np.asarray(res.digits)[None]], 0)
  for k in range(num_steps + 1):
    seen = states[k] != codec.mask_id
    np.testing.assert_array_equal(states[k + 1][seen], states[k][seen])
  assert not np.any(states[-1] == codec.mask_id)


def test_grouped_reveal_above_chunk_point():
  """chunk_point = c: while t > c a token's digits are revealed together, below it one by
  one.  c = 0 never shows a partly revealed token; c = 1 (Prime) does."""
  v, ell, b, length, num_steps = 20, 3, 8, 12, 16
  codec = PrimeCodec.create(v, ell)
  ts = np.asarray(sampling.ancestral.time_grid(num_steps, EPS))
  early = ts[:num_steps] > 0.5
  for c, expect_partial_early in ((0.0, False), (0.5, False), (1.0, True)):
    res = run_ancestral(random_apply_fn(codec), codec, rkey(3), batch_size=b, seq_len=length,
                        num_steps=num_steps, return_trajectory=True, chunk_point=c)
    traj = np.asarray(res.trajectory)[1:]            # states after steps at t = ts[k]
    m = traj == codec.mask_id
    partial = m.any(-1) & ~m.all(-1)                 # [T, B, L]
    assert partial[early].any() == expect_partial_early, c
    assert partial[~early].any() == (c > 0)          # below c digits go one by one again
    assert not np.any(np.asarray(res.digits) == codec.mask_id)


def test_ar_prompt_fixed():
  v, length, plen = 5, 6, 2
  def ar_fn(params, inputs, t, *, train=False, rng=None):
    return jnp.zeros(inputs.shape[:2] + (v,))
  prompt = jnp.array([3, 1], jnp.int32)
  res = jax.jit(functools.partial(sampling.ar_sample, ar_fn, vocab_size=v, batch_size=16,
                                  seq_len=length, bos_id=v, prompt=prompt,
                                  prompt_len=plen))(None, rkey(0))
  tok = np.asarray(res.tokens)
  assert np.all(tok[:, :plen] == np.array([3, 1]))
  assert int(res.nfe) == length - plen and res.digits.shape == (16, length, 1)


# --------------------------------------------------------------------------- 5. NFE / idle
def nfe_idle_runs(ell, vocab, length, num_steps, runs=800):
  codec = PrimeCodec.create(vocab, ell)
  fn = functools.partial(sampling.ancestral_sample, dummy_apply_fn(vocab), None, codec=codec,
                         schedule=linear(), batch_size=1, seq_len=length, num_steps=num_steps,
                         eps=EPS)
  res = jax.jit(jax.vmap(lambda k: fn(k)))(jax.random.split(rkey(ell), runs))
  return np.asarray(res.nfe, np.float64), np.asarray(res.idle_steps, np.float64)


def test_nfe_and_idle_accounting():
  length, num_steps = 16, 64
  nfe1, idle1 = nfe_idle_runs(1, 8, length, num_steps)
  nfe2, idle2 = nfe_idle_runs(2, 16, length, num_steps)      # b = 4
  for nfe, idle, n in ((nfe1, idle1, length), (nfe2, idle2, 2 * length)):
    assert nfe.max() <= num_steps + 1 and nfe.min() >= 1
    se = nfe.std() / np.sqrt(len(nfe)) + 1e-9
    assert abs(nfe.mean() - sampling.expected_nfe(n, num_steps)) < 4 * se
    # which is MDLM's T (1 - (1-1/T)^N) up to O(N eps)
    mdlm = num_steps * (1 - (1 - 1 / num_steps) ** n)
    assert abs(nfe.mean() - mdlm) < 4 * se + 1e-3
    frac = idle / num_steps
    se_f = frac.std() / np.sqrt(len(frac))
    assert abs(frac.mean() - sampling.expected_idle_fraction(n, num_steps)) < 4 * se_f
    # with a cache, every idle step except possibly the last saves one call
    assert np.all(nfe + idle >= num_steps) and np.all(nfe + idle <= num_steps + 1)
  assert idle2.mean() < idle1.mean() - 5 * (idle1.std() + idle2.std()) / np.sqrt(len(idle1))


# --------------------------------------------------------------------------- 6. caching
def test_cache_does_not_change_samples():
  ell, vocab = 3, 20
  codec = PrimeCodec.create(vocab, ell)
  kw = dict(batch_size=2, seq_len=4, num_steps=48, top_p=0.95, temperature=0.9)
  f = random_apply_fn(codec, seed=ell)
  a = run_ancestral(f, codec, rkey(9), use_cache=True, **kw)
  b = run_ancestral(f, codec, rkey(9), use_cache=False, return_trajectory=True, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.digits), np.asarray(b.digits))
  assert int(a.idle_steps) == int(b.idle_steps) > 0
  # without the cache: one call per iteration (T steps + noise removal) that starts
  # with something masked; with it, one per distinct incomplete state.
  traj = np.asarray(b.trajectory)
  incomplete = np.any(traj == codec.mask_id, axis=(1, 2, 3))
  assert int(b.nfe) == incomplete.sum()
  distinct = 1 + sum(incomplete[k] and not np.array_equal(traj[k], traj[k - 1])
                     for k in range(1, len(traj)))
  assert int(a.nfe) == distinct < int(b.nfe)
  c = run_ancestral(f, codec, rkey(9), time_conditioning=True, **kw)
  assert int(c.nfe) == int(b.nfe)
  np.testing.assert_array_equal(np.asarray(c.tokens), np.asarray(a.tokens))


# --------------------------------------------------------------------------- 7. AR
def test_ar_sampler_markov_chain():
  v, length = 5, 3
  rng = np.random.default_rng(4)
  p0 = rng.dirichlet(np.ones(v))
  trans = rng.dirichlet(np.ones(v) * 0.5, size=v)
  table = jnp.asarray(np.log(np.concatenate([trans, p0[None]], 0)), jnp.float32)  # row v = BOS

  def ar_fn(params, inputs, t, *, train=False, rng=None):
    return table[inputs[..., 0]]                       # causal: logits_i depend on input_i only

  n = 20000
  res = jax.jit(functools.partial(sampling.ar_sample, ar_fn, vocab_size=v, batch_size=n,
                                  seq_len=length, bos_id=v))(None, rkey(1))
  tok = np.asarray(res.tokens)
  assert int(res.nfe) == length and res.num_steps == length
  assert chi2_pvalue(joint_counts(tok[:, :2], v), p0[:, None] * trans) > P_MIN
  p1 = p0 @ trans
  assert chi2_pvalue(joint_counts(tok[:, 1:], v), p1[:, None] * trans) > P_MIN


# --------------------------------------------------------------------------- 8. filters
def test_top_k_one_is_argmax():
  logits = jax.random.normal(rkey(0), (50, 11))
  f = filters.top_k_filter(logits, 1)
  assert np.all((np.asarray(f) > -1e8).sum(-1) == 1)
  draws = filters.sample_categorical(rkey(1), f)
  np.testing.assert_array_equal(np.asarray(draws), np.argmax(np.asarray(logits), -1))
  f3 = np.asarray(filters.top_k_filter(logits, 3))
  kept = f3 > -1e8
  assert np.all(kept.sum(-1) == 3)
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  assert np.all(np.take_along_axis(kept, top3, -1))
  np.testing.assert_array_equal(np.asarray(filters.top_k_filter(logits, 0)), np.asarray(logits))


def test_top_p_hand_example():
  probs = np.array([0.15, 0.5, 0.05, 0.3])            # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  def kept(p, rule="holtzman"):
    return set(np.flatnonzero(np.asarray(filters.top_p_filter(logits, p, rule)) > -1e8))
  assert kept(0.3) == {1}
  assert kept(0.5 - 1e-3) == {1}
  assert kept(0.7) == {1, 3}
  assert kept(0.9) == {1, 3, 0}
  assert kept(0.97) == {0, 1, 2, 3}
  assert kept(1.0) == {0, 1, 2, 3}
  assert kept(0.7, "mdlm") == {1}                      # MDLM drops the token crossing p
  assert kept(0.3, "mdlm") == {1}                      # but always keeps the top-1
  assert kept(0.9, "mdlm") == {1, 3}


def _top_p_by_sort(logits, p, rule):
  """The nucleus by an explicit descending sort (numpy float64): the oracle."""
  q = np.exp(logits - logits.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  keep = np.zeros(q.shape, bool)
  for r in range(q.shape[0]):
    order = np.argsort(-q[r], kind="stable")
    incl = np.cumsum(q[r, order])
    ks = (incl - q[r, order]) < p if rule == "holtzman" else incl <= p
    ks[0] = True
    keep[r, order[ks]] = True
  return keep


@pytest.mark.parametrize("rule", ["holtzman", "mdlm"])
def test_top_p_threshold_matches_a_sort(rule):
  """The sort-free bisection keeps exactly the tokens a sorted cumulative sum keeps."""
  rng = np.random.default_rng(0)
  for v, scale in ((7, 1.0), (300, 2.0), (4096, 3.0)):
    logits = (rng.standard_normal((16, v)) * scale).astype(np.float32)
    for p in (0.05, 0.3, 0.8, 0.95, 0.999):
      got = np.asarray(filters.top_p_filter(jnp.asarray(logits), p, rule)) > -1e8
      want = _top_p_by_sort(logits.astype(np.float64), p, rule)
      # float32 softmax/sums may differ from float64 only for a token whose cumulative
      # mass is within ~1e-6 of p; allow at most one such boundary token per call.
      assert np.sum(got != want) <= 1, (v, p, rule, np.argwhere(got != want))
      assert np.all(got.sum(-1) >= 1)
  ties = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.2]], jnp.float32))
  kept = np.asarray(filters.top_p_filter(ties, 0.5, rule)) > -1e8
  # equal probabilities are kept or dropped together
  assert kept[0].tolist() == ([True] * 4 if rule == "holtzman" else [True, False, False, False])


def test_filter_order_and_excluded_entries():
  lp = jnp.array([[0.0, -1.0, -1e9, -2.0]])            # entry 2 ruled out (carry-over)
  hot = filters.apply_filters(lp, temperature=1e10)
  assert float(hot[0, 2]) == filters.NEG_INF
  probs = np.asarray(jax.nn.softmax(hot))
  assert probs[0, 2] == 0 and np.allclose(probs[0, [0, 1, 3]], 1 / 3)
  cold = filters.apply_filters(lp, temperature=0.5)
  np.testing.assert_allclose(np.asarray(cold)[0, [0, 1, 3]], [0.0, -2.0, -4.0])
  # temperature before top-p: at tau = 0.5 the top-1 mass is > 0.8, so only it survives
  np.testing.assert_array_equal(
      np.asarray(filters.apply_filters(lp, 0.5, 0, 0.8)) > -1e8, [[True, False, False, False]])
  np.testing.assert_array_equal(
      np.asarray(filters.apply_filters(lp, 1.0, 0, 0.8)) > -1e8, [[True, True, False, False]])
  allout = filters.apply_filters(jnp.full((2, 5), -1e9), 0.7, 2, 0.5)
  assert np.all(np.isfinite(np.asarray(jax.nn.softmax(allout))))


# --------------------------------------------------------------------------- registry / misc
def test_registry_and_result_fields():
  assert sampling.get_sampler("ancestral") is sampling.ancestral_sample
  assert sampling.get_sampler("ar") is sampling.ar_sample
  with pytest.raises(ValueError):
    sampling.get_sampler("nope")
  codec = PrimeCodec.create(9, 2)
  res = run_ancestral(dummy_apply_fn(9), codec, rkey(0), batch_size=3, seq_len=5,
                      num_steps=7)
  assert res.num_steps == 7 and res.trajectory is None
  assert res.tokens.dtype == jnp.int32 and res.digits.shape == (3, 5, 2)
  assert res.nfe.shape == () and res.idle_steps.shape == ()
  np.testing.assert_allclose(np.asarray(sampling.time_grid(4, EPS)),
                             [1.0, 0.75 + EPS / 4, 0.5 + EPS / 2, 0.25 + 3 * EPS / 4, EPS],
                             rtol=1e-6)
  assert sampling.expected_idle_fraction(1024, 1024) == pytest.approx(0.3677, abs=1e-4)


def test_default_threefry_keys_and_static_argnames_jit():
  codec = PrimeCodec.create(9, 2)
  f = random_apply_fn(codec)
  fn = jax.jit(sampling.ancestral_sample, static_argnums=(0,),
               static_argnames=("codec", "schedule", "batch_size", "seq_len", "num_steps"))
  sched = linear()
  # a raw uint32 key of the default (threefry) implementation
  res = fn(f, None, jax.random.PRNGKey(0), codec=codec, schedule=sched, batch_size=4,
           seq_len=6, num_steps=8)
  res2 = fn(f, None, jax.random.PRNGKey(0), codec=codec, schedule=sched, batch_size=4,
            seq_len=6, num_steps=8)
  np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(res2.tokens))
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < 9


# ----------------------------------------------------------------------------- confidence
def _random_apply(vocab, seed=0):
  table = jax.random.normal(jax.random.key(seed), (vocab,)) * 2.0

  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train
    b, l, _ = digits.shape
    noise = jax.random.normal(rng, (b, l, vocab)) if rng is not None else 0.0
    return jnp.broadcast_to(table, (b, l, vocab)) + noise
  return apply_fn


@pytest.mark.parametrize("ell,conf", [(1, "prob"), (3, "margin"), (2, "neg_entropy")])
def test_confidence_sampler_valid_and_keeps_prompt(ell, conf):
  from mdm_jax.sampling import confidence_sample
  from mdm_jax.diffusion.schedules import get_schedule
  import ml_collections
  vocab, length = 20, 12
  codec = PrimeCodec.create(vocab, ell)
  sched = get_schedule(ml_collections.ConfigDict({"name": "linear"}))
  prompt = jnp.full((length,), -1, jnp.int32).at[0].set(5).at[7].set(11)
  fn = jax.jit(lambda k: confidence_sample(
      _random_apply(vocab), None, k, codec=codec, schedule=sched, batch_size=16,
      seq_len=length, num_steps=5, prompt=prompt, confidence=conf))
  res = fn(jax.random.key(0))
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < vocab                 # no mask, no invalid id
  assert np.all(tok[:, 0] == 5) and np.all(tok[:, 7] == 11)   # prompt fixed
  assert int(res.nfe) == 5                                     # one call per step


def test_confidence_sampler_reveals_most_confident_first():
  """With one step revealing half the tokens, the revealed ones are the confident ones."""
  from mdm_jax.sampling import confidence_sample
  from mdm_jax.diffusion.schedules import get_schedule
  import ml_collections
  vocab, length = 10, 8
  codec = PrimeCodec.create(vocab, 1)
  sched = get_schedule(ml_collections.ConfigDict({"name": "linear"}))
  # Positions 0..3 are near-deterministic (token 3), positions 4..7 uniform.
  sharp = jnp.where(jnp.arange(vocab) == 3, 20.0, 0.0)

  sharp7 = jnp.where(jnp.arange(vocab) == 7, 20.0, 0.0)

  def apply_fn(params, digits, t, *, train=False, rng=None):
    b = digits.shape[0]
    # Positions 4..7 become sure of token 7 only once positions 0..3 are revealed.
    first_done = jnp.all(digits[:, :4, 0] != codec.mask_id, axis=1)        # [B]
    late = jnp.where(first_done[:, None], sharp7[None], 0.0)               # [B, V]
    rows = jnp.where((jnp.arange(length) < 4)[None, :, None], sharp[None, None],
                     late[:, None, :])
    return jnp.broadcast_to(rows, (b, length, vocab))

  def probe(k):
    # Two steps: after the first, round(8 * (1 - alpha(0.5))) = 4 tokens stay masked.
    return confidence_sample(apply_fn, None, k, codec=codec, schedule=sched, batch_size=4,
                             seq_len=length, num_steps=2, eps=0.0)
  res = jax.jit(probe)(jax.random.key(1))
  tok = np.asarray(res.tokens)
  assert np.all(tok[:, :4] == 3)
  assert np.all(tok[:, 4:] == 7)      # step 1 revealed exactly the four confident positions
