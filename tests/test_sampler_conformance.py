"""Every registered sampler keeps its contract (``mdm_jax.sampling.registry``).

For each entry of ``SAMPLERS`` (the built-ins and anything registered when the file
runs), with its options bound from the base config and its keyword arguments built by
a real task (``sampler_kwargs``), on a tiny exact model (a flax module returning the
same per-position logits whatever it sees, so the positions are independent and the
model's law is the product of its marginals):

* the ``SampleResult`` has the documented shapes and dtypes, and tokens in range;
* ``nfe`` lies in the bounds the entry claims for its ``num_steps``;
* one seed gives the same tokens twice, another seed different ones;
* where the entry claims exactness for these options, the joint of many samples
  matches the model's law (chi-square).

Besides: ``config.sampling`` becomes a frozen spec whose bad values are ConfigErrors
naming the key, and the jitted samplers sit in a bounded cache keyed by value.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax import sampling
from mdm_jax.configs.base import get_base_config
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import linear
from mdm_jax.sampling import generate
from mdm_jax.tasks import build_task
from tests.test_sampling import P_MIN, chi2_pvalue, joint_counts, rkey

V, L, T, B = 3, 3, 4, 3000


class ConstLogits(nn.Module):
  """logits[b, l] = table[l] for every input: an exact model of independent positions."""
  table: tuple

  @nn.compact
  def __call__(self, digits, t, train=False, rng=None):
    del t, train, rng
    table = jnp.asarray(self.table, jnp.float32)                       # [L, V]
    return jnp.broadcast_to(table, digits.shape[:2] + table.shape[-1:])


def _marginals(seed=0):
  rng = np.random.default_rng(seed)
  return rng.dirichlet(np.ones(V) * 2.0, size=L)                     # [L, V]


def _model(p):
  return ConstLogits(table=tuple(tuple(float(x) for x in row) for row in np.log(p)))


def _config(sampler):
  c = get_base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.cond_dim = 1, 16, 2, 8
  c.data.seq_len, c.prime.ell = L, 1
  c.sampling.sampler = sampler
  return c


@pytest.fixture(scope="module")
def tasks():
  """A diffusion task and an AR task of the tiny shapes (their networks are not used)."""
  out = {}
  for objective in ("diffusion", "ar"):
    c = _config("ancestral")
    c.objective = objective
    out[objective] = build_task(c, vocab_size=V)
  return out


def _kwargs(tasks, name, c):
  """The sampler's keyword arguments as ``TokenTask.generate`` builds them."""
  sc = c.sampling
  for task in (tasks["diffusion"], tasks["ar"]):
    try:
      kw = task.sampler_kwargs(name, c, B, L, T)
    except ConfigError:               # this task does not run that sampler
      continue
    kw.update(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p))
    kw.update(sampling.bind_options(name, sc).kwargs())
    return task, kw
  raise AssertionError(f"no task builds keyword arguments for sampler {name!r}")


@pytest.mark.parametrize("name", sampling.SAMPLERS.names())
def test_every_sampler_keeps_its_contract(tasks, name):
  c = _config(name)
  entry = sampling.sampler_entry(name)
  options = entry.bind(c.sampling)
  assert isinstance(options, entry.options)
  hash(options)                                         # frozen: part of the cache key
  task, kw = _kwargs(tasks, name, c)
  p = _marginals()
  fn = generate.jitted_sampler(_model(p).apply, name, kw)
  res = jax.block_until_ready(fn({}, rkey(1)))
  ell = task.codec.ell if name != "ar" else 1

  # shapes and dtypes
  assert res.tokens.shape == (B, L) and res.tokens.dtype == jnp.int32, name
  assert res.digits.shape == (B, L, ell) and res.digits.dtype == jnp.int32, name
  assert np.shape(res.nfe) == () and jnp.asarray(res.nfe).dtype == jnp.int32, name
  assert np.shape(res.idle_steps) == (), name
  assert isinstance(res.num_steps, int) and res.num_steps >= 1, name
  tok = np.asarray(res.tokens)
  assert tok.min() >= 0 and tok.max() < V, name

  # NFE within the claimed bounds for num_steps = T and L * ell generated elements
  lo, hi = entry.nfe(T, L * ell, options)
  assert 1 <= lo <= int(res.nfe) <= hi, (name, int(res.nfe), lo, hi)

  # determinism: same seed, same tokens; another seed, other tokens
  again = fn({}, rkey(1))
  np.testing.assert_array_equal(np.asarray(again.tokens), tok, err_msg=name)
  other = fn({}, rkey(2))
  assert not np.array_equal(np.asarray(other.tokens), tok), name

  # the law, where the sampler claims exactness for these options
  if entry.is_exact(options):
    law = np.einsum("a,b,c->abc", *p)
    assert chi2_pvalue(joint_counts(np.concatenate([tok, np.asarray(other.tokens)]), V),
                       law) > P_MIN, name


