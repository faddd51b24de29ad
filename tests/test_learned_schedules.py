"""The learned schedule families genmd4, learned_tilt and plackett_luce.

Each: reduces to the MDM / Prime ELBO at its neutral setting, its gradient estimator
agrees with finite differences of the exactly enumerated objective, the bound is tight
for the exact denoiser, the sampler follows the schedule's law, bad combinations fail
at config time, and it trains from the CLI.  See mdm_jax/diffusion/schedules/ and
docs/method/algorithms.md §2.5, §2.7.
"""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion import elbo as losses, prime
from mdm_jax.diffusion.schedules import get_schedule
from mdm_jax.diffusion.schedules.genmd4 import SOFTPLUS_INV_ONE
from mdm_jax.sampling import ancestral_sample
from tests.test_losses import _markov_source, _oracle_apply
from tests.test_multivariate import _mixing_model, _pattern_nll, _table_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = losses.DiffusionLossConfig(t_min=1e-3)


def _sched(name, codec=None, **kw):
  s = get_schedule(ml_collections.ConfigDict({"name": name, "grad_scale": 1.0, **kw}))
  return s.for_codec(codec) if codec is not None else s


def _genmd4_params(w):
  """params holding exponents w [ell, b] (softplus^-1)."""
  w = jnp.asarray(w, jnp.float32)
  return {"schedule": {"theta": jnp.log(jnp.expm1(w))}}


def _tilt_params(theta):
  return {"schedule": {"theta": jnp.asarray(theta, jnp.float32)}}


def _pl_params(log_w):
  return {"schedule": {"log_w": jnp.asarray(log_w, jnp.float32)}}


# ----------------------------------------------------------------- neutral settings
def test_neutral_settings_are_the_mdm_and_prime_elbo():
  """w = 1 (genmd4 at init), kappa = 0 (learned_tilt at init) and equal exponents
  (plackett_luce, evaluation) give the linear-schedule ELBO draw for draw."""
  vocab, length = 30, 8
  tokens = jax.random.randint(jax.random.key(2), (6, length), 0, vocab)
  for ell in (1, 2):
    codec = prime.PrimeCodec.create(vocab, ell)
    apply_fn = _mixing_model(vocab, ell, codec.base)
    g = _sched("genmd4", codec)
    params_g = {"schedule": {"theta": jnp.full((ell, codec.base), SOFTPLUS_INV_ONE)}}
    cases = [(g, params_g), (_sched("plackett_luce", codec), _pl_params(jnp.full((length,), .3)))]
    if ell > 1:
      cases.append((_sched("learned_tilt", codec), _tilt_params(jnp.zeros((ell,)))))

    @jax.jit
    def run(key):
      ref = losses.diffusion_loss(apply_fn, None, tokens, key, codec=codec,
                                  schedule=_sched("linear"), cfg=CFG, train=False)[0]
      return ref, [losses.diffusion_loss(apply_fn, p, tokens, key, codec=codec, schedule=s,
                                         cfg=CFG, train=False)[0] for s, p in cases]

    ref, outs = run(jax.random.key(ell))
    for out in outs:
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
  # The per-element GenMD4 cost is w (cross-entropy) / t when w is constant and 0 for p = delta.
  codec = prime.PrimeCodec.create(5, 1)
  clean = jnp.array([[[1], [3]]])
  noisy = jnp.full_like(clean, codec.mask_id)
  logits = jax.random.normal(jax.random.key(0), (1, 2, 5))
  t = jnp.array([0.25])
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), clean, -1).sum()
  got = losses.value_dependent_terms(logits, noisy, clean, jnp.full((1, 5), 2.0), t, codec)
  np.testing.assert_allclose(float(got[0]), float(2.0 * ce / 0.25), rtol=1e-5)
  delta = jnp.where(jax.nn.one_hot(clean[..., 0], 5) > 0, 0.0, -1e4)
  w = jnp.array([[0.3, 1.0, 2.0, 4.0, 0.7]])
  assert abs(float(losses.value_dependent_terms(delta, noisy, clean, w, t, codec)[0])) < 1e-4


