"""Tests for the extra samplers: first_hitting, punt / eb / fast_dllm, maskgit /
self_correct, remdm; their config keys, CLI selection and the sampler table.

Exact statements tested as such (oracle models with a known joint, chi-square):
* first_hitting with a budget >= the number of masked elements samples the
  joint exactly (MDM and Prime);
* punt with punt_eps = 0 / punt_max_candidates = 1, eb with eb_gamma = 0 and
  fast_dllm with a threshold > 1 decode one token per step in a
  value-independent order: exact;
* remdm with a single token is exact for every schedule (re-masking a digit
  leaves the revealed ones distributed as the data marginal), and its masked
  fraction after each step is 1 - alpha_s (cap / rescale / loop);
* self_correct with zero caps is maskgit sample for sample, remdm with
  sigma = 0 is ancestral sample for sample.
"""

import concurrent.futures
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.core.errors import ConfigError

from mdm_jax.tasks import validate_config
from mdm_jax import sampling
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.sampling.self_correction import remdm_alpha
from mdm_jax.diffusion.schedules import Schedule, linear
from tests.test_sampling import (EPS, P_MIN, chi2_pvalue, dummy_apply_fn, joint_counts,
                                 oracle_apply_fn, random_apply_fn, random_joint, rkey)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = ["first_hitting", "punt", "eb", "fast_dllm", "maskgit", "self_correct", "remdm"]
N_DRAWS = 20000


def run(name, apply_fn, codec, key, **kw):
  fn = functools.partial(sampling.get_sampler(name), apply_fn, codec=codec, schedule=linear(),
                         eps=EPS, **kw)
  return jax.jit(fn)(None, key)


def safe_oracle(joint, codec):
  """The oracle of test_sampling with zero-probability outcomes at 1e-30 (finite logs)."""
  return oracle_apply_fn(np.maximum(joint, 1e-30), codec)


def coupled_joint(seed=0):
  """§3.4: L = 4, V = 3; x1 = x0, x2 independent, x3 a noisy copy of x2."""
  rng = np.random.default_rng(seed)
  p0, p2 = rng.dirichlet(np.ones(3) * 3), rng.dirichlet(np.ones(3) * 3)
  copy = 0.8 * np.eye(3) + 0.1 * (1 - np.eye(3))
  joint = np.einsum("a,ab,c,cd->abcd", p0, np.eye(3), p2, copy)
  return joint / joint.sum()


# --------------------------------------------------------------------------- first hitting
@pytest.mark.parametrize("ell,v,length", [(1, 4, 3), (2, 6, 2)])
def test_first_hitting_exact(ell, v, length):
  codec = PrimeCodec.create(v, ell)
  p = random_joint(np.random.default_rng(20 + ell), v, length, corr=3.0)
  n_el = length * ell
  res = run("first_hitting", oracle_apply_fn(p, codec), codec, rkey(ell), batch_size=N_DRAWS,
            seq_len=length, num_steps=n_el + 3)
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < v
  assert int(res.nfe) == n_el and int(res.idle_steps) == 0     # one element per event
  assert chi2_pvalue(joint_counts(tok, v), p) > P_MIN
  if ell == 1:   # power: a budget of one event reveals everything at once -> product law
    res1 = run("first_hitting", oracle_apply_fn(p, codec), codec, rkey(9), batch_size=N_DRAWS,
               seq_len=length, num_steps=1)
    assert int(res1.nfe) == 1
    assert chi2_pvalue(joint_counts(res1.tokens, v), p) < 1e-8