def test_the_law_check_can_fail():
  """The chi-square above tells a biased sampler from an exact one: ``confidence`` with
  the value-dependent "prob" (which it does not claim exact) is caught."""
  c = _config("confidence")
  entry = sampling.sampler_entry("confidence")
  assert not entry.is_exact(entry.bind(c.sampling))
  p = np.array([[0.6, 0.3, 0.1]] * L)
  # one token per step, the one whose drawn value is most probable: biased towards 0
  kw = dict(codec=PrimeCodec.create(V, 1), schedule=linear(), batch_size=B, seq_len=L,
            num_steps=L, eps=1e-3, confidence="prob")
  fn = generate.jitted_sampler(_model(p).apply, "confidence", kw)
  tok = np.asarray(fn({}, rkey(3)).tokens)
  assert chi2_pvalue(joint_counts(tok, V), np.einsum("a,b,c->abc", *p)) < 1e-6


@pytest.mark.parametrize("key,value,words", [
    ("punt_eps", "a lot", "punt_eps.*number"),
    ("punt_max_candidates", 1.5, "punt_max_candidates.*integer"),
    ("punt_mode", "parallel", "punt_mode.*sequential"),
    ("correction_caps", "16", "correction_caps.*sequence"),
])
def test_options_spec_names_a_bad_key(key, value, words):
  sc = get_base_config().sampling.to_dict()     # a plain dict: any value gets through
  sc[key] = value
  name = "self_correct" if key.startswith("correction") else "punt"
  with pytest.raises(ConfigError, match=f"config.sampling.{words}"):
    sampling.bind_options(name, sc)


@dataclasses.dataclass(frozen=True)
class _KnobOptions(sampling.SamplerOptions):
  my_knob: float = 0.5


def test_a_task_is_built_with_its_samplers_options_checked():
  """A user's sampler declares a key no other check knows; building the task checks it."""
  sampling.SAMPLERS.register("knob_test", options=_KnobOptions, takes=("eps",))(
      sampling.ancestral_sample)
  try:
    c = _config("knob_test")
    c.sampling.my_knob = "high"
    with pytest.raises(ConfigError, match="config.sampling.my_knob='high' must be a number"):
      build_task(c, vocab_size=V)
    c = _config("knob_test")
    c.sampling.my_knob = 2
    assert build_task(c, vocab_size=V).seq_len == L
    assert sampling.bind_options("knob_test", c.sampling) == _KnobOptions(my_knob=2.0)
  finally:
    sampling.SAMPLERS.unregister("knob_test")
  assert "knob_test" not in sampling.SAMPLERS
  c = _config("punt")
  # every key the built-in options declare is a config.sampling key (so a config sets it)
  declared = {f for n in sampling.SAMPLERS.names()
              for f in sampling.sampler_entry(n).options.__dataclass_fields__}
  assert declared == set(sampling.SAMPLER_OPTIONS) and declared <= set(c.sampling)
  # the options of punt are exactly its keys, as a dict of plain values
  assert sampling.sampler_options("punt", c.sampling) == dict(
      punt_eps=0.05, punt_max_candidates=0, punt_divergence="kl", punt_confidence="max_prob",
      punt_mode="sequential")


def test_cache_is_keyed_by_value_and_bounded(tasks):
  c = _config("ancestral")
  _, kw = _kwargs(tasks, "ancestral", c)
  p = _marginals()
  generate._SAMPLERS_CACHE.clear()          # pylint: disable=protected-access
  a = generate.jitted_sampler(_model(p).apply, "ancestral", kw)
  b = generate.jitted_sampler(_model(p).apply, "ancestral", kw)    # an equal, new model
  assert a is b
  other = generate.jitted_sampler(_model(_marginals(1)).apply, "ancestral", kw)
  assert other is not a
  for seed in range(2, 2 + 2 * generate.CACHE_SIZE):                # many models: bounded
    generate.jitted_sampler(_model(_marginals(seed)).apply, "ancestral", kw)
  assert len(generate._SAMPLERS_CACHE) == generate.CACHE_SIZE   # pylint: disable=protected-access
  assert generate.jitted_sampler(_model(p).apply, "ancestral", kw) is not a   # evicted