# ----------------------------------------------------------------- gradients
def _fd(fun, theta, h=1e-2):
  theta = np.asarray(theta, np.float32)
  out = np.zeros(theta.shape)
  for idx in np.ndindex(theta.shape):
    e = np.zeros(theta.shape, np.float32)
    e[idx] = h
    out[idx] = (float(fun(jnp.asarray(theta + e))) - float(fun(jnp.asarray(theta - e)))) / (2 * h)
  return out


def _estimates(apply_fn, codec, schedule, make_params, theta, tokens, t_rows, chunks=16):
  """Mean and standard error of the loss value and of its gradient over ``chunks`` keys."""
  toks = jnp.broadcast_to(tokens, (t_rows.shape[0], tokens.shape[1]))

  def one(key):
    return jax.value_and_grad(lambda th: jnp.mean(losses.diffusion_loss(
        apply_fn, make_params(th), toks, key, codec=codec, schedule=schedule, cfg=CFG,
        train=True, t=t_rows)[0]))(theta)

  vals, grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(3), chunks))
  grads = np.asarray(grads)
  return float(np.mean(vals)), grads.mean(0), grads.std(0) / np.sqrt(chunks)


def _all_patterns(codec, tokens):
  """Every mask pattern of a [1, L] sequence's digits [P, L, ell] and the noisy inputs."""
  digits = codec.encode(tokens)[0]
  n = digits.size
  pats = jnp.array(list(itertools.product([0, 1], repeat=n)), bool).reshape(
      (-1,) + digits.shape)
  return pats, jnp.where(pats, codec.mask_id, digits[None]).astype(jnp.int32), digits


def test_genmd4_rloo_gradient_matches_finite_differences():
  codec, apply_fn, tokens = _table_problem()                 # L = 3, V = 3, ell = 1
  sched = _sched("genmd4", codec)
  theta = jnp.log(jnp.expm1(jnp.array([[0.6, 1.8, 1.1]], jnp.float32)))
  make = lambda th: {"schedule": {"theta": th}}
  ts = np.array([0.2, 0.5, 0.8], np.float32)
  t_rows = jnp.repeat(jnp.asarray(ts), 64)
  pats, noisy, digits = _all_patterns(codec, tokens)
  logits = apply_fn(None, noisy, None)
  clean = jnp.broadcast_to(digits, noisy.shape)

  def exact(th):
    p = make(th)
    pm = sched.value_mask_prob(p, jnp.asarray(ts), digits[None].repeat(3, 0))   # [M, L, 1]
    q = jnp.prod(jnp.where(pats[None], pm[:, None], 1.0 - pm[:, None]), axis=(2, 3))  # [M, P]
    f = jnp.stack([losses.value_dependent_terms(logits, noisy, clean, sched.exponents(p),
                                                jnp.full((pats.shape[0],), t), codec)
                   for t in ts])                                                 # [M, P]
    return (jnp.mean(jnp.sum(q * f, -1)) * (1.0 - CFG.t_min)
            + sched.reconstruction(p, CFG.t_min, digits[None])[0])

  value, mean, se = _estimates(apply_fn, codec, sched, make, theta, tokens, t_rows)
  fd = _fd(jax.jit(exact), theta)
  np.testing.assert_allclose(value, float(exact(theta)), rtol=0.03)
  assert np.all(np.abs(mean - fd) < 4 * se + 3e-3), (mean, fd, se)
  assert np.max(np.abs(fd)) > 0.05, fd                      # the objective does depend on w