def test_first_hitting_budget_prompt_and_time():
  v, ell, length, b = 20, 3, 10, 8
  codec = PrimeCodec.create(v, ell)
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, v, size=(b, length)).astype(np.int32)
  pmask = np.zeros((b, length), bool)
  pmask[:, [0, 4, 5]] = True
  seen_t = []

  def apply_fn(params, digits, t, *, train=False, rng=None):
    jax.debug.callback(lambda x: seen_t.append(np.asarray(x)), t, ordered=True)
    return random_apply_fn(codec)(params, digits, t)

  n_masked = (length - 3) * ell
  first = {}
  for steps, want in ((n_masked + 5, n_masked), (5, 5)):
    seen_t.clear()
    res = run("first_hitting", apply_fn, codec, rkey(steps), batch_size=b, seq_len=length,
              num_steps=steps, prompt=jnp.asarray(prompt), prompt_mask=jnp.asarray(pmask),
              temperature=0.8, top_p=0.9)
    tok = np.asarray(res.tokens)
    assert int(res.nfe) == want
    assert tok.min() >= 0 and tok.max() < v
    np.testing.assert_array_equal(tok[pmask], prompt[pmask])
    np.testing.assert_array_equal(codec.encode(tok), np.asarray(res.digits))
    ts = np.stack(seen_t)                                          # [events, B]
    assert ts.shape == (want, b)
    assert np.all(np.diff(ts, axis=0) <= 1e-6) and ts.min() >= EPS and ts.max() <= 1.0
    first[steps] = ts[0]
  # Exact events: the first reveal level is u^(1/n), mean n / (n + 1) (= t, linear);
  # sd ~ 0.045 per sequence.  With a budget of 5 the first event reveals
  # ceil(21 / 5) = 5 digits: the 5th largest of 21 uniforms, mean 17 / 22.
  assert abs(float(np.mean(first[n_masked + 5])) - n_masked / (n_masked + 1)) < 0.07
  assert abs(float(np.mean(first[5])) - 17 / 22) < 0.12


# --------------------------------------------------------------------------- punt & co.
EXACT_LIMITS = [
    ("punt", dict(punt_eps=0.0)),
    ("punt", dict(punt_eps=0.0, punt_mode="batched")),
    ("punt", dict(punt_eps=math.inf, punt_max_candidates=1)),
    ("eb", dict(eb_gamma=0.0)),
    ("fast_dllm", dict(fast_dllm_threshold=1.5)),
]


@pytest.mark.parametrize("name,kw", EXACT_LIMITS, ids=["punt0", "punt0_batched", "punt_k1",
                                                       "eb0", "fast_dllm_gt1"])
def test_parallel_samplers_exact_limit(name, kw):
  v, length = 3, 3
  codec = PrimeCodec.create(v, 1)
  p = random_joint(np.random.default_rng(5), v, length, corr=3.0)
  res = run(name, oracle_apply_fn(p, codec), codec, rkey(3), batch_size=N_DRAWS,
            seq_len=length, num_steps=length, **kw)
  assert int(res.aux["steps"]) == length                          # one token per step
  assert chi2_pvalue(joint_counts(res.tokens, v), p) > P_MIN


def test_value_dependent_confidence_is_not_exact():
  """Why punt_confidence defaults to max_prob: one-by-one decoding that picks the position
  by p(x^) of the value drawn there is far from the data law (TV ~ 0.25 here)."""
  v, length = 3, 3
  codec = PrimeCodec.create(v, 1)
  p = random_joint(np.random.default_rng(5), v, length, corr=3.0)
  res = run("punt", oracle_apply_fn(p, codec), codec, rkey(3), batch_size=N_DRAWS,
            seq_len=length, num_steps=length, punt_eps=0.0, punt_confidence="prob")
  assert chi2_pvalue(joint_counts(res.tokens, v), p) < 1e-8


@pytest.mark.parametrize("ell,v", [(1, 3), (2, 4)])
def test_confidence_left_to_right_is_exact(ell, v):
  """block_len=1 orders by position only, so one token per step samples the chain rule
  exactly even with the value-dependent 'prob' score (which alone is far from exact)."""
  length = 3
  codec = PrimeCodec.create(v, ell)
  p = random_joint(np.random.default_rng(5), v, length, corr=3.0)
  res = run("confidence", safe_oracle(p, codec), codec, rkey(3), batch_size=N_DRAWS,
            seq_len=length, num_steps=length, confidence="prob", block_len=1)
  assert chi2_pvalue(joint_counts(res.tokens, v), p) > P_MIN
  free = run("confidence", safe_oracle(p, codec), codec, rkey(3), batch_size=N_DRAWS,
             seq_len=length, num_steps=length, confidence="prob", block_len=0)
  assert chi2_pvalue(joint_counts(free.tokens, v), p) < 1e-8


