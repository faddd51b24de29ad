"""Multivariate (learned-order) schedules: exactness, gradients, the AR limit, sampling order.

See mdm_jax/diffusion/schedules/ and docs/method/algorithms.md §2.
"""

import itertools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mdm_jax.diffusion import elbo as losses, prime

from mdm_jax.diffusion import autoregressive as ar_lib
from mdm_jax.diffusion.schedules.learned_poly import LearnedPolySchedule
from mdm_jax.networks import ScheduledModel, attach_schedule
from mdm_jax.networks import build_model
from mdm_jax.sampling import ancestral_sample
from mdm_jax.diffusion.schedules import get_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sched(name, **kw):
  return get_schedule(ml_collections.ConfigDict({"name": name, **kw}))


def _dit(vocab, ell, base, causal=False):
  c = ml_collections.ConfigDict(dict(
      name="dit", num_layers=1, d_model=32, num_heads=2, mlp_ratio=2, cond_dim=16, dropout=0.0,
      time_conditioning=False, tie_embeddings=False, dtype="float32", param_dtype="float32",
      attention_impl="xla", scan_layers=True, remat="none"))
  return build_model(c, vocab_size=vocab, ell=ell, base=base, causal=causal)


class _ConstOrder(nn.Module):
  """log w_i = log(power) for every position (a test-only order module)."""
  power: float = 1.0

  @nn.compact
  def __call__(self, length):
    return jnp.full((length,), np.log(self.power), jnp.float32)


