"""Mathematical invariants of the objectives.

The decisive test: with a Bayes-optimal (oracle) decoder on sources of known
entropy, the reported bound is >= the true entropy (minus Monte Carlo error),
for MDM and for Prime, while the published joint objective falls below it.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mdm_jax.diffusion import elbo as losses, prime

from mdm_jax.diffusion import autoregressive as ar_lib
from mdm_jax.networks import build_model
from mdm_jax.diffusion.schedules import get_schedule

LIN = get_schedule(ml_collections.ConfigDict({"name": "linear"}))
COS = get_schedule(ml_collections.ConfigDict({"name": "cosine"}))


def _tiny_model(vocab, ell, base, causal=False):
  c = ml_collections.ConfigDict(dict(
      name="dit", num_layers=2, d_model=32, num_heads=2, mlp_ratio=2, cond_dim=16, dropout=0.0,
      time_conditioning=True, tie_embeddings=False, dtype="float32", param_dtype="float32",
      attention_impl="xla", scan_layers=True, remat="none"))
  model = build_model(c, vocab_size=vocab, ell=ell, base=base, causal=causal)

  def apply_fn(params, digits, t, *, train=False, rng=None):
    return model.apply({"params": params}, digits, t, train=train)
  return model, apply_fn


def _init(model, length, ell):
  import flax.linen as nn

  @jax.jit          # one compiled program instead of op-by-op init (10x faster on CPU)
  def init(key):
    v = model.init(key, jnp.zeros((2, length, ell), jnp.int32), jnp.ones((2,)))
    params = nn.unbox(v)["params"]
    # Perturb the zero-initialised head/adaLN so predictions are not uniform.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)
  return init(jax.random.key(0))


@pytest.mark.parametrize("form", ["marginal", "joint"])
@pytest.mark.parametrize("schedule", [LIN, COS])
def test_prime_ell1_equals_mdm_elbo(form, schedule):
  vocab, length = 13, 16
  codec = prime.PrimeCodec.create(vocab, 1)
  model, apply_fn = _tiny_model(vocab, 1, codec.base)
  params = _init(model, length, 1)
  tokens = jax.random.randint(jax.random.key(2), (8, length), 0, vocab)
  cfg = losses.DiffusionLossConfig(form=form, carry_over=True, t_min=1e-3)
  ours_fn = jax.jit(lambda k: losses.diffusion_loss(
      apply_fn, params, tokens, k, codec=codec, schedule=schedule, cfg=cfg, train=False)[0])
  ref_fn = jax.jit(lambda k: losses.mdm_elbo_reference(
      apply_fn, params, tokens, k, schedule=schedule, vocab_size=vocab, t_min=1e-3))
  for seed in range(3):
    key = jax.random.key(seed)
    ours, ref = ours_fn(key), ref_fn(key)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(ours - ref))) < 1e-4


def test_marginal_and_joint_agree_when_at_most_one_digit_masked():
  # With a single masked digit per token, the digit marginal IS the joint.
  codec = prime.PrimeCodec.create(30, 3)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 30, (4, 6))
  digits = codec.encode(tokens)
  slot = rng.integers(0, 3, (4, 6))
  noisy = np.where(np.arange(3) == slot[..., None], codec.mask_id, digits)
  logits = jnp.asarray(rng.normal(size=(4, 6, 30)), jnp.float32)
  m = losses.prime_token_nll(logits, jnp.asarray(noisy), jnp.asarray(digits), codec, "marginal")
  j = losses.prime_token_nll(logits, jnp.asarray(noisy), jnp.asarray(digits), codec, "joint")
  np.testing.assert_allclose(np.asarray(m), np.asarray(j), rtol=1e-5)


@pytest.mark.parametrize("ell", [1, 2, 3])
def test_loss_and_grads_finite_at_extreme_times(ell):
  vocab, length = 27, 8
  codec = prime.PrimeCodec.create(vocab, ell)
  model, apply_fn = _tiny_model(vocab, ell, codec.base)
  params = _init(model, length, ell)
  tokens = jax.random.randint(jax.random.key(0), (4, length), 0, vocab)
  for form in ("marginal", "joint"):
    cfg = losses.DiffusionLossConfig(form=form, t_min=1e-3)

    def total(p, t):
      return jnp.sum(losses.diffusion_loss(apply_fn, p, tokens, jax.random.key(1), codec=codec,
                                           schedule=LIN, cfg=cfg, t=jnp.full((4,), t))[0])
    fn = jax.jit(jax.value_and_grad(total))
    for t in (1e-6, 1e-3, 0.5, 1.0):
      loss, g = fn(params, t)
      assert np.isfinite(float(loss)), (form, t)
      assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g)), (form, t)


def test_stratified_times_cover_unit_interval():
  t = np.sort(np.asarray(losses.sample_times(jax.random.key(0), 64, 1e-3, True)))
  r = (t - 1e-3) / (1 - 1e-3)
  strata = np.floor(r * 64).astype(int)
  assert sorted(strata.tolist()) == list(range(64))


# ----------------------------------------------------------------------------- entropy
def _oracle_apply(codec, seqs, probs):
  """Bayes-optimal decoder for a distribution over whole sequences (enumerated).

  Returns logits log p(x_i = v | observed digits of the whole sequence), i.e. the
  exact per-position posterior marginals.
  """
  seqs = jnp.asarray(seqs)                        # [S, L]
  logp = jnp.log(jnp.asarray(probs, jnp.float32))  # [S]
  sd = jnp.asarray(codec.encode(np.asarray(seqs)))  # [S, L, ell]
  onehot = jax.nn.one_hot(seqs, codec.vocab_size)  # [S, L, V]

  def apply_fn(params, noisy, t, *, train=False, rng=None):
    del params, t, train, rng
    ok = (noisy[:, None] == codec.mask_id) | (noisy[:, None] == sd[None])   # [B, S, L, ell]
    cons = jnp.all(ok, axis=(2, 3))                                          # [B, S]
    w = jnp.where(cons, logp[None], -jnp.inf)
    w = w - jax.scipy.special.logsumexp(w, axis=1, keepdims=True)
    post = jnp.einsum("bs,slv->blv", jnp.exp(w), onehot)
    return jnp.log(jnp.maximum(post, 1e-30))
  return apply_fn


def _mc_bound(apply_fn, codec, sampler_seqs, probs, form, n=40000, seed=0, carry=True):
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(probs), size=n, p=np.asarray(probs) / np.sum(probs))
  tokens = jnp.asarray(np.asarray(sampler_seqs)[idx])
  cfg = losses.DiffusionLossConfig(form=form, carry_over=carry, t_min=1e-3)
  loss, _ = jax.jit(lambda k: losses.diffusion_loss(
      apply_fn, None, tokens, k, codec=codec, schedule=LIN, cfg=cfg, train=False))(
          jax.random.key(seed))
  loss = np.asarray(loss, np.float64)
  return loss.mean(), loss.std() / np.sqrt(n)


def test_bound_vs_entropy_correlated_digits():
  """p(00) = p(11) = 1/2 (tokens 0 and 3, V=4, ell=2, b=2): H = ln 2."""
  codec = prime.PrimeCodec.create(4, 2)
  seqs, probs = [[0], [3]], [0.5, 0.5]
  h = np.log(2)
  apply_fn = _oracle_apply(codec, seqs, probs)
  m, se = _mc_bound(apply_fn, codec, seqs, probs, "marginal")
  assert m >= h - 4 * se
  assert abs(m - h) < 4 * se + 0.01          # tight at the optimum
  j, se_j = _mc_bound(apply_fn, codec, seqs, probs, "joint")
  assert j < h - 0.25                         # ~0.347: the published form is not a bound
  assert abs(j - 0.5 * h) < 4 * se_j + 0.01


def _markov_source(v=4, length=3, seed=0):
  rng = np.random.default_rng(seed)
  p0 = rng.dirichlet(np.ones(v))
  trans = rng.dirichlet(np.ones(v) * 0.3, size=v)
  seqs = np.array(list(itertools.product(range(v), repeat=length)))
  probs = p0[seqs[:, 0]] * np.prod([trans[seqs[:, i], seqs[:, i + 1]]
                                    for i in range(length - 1)], axis=0)
  h = -(probs * np.log(probs)).sum()
  return seqs, probs, h


@pytest.mark.parametrize("ell", [1, 2])
def test_bound_vs_entropy_markov_chain(ell):
  """A 3-token Markov chain over V=4 (ell=2 -> b=2): exact H by enumeration."""
  seqs, probs, h = _markov_source()
  codec = prime.PrimeCodec.create(4, ell)
  apply_fn = _oracle_apply(codec, seqs, probs)
  m, se = _mc_bound(apply_fn, codec, seqs, probs, "marginal", seed=1)
  assert m >= h - 4 * se, (m, h, se)
  assert abs(m - h) < 4 * se + 0.02, (m, h, se)
  if ell == 2:
    j, se_j = _mc_bound(apply_fn, codec, seqs, probs, "joint", seed=1)
    assert j < h - 4 * se_j, (j, h)      # joint undercuts the entropy


def test_imperfect_model_bound_exceeds_entropy():
  """A wrong model: bound >= cross-entropy >= entropy, for MDM and Prime."""
  seqs, probs, h = _markov_source(seed=3)
  wrong = np.random.default_rng(7).dirichlet(np.ones(len(probs)))
  for ell in (1, 2):
    codec = prime.PrimeCodec.create(4, ell)
    apply_fn = _oracle_apply(codec, seqs, wrong)
    m, se = _mc_bound(apply_fn, codec, seqs, probs, "marginal", seed=2)
    cross_entropy = -(probs * np.log(wrong)).sum()
    assert m >= cross_entropy - 4 * se > h


def test_no_carry_over_marginal_still_a_bound():
  codec = prime.PrimeCodec.create(4, 2)
  seqs, probs = [[0], [3]], [0.5, 0.5]
  apply_fn = _oracle_apply(codec, seqs, probs)
  m, se = _mc_bound(apply_fn, codec, seqs, probs, "marginal", carry=False)
  assert m >= np.log(2) - 4 * se


def test_eval_bound_averages_time_samples():
  codec = prime.PrimeCodec.create(4, 2)
  seqs, probs = [[0], [3]], [0.5, 0.5]
  apply_fn = _oracle_apply(codec, seqs, probs)
  tokens = jnp.asarray(np.array([[0], [3]] * 2000))
  cfg = losses.DiffusionLossConfig(form="joint", t_min=1e-3)   # eval always uses marginal
  b = losses.diffusion_bound(apply_fn, None, tokens, jax.random.key(0), codec=codec,
                             schedule=LIN, cfg=cfg, num_time_samples=4)
  b = np.asarray(b, np.float64)
  se = b.std() / np.sqrt(len(b))
  assert b.mean() >= np.log(2) - 4 * se
  assert abs(b.mean() - np.log(2)) < 4 * se + 0.005


# ----------------------------------------------------------------------------- AR
def test_ar_loss_exact_and_causal():
  vocab, length = 11, 10
  model, apply_fn = _tiny_model(vocab, 1, vocab, causal=True)
  params = _init(model, length, 1)
  tokens = jax.random.randint(jax.random.key(0), (3, length), 0, vocab)
  loss, _ = ar_lib.ar_loss(apply_fn, params, tokens, jax.random.key(0), bos_id=vocab,
                           train=False)
  # Reference: score each prefix separately, with random junk after it (one compiled
  # shape): a causal model's prediction at position i must not depend on the junk.
  manual = np.zeros(3)
  logits_at = jax.jit(lambda inp, i: jnp.take(apply_fn(params, inp[..., None], jnp.zeros(3)),
                                              i, axis=1))
  junk = jax.random.randint(jax.random.key(9), (3, length), 0, vocab)
  for i in range(length):
    inp = jnp.concatenate([jnp.full((3, 1), vocab), tokens[:, :i], junk[:, : length - 1 - i]], 1)
    lg = logits_at(inp, i)
    manual += np.asarray(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(
        lg, tokens[:, i:i + 1], -1)[:, 0])
  np.testing.assert_allclose(np.asarray(loss), manual, rtol=1e-4)


def _prime2_setup(vocab=16, length=12, ell=2, batch=6):
  """A perturbed tiny Prime model (l = 2) and a batch of random tokens."""
  codec = prime.PrimeCodec.create(vocab, ell)
  model, apply_fn = _tiny_model(vocab, ell, codec.base)
  params = _init(model, length, ell)
  tokens = jax.random.randint(jax.random.key(3), (batch, length), 0, vocab)
  return codec, apply_fn, params, tokens, length


def test_flat_weighting_is_mean_masked_ce_and_never_reaches_the_bound():
  codec, apply_fn, params, tokens, length = _prime2_setup()
  t = jnp.linspace(0.05, 0.95, 6)
  key = jax.random.key(4)
  elbo = losses.DiffusionLossConfig(t_min=1e-3)
  flat = losses.DiffusionLossConfig(t_min=1e-3, weighting="flat")
  # Same key and times: same mask, so the per-token NLLs agree and only the weights differ.
  le = losses.diffusion_loss(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=elbo,
                             train=False, t=t)[0]
  lf = losses.diffusion_loss(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=flat,
                             train=False, t=t)[0]
  recon = losses.reconstruction_bound(LIN, 1e-3, length, codec)
  nll_sum = (le - recon) / (LIN.weight(t) * (1 - 1e-3))
  noisy = prime.mask_digits(jax.random.split(key, 3)[1], codec.encode(tokens), LIN.mask_prob(t),
                            codec.mask_id)
  n = jnp.sum(jnp.any(noisy == codec.mask_id, -1), -1)
  np.testing.assert_allclose(np.asarray(lf), np.asarray(nll_sum * length / jnp.maximum(n, 1)),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(lf), np.asarray(le))
  # The evaluation bound ignores the training weighting.
  be = losses.diffusion_bound(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=elbo)
  bf = losses.diffusion_bound(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=flat)
  np.testing.assert_array_equal(np.asarray(be), np.asarray(bf))
  with pytest.raises(ValueError, match="loss_weighting"):
    losses.DiffusionLossConfig(weighting="uniform")


def test_chunk_point_groups_noise_only_above_it_and_eval_ignores_it():
  codec, apply_fn, params, tokens, length = _prime2_setup()
  t = jnp.asarray([0.2, 0.4, 0.6, 0.7, 0.8, 0.9])
  key = jax.random.key(4)
  ind = losses.DiffusionLossConfig(t_min=1e-3)
  grp = losses.DiffusionLossConfig(t_min=1e-3, chunk_point=0.5)
  li = losses.diffusion_loss(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=ind,
                             train=False, t=t)[0]
  lg = losses.diffusion_loss(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=grp,
                             train=False, t=t)[0]
  # Same key: rows with t <= 0.5 see the same masks, rows above do not.
  np.testing.assert_allclose(np.asarray(lg[:2]), np.asarray(li[:2]), rtol=1e-6)
  assert not np.allclose(np.asarray(lg[2:]), np.asarray(li[2:]))
  # A whole-token mask: the marginal loss of a grouped row equals the one computed by hand
  # from the all-or-nothing mask the same uniforms give.
  u = jax.random.uniform(jax.random.split(key, 3)[1], (6, length, codec.ell))
  noisy = jnp.where(u[..., :1] < LIN.mask_prob(t)[:, None, None], codec.mask_id,
                    codec.encode(tokens))
  logits = apply_fn(params, noisy, t, train=False, rng=None)
  nll = losses.prime_token_nll(logits, noisy, codec.encode(tokens), codec)
  want = LIN.weight(t) * (1 - 1e-3) * nll.sum(-1) + losses.reconstruction_bound(
      LIN, 1e-3, length, codec)
  np.testing.assert_allclose(np.asarray(lg[2:]), np.asarray(want[2:]), rtol=1e-5)
  be = losses.diffusion_bound(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=ind)
  bg = losses.diffusion_bound(apply_fn, params, tokens, key, codec=codec, schedule=LIN, cfg=grp)
  np.testing.assert_array_equal(np.asarray(be), np.asarray(bg))
  with pytest.raises(ValueError, match="chunk_point"):
    losses.DiffusionLossConfig(chunk_point=1.5)


@pytest.mark.parametrize("ell,permute,carry", [(1, False, True), (2, False, True),
                                                (2, True, True), (3, True, True),
                                                (2, False, False), (3, False, False)])
def test_digit_marginal_nll_is_the_enumerated_marginal(ell, permute, carry):
  """The gather form of the marginal loss equals -log of the slot marginals computed by
  enumerating every token (with and without carry-over; 29 tokens leave invalid codes),
  and its gradient equals that of the normalise-then-sum-out form it replaced."""
  vocab = 29
  codec = prime.PrimeCodec.create(vocab, ell, permute=permute, perm_seed=3)
  rng = np.random.default_rng(ell)
  tokens = rng.integers(0, vocab, (3, 5))
  digits = codec.encode(tokens)
  hide = rng.random(digits.shape) < 0.5
  hide[0, 0] = True                                  # at least one masked digit
  noisy = np.where(hide, codec.mask_id, digits)
  logits = rng.normal(size=(3, 5, vocab)).astype(np.float32) * 2
  got = np.asarray(losses.digit_marginal_nll(jnp.asarray(logits),
                                             jnp.asarray(noisy) if carry else None,
                                             jnp.asarray(digits), codec))
  all_digits = codec.encode(np.arange(vocab))       # [V, ell]
  want = np.zeros(digits.shape)
  for i in range(3):
    for p in range(5):
      ok = np.ones(vocab, bool)
      if carry:
        for j in range(ell):
          if noisy[i, p, j] != codec.mask_id:
            ok &= all_digits[:, j] == noisy[i, p, j]
      w = np.where(ok, np.exp(logits[i, p].astype(np.float64)), 0.0)
      for j in range(ell):
        want[i, p, j] = -np.log(w[all_digits[:, j] == digits[i, p, j]].sum() / w.sum())
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

  def old(lg):
    logp = codec.restricted_code_logprobs(lg, jnp.asarray(noisy) if carry else None)
    marg = codec.digit_log_marginals(logp)
    return -jnp.take_along_axis(marg, jnp.asarray(digits)[..., None], axis=-1)[..., 0]

  def new(lg):
    return losses.digit_marginal_nll(lg, jnp.asarray(noisy) if carry else None,
                                     jnp.asarray(digits), codec)

  weights = jnp.asarray(rng.normal(size=digits.shape), jnp.float32) * jnp.asarray(hide)
  g_old = jax.grad(lambda lg: jnp.sum(old(lg) * weights))(jnp.asarray(logits))
  g_new = jax.grad(lambda lg: jnp.sum(new(lg) * weights))(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_old), rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(g_new))) > 1e-3      # the gradient is not trivially zero