def test_learned_tilt_rloo_gradient_matches_finite_differences():
  vocab, ell = 4, 2                                          # b = 2: 2 tokens -> 4 digits
  codec = prime.PrimeCodec.create(vocab, ell)
  apply_fn = _mixing_model(vocab, ell, codec.base, seed=3)
  tokens = jnp.array([[3, 1]], jnp.int32)
  sched = _sched("learned_tilt", codec)
  theta = jnp.array([0.5, -0.2], jnp.float32)
  ts = np.array([0.2, 0.5, 0.8], np.float32)
  t_rows = jnp.repeat(jnp.asarray(ts), 64)
  pats, noisy, digits = _all_patterns(codec, tokens)
  clean = jnp.broadcast_to(digits, noisy.shape)
  nll = jnp.where(pats, losses.digit_marginal_nll(apply_fn(None, noisy, None), noisy, clean,
                                                  codec), 0.0)                  # [P, L, ell]

  def exact(th):
    p = _tilt_params(th)
    pm = sched.mask_prob_ij(p, jnp.asarray(ts), 2)                              # [M, L, ell]
    q = jnp.prod(jnp.where(pats[None], pm[:, None], 1.0 - pm[:, None]), axis=(2, 3))
    wt = sched.weight_ij(p, jnp.asarray(ts), 2)
    f = jnp.einsum("mlj,plj->mp", wt, nll)
    return (jnp.mean(jnp.sum(q * f, -1)) * (1.0 - CFG.t_min)
            + losses.reconstruction_bound(sched, CFG.t_min, 2, codec, p))

  value, mean, se = _estimates(apply_fn, codec, sched, _tilt_params, theta, tokens, t_rows)
  fd = _fd(jax.jit(exact), theta)
  np.testing.assert_allclose(value, float(exact(theta)), rtol=0.03)
  assert np.all(np.abs(mean - fd) < 4 * se + 3e-3), (mean, fd, se)
  assert abs(fd[0]) > 0.05, fd


def test_plackett_luce_estimator_matches_the_exact_order_objective():
  """The t-free estimator: its value and gradient match sum_sigma PL_w(sigma) AR(sigma),
  enumerated over the 3! orders (L = 3), and its finite differences."""
  codec, apply_fn, tokens = _table_problem()
  sched = _sched("plackett_luce")
  theta = jnp.array([0.4, -0.3, 0.1], jnp.float32)
  length = 3
  pats, nll = _pattern_nll(None, codec, apply_fn, tokens)    # [8, L] masked patterns
  index = {tuple(np.asarray(p).astype(int)): k for k, p in enumerate(pats)}
  perms = list(itertools.permutations(range(length)))
  # AR loss of each order: at step k the decoded set is sigma_<k (everything else masked).
  ar = []
  for perm in perms:
    tot = 0.0
    for k in range(length):
      masked = np.ones(length, int)
      masked[list(perm[:k])] = 0
      tot = tot + nll[index[tuple(masked)], perm[k]]
    ar.append(tot)
  ar = jnp.stack(ar)

  def exact(th):
    w = jnp.exp(sched.log_w(_pl_params(th), length))
    pl = jnp.stack([jnp.prod(jnp.stack([w[p[k]] / jnp.sum(w[np.array(p[k:])])
                                        for k in range(length)])) for p in perms])
    return jnp.sum(pl * ar)

  # Times that give k = 0, 1, 2 decoded digits equally often.
  t_rows = jnp.repeat(CFG.t_min + (1 - CFG.t_min) * (jnp.arange(3) + 0.5) / 3, 64)
  value, mean, se = _estimates(apply_fn, codec, sched, _pl_params, theta, tokens, t_rows)
  fd = _fd(jax.jit(exact), theta)
  np.testing.assert_allclose(value, float(exact(theta)), rtol=0.02)
  assert np.all(np.abs(mean - fd) < 4 * se + 3e-3), (mean, fd, se)
  assert np.max(np.abs(fd)) > 0.05, fd