def _left_context_probe(codec, block_len):
  """A model that says 0 where every token left of the position's block is revealed, 1
  elsewhere, and is most confident at the right end: only block-by-block, left-to-right
  decoding yields all zeros."""
  def apply_fn(params, digits, t, *, train=False, rng=None):
    del params, t, train, rng
    masked = jnp.any(digits == codec.mask_id, -1)                              # [B, L]
    start = (jnp.arange(digits.shape[1]) // block_len) * block_len              # block start
    masked_before = jnp.cumsum(masked, -1) - masked                            # strictly left
    left_masked = masked_before[:, start] > 0
    sharp = 2.0 + jnp.arange(digits.shape[1], dtype=jnp.float32)              # right: surer
    want = jnp.where(left_masked, 1, 0)
    return jax.nn.one_hot(want, codec.vocab_size) * sharp[None, :, None]
  return apply_fn


@pytest.mark.parametrize("block_len,steps", [(1, 8), (2, 4), (4, 2)])
def test_confidence_blocks_go_left_to_right(block_len, steps):
  length, v = 8, 4
  codec = PrimeCodec.create(v, 1)
  kw = dict(batch_size=64, seq_len=length, num_steps=steps, confidence="max_prob",
            temperature=1e-3)
  probe = _left_context_probe(codec, block_len)
  res = run("confidence", probe, codec, rkey(1), block_len=block_len, **kw)
  np.testing.assert_array_equal(np.asarray(res.tokens), 0)
  free = run("confidence", probe, codec, rkey(1), block_len=0, **kw)
  assert np.all(np.asarray(free.tokens)[:, -1] == 1)     # by confidence: right end first
  same = run("confidence", random_apply_fn(codec), codec, rkey(2), block_len=length, **kw)
  base = run("confidence", random_apply_fn(codec), codec, rkey(2), block_len=0, **kw)
  np.testing.assert_array_equal(np.asarray(same.tokens), np.asarray(base.tokens))


def test_punt_prime_exact_limit_and_coupled_tokens():
  # Prime, L = 2: strict PUNT is exact.
  codec = PrimeCodec.create(4, 2)
  p = random_joint(np.random.default_rng(8), 4, 2, corr=3.0)
  res = run("punt", oracle_apply_fn(p, codec), codec, rkey(4), batch_size=N_DRAWS, seq_len=2,
            num_steps=2, punt_eps=0.0)
  assert chi2_pvalue(joint_counts(res.tokens, 4), p) > P_MIN
  # §3.4 joint: x1 = x0 is never broken (never committed together) at the default
  # tolerance, and the law is exact (the other pairs are exactly independent or caught).
  codec = PrimeCodec.create(3, 1)
  joint = coupled_joint()
  res = run("punt", safe_oracle(joint, codec), codec, rkey(5), batch_size=N_DRAWS, seq_len=4,
            num_steps=4)
  counts = joint_counts(res.tokens, 3)
  assert chi2_pvalue(counts, joint) > P_MIN                         # also asserts x1 == x0
  # power: without the test (eps = inf) PUNT is top-K confidence and breaks the coupling.
  res = run("punt", safe_oracle(joint, codec), codec, rkey(6), batch_size=2000, seq_len=4,
            num_steps=4, punt_eps=math.inf)
  tok = np.asarray(res.tokens)
  assert int(res.aux["steps"]) == 1 and np.mean(tok[:, 0] != tok[:, 1]) > 0.2


def test_punt_call_count():
  v = 5
  codec = PrimeCodec.create(v, 1)
  f = dummy_apply_fn(v)                       # P = Q exactly: nothing is ever dropped
  kw = dict(batch_size=1, seq_len=8, num_steps=20, punt_eps=0.0)
  res = run("punt", f, codec, rkey(0), **kw)
  assert int(res.aux["steps"]) == 1 and int(res.nfe) == 1 + 3         # 1 + ceil(log2 8)
  res = run("punt", f, codec, rkey(0), punt_max_candidates=3, **kw)   # |C| = 3, 3, 2
  assert int(res.aux["steps"]) == 3 and int(res.nfe) == 3 + 3 + 2
  res = run("punt", f, codec, rkey(0), punt_mode="batched", **kw)
  assert int(res.aux["steps"]) == 1 and int(res.nfe) == 2
  res = run("punt", f, codec, rkey(0), punt_max_candidates=1, **kw)   # one by one
  assert int(res.aux["steps"]) == 8 and int(res.nfe) == 8
  # the step cap: the last allowed step commits everything (and tests nothing)
  codec = PrimeCodec.create(3, 1)
  oracle = oracle_apply_fn(random_joint(np.random.default_rng(0), 3, 4), codec)
  res = run("punt", oracle, codec, rkey(1), batch_size=4, seq_len=4, num_steps=2, punt_eps=0.0)
  assert int(res.aux["steps"]) == 2 and int(res.nfe) == 1 + 2 + 1
  assert np.asarray(res.tokens).min() >= 0


@pytest.mark.parametrize("name", NEW)
def test_valid_ids_and_fixed_prompt(name):
  """No mask id, no invalid code (ell = 3, V = 20: 7 invalid codes), prompt and infill fixed."""
  v, ell, length, b = 20, 3, 10, 6
  codec = PrimeCodec.create(v, ell)
  rng = np.random.default_rng(2)
  prompt = rng.integers(0, v, size=(b, length)).astype(np.int32)
  pmask = rng.random((b, length)) < 0.3
  pmask[:, 0] = True
  extra = dict(remdm=dict(remdm_eta=0.1), self_correct=dict(correction_caps=(2, 2, 1)))
  res = run(name, random_apply_fn(codec, scale=0.3), codec, rkey(7), batch_size=b,
            seq_len=length, num_steps=6, prompt=jnp.asarray(prompt),
            prompt_mask=jnp.asarray(pmask), temperature=0.9, top_k=8, top_p=0.95,
            **extra.get(name, {}))
  tok, dig = np.asarray(res.tokens), np.asarray(res.digits)
  assert tok.min() >= 0 and tok.max() < v
  assert dig.max() < codec.base
  np.testing.assert_array_equal(codec.encode(tok), dig)
  np.testing.assert_array_equal(tok[pmask], prompt[pmask])
  assert int(res.nfe) >= 1 and int(res.idle_steps) >= 0


# --------------------------------------------------------------------------- self-correction
def test_self_correct_zero_caps_is_maskgit():
  codec = PrimeCodec.create(20, 2)
  f = random_apply_fn(codec, seed=3)
  kw = dict(batch_size=4, seq_len=12, num_steps=10, temperature=0.9)
  base = run("maskgit", f, codec, rkey(11), **kw)
  assert int(base.nfe) == 10
  for score in ("raw", "probe"):
    sc = run("self_correct", f, codec, rkey(11), correction_caps=(0, 0, 0),
             correction_score=score, **kw)
    np.testing.assert_array_equal(np.asarray(sc.tokens), np.asarray(base.tokens))
    assert int(sc.nfe) == int(base.nfe) and int(sc.aux["remasked"]) == 0
  sc = run("self_correct", f, codec, rkey(11), **kw)               # default caps: it acts
  assert int(sc.nfe) == 10 and int(sc.aux["remasked"]) > 0


def test_self_correct_schedule_invariants():
  v, ell, length, b, big_t = 20, 2, 12, 8, 10
  codec = PrimeCodec.create(v, ell)
  pmask = np.zeros((b, length), bool)
  pmask[:, :2] = True
  prompt = np.full((b, length), 3, np.int32)
  caps, phases = (3, 2, 1), (0.4, 0.6, 0.8)
  res = run("self_correct", random_apply_fn(codec, seed=1), codec, rkey(12), batch_size=b,
            seq_len=length, num_steps=big_t, prompt=jnp.asarray(prompt),
            prompt_mask=jnp.asarray(pmask), correction_caps=caps, correction_phases=phases,
            return_trajectory=True)
  states = np.concatenate([np.asarray(res.trajectory), np.asarray(res.digits)[None]], 0)
  masked = np.any(states == codec.mask_id, -1)                     # [T+1, B, L]
  m0 = length - 2
  t = 1.0 - np.arange(big_t + 1) * (1.0 - EPS) / big_t
  total = 0
  for s in range(big_t):
    keep = 0 if s == big_t - 1 else min(max(int(np.floor(m0 * t[s + 1])), 1), m0)
    assert np.all(masked[s + 1].sum(-1) == keep), s               # the MaskGIT count schedule
    remasked = (~masked[s] & masked[s + 1]).sum(-1)                # decoded -> masked
    r = s / big_t
    cap = 0 if r < phases[0] else caps[sum(r >= p for p in phases) - 1]
    if not phases[0] * big_t < s < big_t - 1:
      cap = 0
    assert np.all(remasked <= min(cap, keep)), s
    total += remasked.sum()
  assert total == int(res.aux["remasked"]) > 0
  assert not np.any(masked[:, pmask])                               # prompts never re-masked


@pytest.mark.parametrize("score", ["raw", "probe"])
def test_self_correct_fixes_a_corrupted_token(score):
  """Position 0 is committed first as token 3 (the model is sure of it early on, t > 0.85:
  steps 0 and 1); later the model gives 3 almost no probability there."""
  v, length, big_t = 4, 8, 10
  codec = PrimeCodec.create(v, 1)

  def apply_fn(params, digits, t, *, train=False, rng=None):
    tok = digits[..., 0]
    alone = t > 0.85                                                 # [B]
    good = jnp.where(jnp.arange(v) == 1, 10.0, 0.0)
    first = jnp.where(jnp.arange(v) == 3, 30.0, 0.0)
    bad0 = jnp.where(jnp.arange(v) == 3, -20.0, 0.0) + good
    row0 = jnp.where(alone[:, None], first, bad0)                    # [B, V]
    rest = jnp.broadcast_to(good, (tok.shape[0], length - 1, v))
    return jnp.concatenate([row0[:, None], rest], axis=1)

  kw = dict(batch_size=4, seq_len=length, num_steps=big_t, maskgit_select_temp=0.0)
  base = run("maskgit", apply_fn, codec, rkey(0), **kw)
  assert np.all(np.asarray(base.tokens)[:, 0] == 3)                 # the mistake stays
  res = run("self_correct", apply_fn, codec, rkey(0), correction_caps=(1, 1, 1),
            correction_score=score, correction_probe_frac=1.0, **kw)
  tok = np.asarray(res.tokens)
  assert np.all(tok[:, 0] == 1), tok                                # re-masked, then fixed
  assert int(res.aux["remasked"]) >= 4
  extra = 0 if score == "raw" else int(res.nfe) - big_t
  assert int(res.nfe) == big_t + extra and (score == "raw" or extra > 0)


# --------------------------------------------------------------------------- remdm
@pytest.mark.parametrize("ell", [1, 2])
def test_remdm_zero_sigma_is_ancestral(ell):
  codec = PrimeCodec.create(12, ell)
  f = random_apply_fn(codec, seed=ell)
  prompt = jnp.full((9,), -1, jnp.int32).at[2].set(4)
  kw = dict(batch_size=4, seq_len=9, num_steps=24, prompt=prompt, top_p=0.9,
            return_trajectory=True)
  a = run("ancestral", f, codec, rkey(13), **kw)
  r = run("remdm", f, codec, rkey(13), remdm_schedule="cap", remdm_eta=0.0, **kw)
  np.testing.assert_array_equal(np.asarray(a.trajectory), np.asarray(r.trajectory))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(r.tokens))
  assert int(a.nfe) == int(r.nfe) and int(a.idle_steps) == int(r.idle_steps)
  assert int(r.aux["remasked"]) == 0