def _mixing_model(vocab, ell, base, seed=0):
  """A cheap stand-in network: logits from a token's own digits and the whole sequence."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(k1, (ell * (base + 1), vocab))
  b = 0.5 * jax.random.normal(k2, (ell * (base + 1), vocab))

  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    oh = jax.nn.one_hot(digits, base + 1).reshape(digits.shape[:2] + (-1,))
    return oh @ a + jnp.mean(oh, axis=1, keepdims=True) @ b
  return apply_fn


# ----------------------------------------------------------------- exactness
def test_schedule_parameters_live_in_the_model_params():
  vocab, length, ell = 30, 8, 2
  codec = prime.PrimeCodec.create(vocab, ell)
  model = attach_schedule(_dit(vocab, ell, codec.base), _sched("learned_poly"))
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((2, length, ell), jnp.int32),
                          jax.ShapeDtypeStruct((2,), jnp.float32))["params"]
  assert nn.unbox(shapes)["schedule"]["log_w"].shape == (length,)
  assert "embed" in shapes and "blocks" in shapes          # the backbone's layout is unchanged
  fixed = attach_schedule(_dit(vocab, ell, codec.base), _sched("left_to_right"))
  assert not isinstance(fixed, ScheduledModel)         # nothing to learn, nothing added


def test_equal_exponents_equal_univariate_elbo():
  """Equal per-position exponents give the univariate polynomial ELBO (Prime, ell = 2),
  the window family at sharpness 0 the linear one, and with ell = 1 the plain MDM ELBO."""
  vocab, length = 30, 8
  cfg = losses.DiffusionLossConfig(t_min=1e-3)
  learned = _sched("learned_poly")
  const = LearnedPolySchedule(name="const", learned=True, order_module=_ConstOrder(2.5))
  # A constant free parameter is centred to log w = 0, i.e. w = 1.
  params = {"schedule": {"log_w": jnp.full((length,), 0.7)}}
  tokens = jax.random.randint(jax.random.key(2), (6, length), 0, vocab)
  for ell in (2, 1):
    codec = prime.PrimeCodec.create(vocab, ell)
    apply_fn = _mixing_model(vocab, ell, codec.base)
    cases = [(learned, _sched("polynomial", power=1.0)),
             (const, _sched("polynomial", power=2.5)),
             (_sched("left_to_right", sharpness=0.0), _sched("linear"))]

    @jax.jit
    def run(key):
      out = []
      for multi, uni in cases:
        a = losses.diffusion_loss(apply_fn, params, tokens, key, codec=codec, schedule=multi,
                              cfg=cfg, train=False)[0]
        b = losses.diffusion_loss(apply_fn, params, tokens, key, codec=codec, schedule=uni,
                                  cfg=cfg, train=False)[0]
        out.append((a, b))
      if ell == 1:
        out.append((out[0][0], losses.mdm_elbo_reference(
            apply_fn, params, tokens, key, schedule=_sched("linear"), vocab_size=vocab)))
      return out

    for seed in range(3):
      for a, b in run(jax.random.key(seed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- per-digit (slot) schedule
def test_slot_schedule_tilt_zero_is_linear_and_rates_are_per_digit():
  vocab, length = 30, 8
  cfg = losses.DiffusionLossConfig(t_min=1e-3)
  tokens = jax.random.randint(jax.random.key(2), (6, length), 0, vocab)
  for ell in (1, 2, 3):
    codec = prime.PrimeCodec.create(vocab, ell)
    slot = _sched("slot_poly", slot_tilt=0.0).for_codec(codec)
    apply_fn = _mixing_model(vocab, ell, codec.base)
    for seed in range(2):
      key = jax.random.key(seed)
      a = losses.diffusion_loss(apply_fn, None, tokens, key, codec=codec, schedule=slot, cfg=cfg,
                            train=False)[0]
      b = losses.diffusion_loss(apply_fn, None, tokens, key, codec=codec,
                                schedule=_sched("linear"), cfg=cfg, train=False)[0]
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # Tilt kappa, ell = 3: log w = (kappa, kappa/2, 0); digit j is masked with probability t**w_j.
  codec = prime.PrimeCodec.create(27, 3)
  slot = _sched("slot_poly", slot_tilt=1.5).for_codec(codec)
  w = np.exp([1.5, 0.75, 0.0])
  t = jnp.asarray([0.2, 0.5, 0.9])
  np.testing.assert_allclose(np.asarray(slot.mask_prob_ij(None, t, 4)),
                             np.broadcast_to((np.asarray(t)[:, None] ** w)[:, None], (3, 4, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(slot.weight_ij(None, t, 4))[:, 0],
                             w[None] / np.asarray(t)[:, None], rtol=1e-5)
  digits = jnp.zeros((4000, 4, 3), jnp.int32)
  noisy = losses.draw_masks(jax.random.key(3), digits, slot.mask_prob_ij(None, jnp.full((4000,), 0.5), 4),
                         codec.mask_id, None)
  freq = np.asarray(noisy == codec.mask_id).mean(axis=(0, 1))
  p = 0.5 ** w
  assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / 16000)), (freq, p)
  with pytest.raises(ValueError, match="slot_tilt"):
    _sched("slot_poly", slot_tilt=float("nan"))
  with pytest.raises(ValueError, match="marginal"):
    losses.diffusion_loss(_mixing_model(27, 3, 3), None, jnp.zeros((2, 4), jnp.int32),
                      jax.random.key(0), codec=codec, schedule=slot,
                      cfg=losses.DiffusionLossConfig(form="joint"), train=False)


# (kappa < 0 with ell = 2 is checked through learned_tilt in tests/test_learned_schedules.py.)
@pytest.mark.parametrize("ell,vocab,tilt", [(2, 4, 1.5), (3, 8, 2.0)])
def test_slot_schedule_elbo_is_tight_for_the_exact_denoiser(ell, vocab, tilt):
  """With the Bayes-optimal decoder the continuous-time NELBO equals the entropy for *any*
  per-digit schedule; mismatched rates and weights (or digits) would move it off."""
  from tests.test_losses import _markov_source, _oracle_apply  # pylint: disable=import-outside-toplevel
  seqs, probs, h = _markov_source(v=vocab)
  codec = prime.PrimeCodec.create(vocab, ell)
  slot = _sched("slot_poly", slot_tilt=tilt).for_codec(codec)
  apply_fn = _oracle_apply(codec, seqs, probs)
  n = 40000
  idx = np.random.default_rng(1).choice(len(probs), size=n, p=probs / probs.sum())
  tokens = jnp.asarray(seqs[idx])
  cfg = losses.DiffusionLossConfig(t_min=1e-3)
  loss = jax.jit(lambda k: losses.diffusion_loss(apply_fn, None, tokens, k, codec=codec,
                                             schedule=slot, cfg=cfg, train=False)[0])(
                                                 jax.random.key(4))
  loss = np.asarray(loss, np.float64)
  m, se = loss.mean(), loss.std() / np.sqrt(n)
  assert abs(m - h) < 4 * se + 0.02, (m, h, se)


def test_slot_schedule_sampler_reveals_leading_digits_first():
  vocab, length, steps, n = 16, 6, 64, 400
  codec = prime.PrimeCodec.create(vocab, 2)
  f = _const_apply(vocab)
  run = lambda sched: jax.jit(lambda k: ancestral_sample(
      f, None, k, codec=codec, schedule=sched, batch_size=n, seq_len=length,
      num_steps=steps, return_trajectory=True))(jax.random.key(7))
  # Tilt 0 is the linear schedule, draw for draw.
  a = run(_sched("slot_poly", slot_tilt=0.0).for_codec(codec))
  b = run(_sched("linear"))
  np.testing.assert_array_equal(np.asarray(a.trajectory), np.asarray(b.trajectory))
  # Tilt 1: at grid time t, digit j is still masked with probability t**w_j.
  res = run(_sched("slot_poly", slot_tilt=1.0).for_codec(codec))
  traj = np.asarray(res.trajectory) == codec.mask_id                  # [T+1, B, L, ell]
  ts = np.asarray(1.0 - np.arange(steps + 1) / steps)
  for k in (16, 32, 48):
    frac = traj[k].mean(axis=(0, 1))
    p = ts[k] ** np.exp([1.0, 0.0])
    assert np.all(np.abs(frac - p) < 4 * np.sqrt(p * (1 - p) / (n * length)) + 1e-3), (k, frac, p)
  assert not np.any(np.asarray(res.digits) == codec.mask_id)


# ----------------------------------------------------------------- gradient estimator
def _table_problem():
  """L = 3 positions, V = 3, a fixed random function of the whole noisy sequence."""
  vocab, length = 3, 3
  codec = prime.PrimeCodec.create(vocab, 1)
  a = jax.random.normal(jax.random.key(7), (length, vocab + 1, length, vocab)) * 1.5

  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    onehot = jax.nn.one_hot(digits[..., 0], vocab + 1)                  # [B, L, V+1]
    return jnp.einsum("bjc,jcil->bil", onehot, a)

  tokens = jnp.array([[2, 0, 1]], jnp.int32)
  return codec, apply_fn, tokens


def _pattern_nll(params, codec, apply_fn, tokens):
  """All 2^L mask patterns [P, L] and the per-position NLL of each [P, L] (ell = 1)."""
  length = tokens.shape[1]
  pats = jnp.array(list(itertools.product([0, 1], repeat=length)), bool)
  noisy = jnp.where(pats, codec.mask_id, tokens)[..., None]
  logits = jax.jit(apply_fn)(params, noisy, jnp.ones((pats.shape[0],)))
  return pats, losses.mdm_token_nll(logits, noisy[..., 0], jnp.broadcast_to(tokens, pats.shape),
                                    codec.mask_id)


def _exact_elbo_at(params, ts, pats, nll, schedule, cfg):
  """mean over the times ts of E_z[f(z; w, t)] by enumerating the masks (jnp, traceable)."""
  tt = jnp.asarray(ts, jnp.float32)
  length = pats.shape[1]
  pm = schedule.mask_prob_i(params, tt, length)                           # [M, L]
  q = jnp.prod(jnp.where(pats[None], pm[:, None], 1.0 - pm[:, None]), -1)  # [M, P]
  w = schedule.weight_ij(params, tt, length)[..., 0] * (1.0 - cfg.t_min)  # [M, L]
  return jnp.mean(jnp.sum(q * jnp.einsum("ml,pl->mp", w, nll), -1))


def test_rloo_gradient_matches_finite_differences():
  codec, apply_fn, tokens = _table_problem()
  schedule = _sched("learned_poly", grad_scale=1.0)
  cfg = losses.DiffusionLossConfig(t_min=1e-3)
  theta = jnp.array([0.4, -0.3, 0.1], jnp.float32)
  ts = (0.3, 0.6, 0.9)
  chunks, rows = 48, 3 * 100
  t_rows = jnp.repeat(jnp.array(ts, jnp.float32), rows // 3)
  toks = jnp.broadcast_to(tokens, (rows, tokens.shape[1]))

  def grad_of_chunk(key, num_masks):
    def total(th):
      loss, _ = losses.diffusion_loss(apply_fn, {"schedule": {"log_w": th}}, toks, key, codec=codec,
                                  schedule=schedule, cfg=cfg, train=True, t=t_rows,
                                  num_masks=num_masks)
      return jnp.mean(loss)
    return jax.value_and_grad(total)(theta)

  keys = jax.random.split(jax.random.key(3), chunks)
  values, g_rloo = jax.jit(jax.vmap(lambda k: grad_of_chunk(k, 2)))(keys)   # [C], [C, L]
  _, g_direct = jax.jit(jax.vmap(lambda k: grad_of_chunk(k, 1)))(keys)
  pats, nll = _pattern_nll(None, codec, apply_fn, tokens)
  exact = jax.jit(lambda th: _exact_elbo_at({"schedule": {"log_w": th}}, ts, pats, nll,
                                            schedule, cfg)
                  + losses.reconstruction_bound(schedule, cfg.t_min, 3, codec,
                                                {"schedule": {"log_w": th}}))
  h = 1e-2
  fd = np.array([(float(exact(theta.at[i].add(h))) - float(exact(theta.at[i].add(-h)))) / (2 * h)
                 for i in range(3)])
  # The estimate's value is the plain ELBO: its mean matches the enumeration too.
  np.testing.assert_allclose(float(jnp.mean(values)), float(exact(theta)), rtol=0.03)
  mean, se = np.mean(g_rloo, 0), np.std(g_rloo, 0) / np.sqrt(g_rloo.shape[0])
  assert np.all(np.abs(mean - fd) < 4 * se + 2e-3), (mean, fd, se)
  # The direct (pathwise-through-weights) term alone is biased: the score term is needed.
  dmean, dse = np.mean(g_direct, 0), np.std(g_direct, 0) / np.sqrt(g_direct.shape[0])
  assert np.max(np.abs(dmean - fd) / (dse + 1e-6)) > 10, (dmean, fd)


# ----------------------------------------------------------------- AR limit
def test_left_to_right_elbo_approaches_ar_loss():
  """MDM ELBO with the left_to_right family -> the AR loss of the same network.

  The network is a causal model fed the sequence shifted right by one (first slot
  = the mask/BOS id), so its prediction at i depends on y_{<i} only.  Its AR
  loss (``ar_lib.ar_loss``) scores x_i given the clean prefix; under the
  left-to-right order the ELBO scores x_i when exactly the prefix is visible.
  """
  vocab, length, reps = 11, 6, 1024
  codec = prime.PrimeCodec.create(vocab, 1)
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  emb = jax.random.normal(k1, (vocab + 1, 16))
  w_own, w_prefix = jax.random.normal(k2, (16, vocab)), jax.random.normal(k3, (16, vocab))
  params = None

  def causal_apply(p, digits, t, *, train=False, rng=None):
    """Logits at i from inputs 0..i only: its own input and the mean of the prefix."""
    e = emb[digits[..., 0]]
    prefix = jnp.cumsum(e, axis=1) / jnp.arange(1, e.shape[1] + 1)[None, :, None]
    return e @ w_own + prefix @ w_prefix

  def shifted_apply(p, digits, t, *, train=False, rng=None):
    first = jnp.full_like(digits[:, :1], codec.mask_id)
    return causal_apply(p, jnp.concatenate([first, digits[:, :-1]], axis=1), t)

  tokens = jax.random.randint(jax.random.key(4), (1, length), 0, vocab)
  ar = float(ar_lib.ar_loss(causal_apply, params, tokens, jax.random.key(0),
                            bos_id=codec.mask_id, train=False)[0][0])
  # The exact ELBO: all 2^L masks enumerated at the midpoints of M cells of [0, 1]
  # (M a multiple of L, so at sharpness 1 every window is a union of cells and the
  # piecewise-constant integrand is integrated exactly), plus the reconstruction
  # term; t_min = 1e-6 makes the [0, t_min] truncation negligible.
  cfg = losses.DiffusionLossConfig(t_min=1e-6)
  pats, nll = _pattern_nll(params, codec, shifted_apply, tokens)
  ts = (np.arange(100 * length) + 0.5) / (100 * length)
  kappas = (0.0, 0.5, 0.9, 0.99, 1.0)
  elbos = []
  for k in kappas:
    sch = _sched("left_to_right", sharpness=k)
    elbos.append(float(_exact_elbo_at(params, ts, pats, nll, sch, cfg))
                 + float(losses.reconstruction_bound(sch, cfg.t_min, length, codec, params)))
  gaps = [e - ar for e in elbos]
  print("AR loss", ar, "exact ELBO by sharpness", dict(zip(kappas, elbos)))
  # Exactly the AR loss at sharpness 1 ...
  assert abs(gaps[-1]) < 2e-3, gaps
  # ... approached as the sharpness grows.
  assert all(abs(a) > abs(b) for a, b in zip(gaps[1:], gaps[2:])), gaps
  assert max(abs(g) for g in gaps[:-1]) > 0.1, gaps
  # The Monte Carlo training loss (t_min = 1e-3) estimates the same number.  Loose:
  # the estimator is heavy-tailed near each window's onset, like 1/t near t = 0.
  toks = jnp.broadcast_to(tokens, (reps, length))
  est = np.asarray(jax.jit(lambda key: losses.diffusion_loss(
      shifted_apply, params, toks, key, codec=codec, schedule=_sched("left_to_right"),
      cfg=losses.DiffusionLossConfig(t_min=1e-3), train=False)[0])(jax.random.key(0)))
  assert abs(est.mean() - elbos[-1]) < 4 * est.std() / np.sqrt(reps) + 0.05, (est.mean(), elbos)


# ----------------------------------------------------------------- sampling order
def _const_apply(vocab):
  def fn(params, digits, t, *, train=False, rng=None):
    return jnp.zeros(digits.shape[:2] + (vocab,), jnp.float32)
  return fn


def _reveal_steps(traj):
  """First step at which each position is unmasked: [B, L] from a [T+1, B, L, ell] trajectory."""
  masked = np.asarray(traj[..., 0])
  return np.argmin(masked, axis=0)


def test_sampler_unmasks_in_the_schedule_order():
  vocab, length = 5, 8
  codec = prime.PrimeCodec.create(vocab, 1)
  # Fixed left-to-right family: every sample reveals position i strictly before i + 1.
  res = jax.jit(lambda k: ancestral_sample(
      _const_apply(vocab), {}, k, codec=codec, schedule=_sched("left_to_right"), batch_size=64,
      seq_len=length, num_steps=4 * length, return_trajectory=True))(jax.random.key(0))
  traj = np.asarray(res.trajectory) == codec.mask_id
  first = np.argmin(traj[..., 0], axis=0)                                  # [B, L]
  assert np.all(np.diff(first, axis=1) > 0), first[:3]
  assert not np.any(np.asarray(res.digits) == codec.mask_id)

  # Learned exponents: the order follows Plackett-Luce(w), w = (3, 1, 0.5).
  w = np.array([3.0, 1.0, 0.5])
  params = {"schedule": {"log_w": jnp.log(jnp.asarray(w, jnp.float32))}}
  n, steps = 2000, 200
  res = jax.jit(lambda k: ancestral_sample(
      _const_apply(vocab), params, k, codec=codec, schedule=_sched("learned_poly"),
      batch_size=n, seq_len=3, num_steps=steps, return_trajectory=True))(jax.random.key(1))
  traj = np.asarray(res.trajectory) == codec.mask_id
  first = np.where(traj[..., 0].all(0), steps, np.argmin(traj[..., 0], axis=0)).astype(float)
  first += np.random.default_rng(0).uniform(0, 0.5, first.shape)           # break rare ties
  orders = np.argsort(first, axis=1)
  counts = {}
  for o in map(tuple, orders):
    counts[o] = counts.get(o, 0) + 1
  for perm in itertools.permutations(range(3)):
    p = np.prod([w[perm[k]] / w[list(perm[k:])].sum() for k in range(3)])
    f = counts.get(perm, 0) / n
    assert abs(f - p) < 4 * np.sqrt(p * (1 - p) / n) + 0.015, (perm, f, p)
  # The order summary agrees: position 0 (largest w) has the latest masking time.
  summ = _sched("learned_poly").order_summary(params, 3)
  assert np.argmax(summ["mean_unmask_time"]) == 0 and np.argmin(summ["mean_decode_rank"]) == 0


# ----------------------------------------------------------------- end to end
def test_cli_learned_order_writes_the_order_picture(tmp_path):
  """The learned-order config with the t-free estimator (``plackett_luce``, the
  ``learned_poly`` schedule and order picture trained without a time draw)."""
  wd = str(tmp_path / "lo")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "mdm_jax.main", "--config=configs/shakespeare_learned_order.py:tiny",
       f"--workdir={wd}", "--config.schedule.name=plackett_luce",
       "--config.training.num_steps=10", "--config.eval.every_steps=5",
       "--config.checkpoint.every_steps=10", "--config.sampling.num_steps=8"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  assert final["step"] == 10 and np.isfinite(final["eval_ppl_bound"])
  for step in (5, 10):
    summ = json.load(open(os.path.join(wd, "order", f"step_{step}.json")))
    assert len(summ["mean_unmask_time"]) == 64 and len(summ["log_w"]) == 64
    with open(os.path.join(wd, "order", f"step_{step}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("train/schedule_log_w_std" in r for r in recs)
  # The schedule's parameters moved (they are trained with the model).
  assert max(abs(x) for x in summ["log_w"]) > 0
  assert os.path.exists(os.path.join(wd, "samples", "step_10.txt"))