# ----------------------------------------------------------------- exact denoiser
def _value_oracle(codec, seqs, probs, w):
  """Bayes-optimal decoder under a value-dependent schedule: p(x | y_t) weighs every
  consistent sequence by its probability times prod over masked digits of t**w[j, d]."""
  seqs = jnp.asarray(seqs)
  sd = jnp.asarray(codec.encode(np.asarray(seqs)))                  # [S, L, ell]
  logp = jnp.log(jnp.asarray(probs, jnp.float32))
  w_sd = jnp.asarray(w)[jnp.arange(codec.ell), sd]                  # [S, L, ell]
  onehot = jax.nn.one_hot(seqs, codec.vocab_size)

  def apply_fn(params, noisy, t, *, train=False, rng=None):
    m = noisy[:, None] == codec.mask_id                             # [B, 1, L, ell]
    cons = jnp.all(m | (noisy[:, None] == sd[None]), axis=(2, 3))
    lik = jnp.sum(jnp.where(m, w_sd[None] * jnp.log(t)[:, None, None, None], 0.0), (2, 3))
    a = jnp.where(cons, logp[None] + lik, -jnp.inf)
    a = a - jax.scipy.special.logsumexp(a, axis=1, keepdims=True)
    return jnp.log(jnp.maximum(jnp.einsum("bs,slv->blv", jnp.exp(a), onehot), 1e-30))
  return apply_fn


@pytest.mark.parametrize("name,ell", [("genmd4", 1), ("genmd4", 2), ("learned_tilt", 2),
                                      ("plackett_luce", 1)])
def test_bound_is_tight_for_the_exact_denoiser(name, ell):
  """With the exact denoiser each family's training objective equals the entropy of a
  known source, at parameters far from neutral (wrong weights would move it off)."""
  seqs, probs, h = _markov_source(v=4)
  codec = prime.PrimeCodec.create(4, ell)
  sched = _sched(name, codec)
  if name == "genmd4":
    w = np.array([[0.5, 2.0, 1.0, 3.0]]) if ell == 1 else np.array([[0.4, 2.5], [1.5, 0.7]])
    params, apply_fn = _genmd4_params(w), _value_oracle(codec, seqs, probs, w)
  elif name == "learned_tilt":
    params, apply_fn = _tilt_params([-1.2, 0.0]), _oracle_apply(codec, seqs, probs)
  else:                                                          # the t-free estimator
    params, apply_fn = _pl_params([1.5, -1.0, 0.0]), _oracle_apply(codec, seqs, probs)
  n = 40000
  idx = np.random.default_rng(1).choice(len(probs), size=n, p=probs / probs.sum())
  tokens = jnp.asarray(seqs[idx])
  loss = jax.jit(lambda k: losses.diffusion_loss(apply_fn, params, tokens, k, codec=codec,
                                                 schedule=sched, cfg=CFG, train=True)[0])(
                                                     jax.random.key(4))
  loss = np.asarray(loss, np.float64)
  m, se = loss.mean(), loss.std() / np.sqrt(n)
  assert abs(m - h) < 4 * se + 0.02, (m, h, se)


# ----------------------------------------------------------------- sampler law
def _chi2_pvalue(counts, probs):
  counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
  keep = probs * counts.sum() > 5
  exp = probs[keep] * counts.sum()
  obs = counts[keep]
  stat = np.sum((obs - exp) ** 2 / exp) + (counts[~keep].sum() - probs[~keep].sum()
                                           * counts.sum()) ** 2 / max(
                                               probs[~keep].sum() * counts.sum(), 1e-9)
  return stats.chi2.sf(stat, df=int(keep.sum()))