class _PositionSchedule(Schedule):
  """A stand-in per-position schedule (the interface ancestral_sample reads):
  alpha_i(t) = 1 - t**w_i, population alpha = 1 - t."""
  per_position = True

  def __init__(self, length):
    self.w = jnp.linspace(0.5, 2.0, length)

  def alpha(self, t):
    return 1.0 - jnp.asarray(t, jnp.float32)

  def mask_prob(self, t):
    return 1.0 - self.alpha(t)

  def position_alpha_fn(self, params, length):
    return lambda t: 1.0 - jnp.asarray(t, jnp.float32) ** self.w[:length]


def test_remdm_per_position_schedule():
  codec = PrimeCodec.create(12, 2)
  f = random_apply_fn(codec, seed=5)
  sched = _PositionSchedule(9)
  kw = dict(codec=codec, schedule=sched, batch_size=4, seq_len=9, num_steps=16, eps=EPS,
            return_trajectory=True)
  a = jax.jit(functools.partial(sampling.ancestral_sample, f, **kw))(None, rkey(16))
  r = jax.jit(functools.partial(sampling.remdm_sample, f, remdm_eta=0.0, **kw))(None, rkey(16))
  np.testing.assert_array_equal(np.asarray(a.trajectory), np.asarray(r.trajectory))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(r.tokens))
  r = jax.jit(functools.partial(sampling.remdm_sample, f, remdm_eta=0.2, **kw))(None, rkey(16))
  assert int(r.aux["remasked"]) > 0 and np.asarray(r.tokens).min() >= 0
  with pytest.raises(ValueError, match="loop"):
    sampling.remdm_sample(f, None, rkey(0), remdm_schedule="loop", **kw)


@pytest.mark.parametrize("schedule,eta", [("cap", 0.3), ("rescale", 0.6), ("loop", 0.1)])
def test_remdm_single_token_exact(schedule, eta):
  """("conf" is left out: its re-mask weights depend on the drawn values' probabilities,
  so it is not exact even for one token.)"""
  v, ell = 6, 2
  codec = PrimeCodec.create(v, ell)
  p = random_joint(np.random.default_rng(30), v, 1)
  res = run("remdm", oracle_apply_fn(p, codec), codec, rkey(14), batch_size=N_DRAWS,
            seq_len=1, num_steps=8, remdm_schedule=schedule, remdm_eta=eta)
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < v
  assert int(res.aux["remasked"]) > 100
  assert chi2_pvalue(joint_counts(tok, v), p) > P_MIN


@pytest.mark.parametrize("schedule,eta", [("cap", 0.1), ("rescale", 0.5), ("loop", 0.1)])
def test_remdm_keeps_mask_marginals(schedule, eta):
  v, length, b, big_t = 5, 16, 1000, 10
  codec = PrimeCodec.create(v, 1)
  res = run("remdm", dummy_apply_fn(v), codec, rkey(15), batch_size=b, seq_len=length,
            num_steps=big_t, remdm_schedule=schedule, remdm_eta=eta, return_trajectory=True)
  assert int(res.aux["remasked"]) > 100
  frac = np.mean(np.asarray(res.trajectory) == codec.mask_id, axis=(1, 2, 3))  # [T+1]
  t = 1.0 - np.arange(big_t + 1) * (1.0 - EPS) / big_t
  alpha = remdm_alpha(linear(), schedule, 0.55, 0.05, 0.9)
  want = 1.0 - np.asarray(alpha(jnp.asarray(t, jnp.float32)))
  se = np.sqrt(np.maximum(want * (1 - want), 1e-4) / (b * length))
  assert np.all(np.abs(frac[1:] - want[1:]) < 5 * se[1:]), (frac, want)