@pytest.mark.parametrize("ell", [1, 2])
def test_genmd4_sampler_follows_the_schedule_law(ell):
  """With the exact (time-dependent) denoiser of an i.i.d. source, the value-dependent
  sampler reproduces the forward law: value x with probability pi_x, and digit j of it
  still masked at grid time t with probability t**w[j, x_j]."""
  vocab, length, steps, n = 4, 4, 32, 500
  codec = prime.PrimeCodec.create(vocab, ell)
  pi = np.array([0.1, 0.2, 0.3, 0.4])
  w = np.array([[0.5, 1.0, 2.0, 4.0]]) if ell == 1 else np.array([[0.5, 3.0], [2.0, 1.0]])
  sd = codec.encode(np.arange(vocab))                              # [V, ell]
  w_tok = jnp.asarray(w[np.arange(ell), sd])                       # [V, ell]

  def apply_fn(params, digits, t, *, train=False, rng=None):
    m = (digits == codec.mask_id)[..., None, :]                    # [B, L, 1, ell]
    return jnp.log(pi)[None, None] + jnp.sum(
        jnp.where(m, w_tok * jnp.log(t)[:, None, None, None], 0.0), -1)

  sched = _sched("genmd4", codec)
  res = jax.jit(lambda k: ancestral_sample(
      apply_fn, _genmd4_params(w), k, codec=codec, schedule=sched, batch_size=n,
      seq_len=length, num_steps=steps, time_conditioning=True,
      return_trajectory=True))(jax.random.key(5))
  tok = np.asarray(res.tokens).ravel()
  assert _chi2_pvalue(np.bincount(tok, minlength=vocab), pi) > 1e-3
  traj = np.asarray(res.trajectory) == codec.mask_id              # [T+1, B, L, ell]
  ts = 1.0 - np.arange(steps + 1) / steps
  for k in (8, 16, 24):
    m = traj[k].reshape(-1, ell)
    for j in range(ell):
      counts = np.zeros((vocab, 2))
      np.add.at(counts, (tok, m[:, j].astype(int)), 1)
      p_mask = ts[k] ** w[j, sd[:, j]]
      expected = pi[:, None] * np.stack([1 - p_mask, p_mask], -1)
      assert _chi2_pvalue(counts, expected) > 1e-3, (k, j, counts, expected * tok.size)
  if ell == 1:
    return
  # w = 1 is the linear schedule, draw for draw.
  a = jax.jit(lambda k: ancestral_sample(
      apply_fn, _genmd4_params(np.ones_like(w)), k, codec=codec, schedule=sched, batch_size=8,
      seq_len=length, num_steps=steps, time_conditioning=True))(jax.random.key(1))
  b = jax.jit(lambda k: ancestral_sample(
      apply_fn, None, k, codec=codec, schedule=_sched("linear"), batch_size=8, seq_len=length,
      num_steps=steps, time_conditioning=True))(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a.digits), np.asarray(b.digits))


def test_learned_tilt_and_plackett_luce_samplers_follow_their_schedules():
  vocab, length, steps, n = 16, 4, 32, 400
  codec = prime.PrimeCodec.create(vocab, 2)
  zero = lambda params, digits, t, **kw: jnp.zeros(digits.shape[:2] + (vocab,))
  sched = _sched("learned_tilt", codec)
  res = jax.jit(lambda k: ancestral_sample(
      zero, _tilt_params([1.0, 0.0]), k, codec=codec, schedule=sched, batch_size=n,
      seq_len=length, num_steps=steps, return_trajectory=True))(jax.random.key(7))
  traj = np.asarray(res.trajectory) == codec.mask_id
  ts = 1.0 - np.arange(steps + 1) / steps
  for k in (8, 16, 24):
    counts = np.stack([traj[k].sum(axis=(0, 1)), (~traj[k]).sum(axis=(0, 1))], -1)   # [ell, 2]
    p = ts[k] ** np.exp([1.0, 0.0])
    assert _chi2_pvalue(counts, np.stack([p, 1 - p], -1) / 2) > 1e-3, (k, counts)
  # plackett_luce samples exactly as learned_poly with the same exponents.
  params = _pl_params([1.0, 0.0, -0.5, 0.2])
  a, b = (jax.jit(lambda k, s=s: ancestral_sample(
      zero, params, k, codec=codec, schedule=_sched(s), batch_size=8, seq_len=length,
      num_steps=steps))(jax.random.key(2)) for s in ("plackett_luce", "learned_poly"))
  np.testing.assert_array_equal(np.asarray(a.digits), np.asarray(b.digits))