# --------------------------------------------------------------------------- registry / config
def test_registry_and_options_passthrough():
  for name in NEW + ["ancestral", "confidence", "ar"]:
    assert name in sampling.SAMPLERS
  from mdm_jax.sampling import generate as sample_lib
  from mdm_jax.configs.base import get_base_config
  sc = get_base_config().sampling
  opts = sample_lib.sampler_options(sampling.get_sampler("punt"), sc)
  assert set(opts) == {"punt_eps", "punt_max_candidates", "punt_divergence", "punt_confidence",
                       "punt_mode"}
  assert sample_lib.sampler_options(sampling.get_sampler("ancestral"), sc) == {}
  opts = sample_lib.sampler_options(sampling.get_sampler("self_correct"), sc)
  assert opts["correction_caps"] == (16.0, 8.0, 4.0) and "remdm_eta" not in opts


@pytest.mark.parametrize("key,value,words", [
    ("sampler", "nope", "registered sampler"),
    ("sampler", "ar", "objective='ar'"),
    ("punt_mode", "parallel", "sequential"),
    ("punt_eps", -1.0, "punt_eps"),
    ("correction_phases", (0.8, 0.6, 0.9), "correction_phases"),
    ("correction_caps", (1.0, 2.0), "correction_caps"),
    ("remdm_schedule", "sometimes", "remdm_schedule"),
    ("remdm_t_on", 0.01, "t_off < t_on"),
    ("block_len", -1, "block_len"),
])
def test_config_validation(key, value, words):
  from mdm_jax.configs.base import get_base_config
  c = get_base_config()
  validate_config(c)
  c.sampling[key] = value
  with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
    validate_config(c)


# --------------------------------------------------------------------------- end to end
# Subprocesses share a persistent XLA cache, so the sampler table re-uses the programs the
# --mode=sample runs compiled (same sampler, T and shapes): the whole end-to-end run costs
# one training run plus one compile per sampler.
def _cli(args, cache_dir, module="mdm_jax.main", timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


CFG = "--config=configs/shakespeare_prime.py:tiny"


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("samplers_tiny"))
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  _cli([CFG, f"--workdir={wd}", "--config.checkpoint.async_save=False",
        "--config.sampling.num_steps=4"], cache)
  return wd, cache


def test_cli_every_sampler_and_sampler_table(tiny_workdir):
  wd, cache = tiny_workdir
  names = [n for n in sampling.SAMPLERS.names() if n != "ar"]
  # The CLI for two samplers with extra outputs; the table script below runs every
  # sampler from the same checkpoint in one process (each subprocess costs ~10 s).
  cli_names = ["punt", "self_correct"]

  def sample(name):
    out = _cli([CFG, f"--workdir={wd}", "--mode=sample", "--sample_steps=4",
                f"--config.sampling.sampler={name}"], cache).stdout
    return json.loads(out[out.index("{"):])

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(cli_names, pool.map(sample, cli_names)))
  for name, st in results.items():
    assert st["sampler"] == name and st["num_steps"] == 4
    for k in ("nfe", "wall_time_s", "tokens_per_s", "idle_fraction", "sample_entropy"):
      assert k in st, (name, k)
    assert st["nfe"] >= 1 and st["tokens_per_s"] > 0 and st["sample_entropy"] > 0
  assert "steps" in results["punt"] and "remasked" in results["self_correct"]
  # Each sampler's run writes a file of its own; the training run's step_30.* stays.
  for name, st in results.items():
    path = os.path.join(wd, "samples", f"step_30-{name}-T4-seed{st['sampling']['seed']}.json")
    saved = json.load(open(path))
    assert saved["sampler"] == name and "sample_entropy" in saved
    assert st["samples_json"] == path
  trained = json.load(open(os.path.join(wd, "samples", "step_30.json")))
  assert trained["sampler"] not in cli_names

  out_json = os.path.join(wd, "table.json")
  proc = _cli([CFG, f"--workdir={wd}", "--steps=4", f"--output={out_json}"], cache,
              module="mdm_jax.benchmarks.sampler_table")
  rows = json.load(open(out_json))["rows"]
  assert [r["sampler"] for r in rows] == names and all(r["T"] == 4 for r in rows)
  for r in rows:
    assert r["NFE"] >= 1 and r["tokens_per_s"] > 0 and r["idle_fraction"] is not None
    if r["sampler"] in results:
      assert r["NFE"] == results[r["sampler"]]["nfe"]        # same seed, same program
  by_name = {r["sampler"]: r for r in rows}
  assert by_name["first_hitting"]["NFE"] == 4 and by_name["maskgit"]["NFE"] == 4
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("| sampler | T | NFE | idle-step fraction | tokens/s")
  assert len(lines) == 2 + len(names)