# ----------------------------------------------------------------- config errors
def test_bad_combinations_fail_at_config_time():
  from mdm_jax.configs import shakespeare_prime  # pylint: disable=import-outside-toplevel
  from mdm_jax.tasks.masked import MaskedDiffusionTask  # pylint: disable=import-outside-toplevel

  def build(**over):
    c = shakespeare_prime.get_config("tiny")
    for k, v in over.items():
      block, key = k.split(".")
      c[block][key] = v
    return MaskedDiffusionTask.from_config(c, vocab_size=30)

  assert build(**{"schedule.name": "genmd4"}).schedule.value_dependent
  allowed = "prime.loss='marginal', training.loss_weighting='elbo'"
  with pytest.raises(ConfigError, match=allowed):
    build(**{"schedule.name": "genmd4", "prime.loss": "joint"})
  with pytest.raises(ConfigError, match=allowed):
    build(**{"schedule.name": "genmd4", "training.loss_weighting": "flat"})
  with pytest.raises(ConfigError, match="ancestral"):
    build(**{"schedule.name": "genmd4", "sampling.sampler": "confidence"})
  with pytest.raises(ConfigError, match="prime.ell >= 2"):
    build(**{"schedule.name": "learned_tilt", "prime.ell": 1})
  with pytest.raises(ConfigError, match="marginal"):
    build(**{"schedule.name": "learned_tilt", "prime.loss": "joint"})
  with pytest.raises(ConfigError, match="time_conditioning=False"):
    build(**{"schedule.name": "plackett_luce", "model.time_conditioning": True})
  with pytest.raises(ConfigError, match="lr_scale"):
    _sched("genmd4", lr_scale=0.0)


# ----------------------------------------------------------------- end to end
STEPS = 4
OVERRIDES = {"training.num_steps": STEPS, "eval.every_steps": STEPS, "eval.num_batches": 1,
             "checkpoint.every_steps": STEPS, "sampling.num_steps": 4, "sampling.num_samples": 1,
             "data.tokenizer": "char", "data.seq_len": 32, "schedule.lr_scale": 50.0}


@pytest.fixture(scope="module")
def trained_families(tmp_path_factory):
  """The tiny default job with ``--config.schedule.name=genmd4`` from the command line, and
  with ``learned_tilt`` through the same training entry point in this process (the command
  line adds only flag parsing).  ``plackett_luce`` runs from the command line in
  tests/test_multivariate.py (the order picture)."""
  from mdm_jax.configs import shakespeare_prime  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("families")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "mdm_jax.main", "--config=shakespeare_prime:tiny",
       f"--workdir={root / 'genmd4'}", "--config.schedule.name=genmd4",
       *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  c = shakespeare_prime.get_config("tiny")
  c.schedule.name = "learned_tilt"
  for k, v in OVERRIDES.items():
    block, key = k.split(".")
    c[block][key] = v
  train_and_evaluate(c, str(root / "learned_tilt"))
  return root


@pytest.mark.parametrize("name,key", [("genmd4", "train/schedule_log_w_std"),
                                      ("learned_tilt", "train/schedule_kappa")])
def test_each_family_trains_from_one_config_line(trained_families, name, key):
  wd = trained_families / name
  final = json.load(open(wd / "final_metrics.json"))
  assert final["step"] == STEPS and np.isfinite(final["eval_ppl_bound"])
  recs = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert any(abs(r.get(key, 0.0)) > 0 for r in recs)           # the parameters moved
  assert os.path.exists(wd / "samples" / f"step_{STEPS}.txt")
  if name == "genmd4":                                         # char vocabulary 84: b = 10
    w = json.load(open(wd / "schedule" / f"step_{STEPS}.json"))["w"]
    assert np.asarray(w).shape == (2, 10) and np.std(w) > 0
