"""Samples and the eval bound do not depend on how they were run.

For one seed, every registered sampler gives the same tokens whatever the batch size
(8 rows at once, or two calls of 4 rows 0-3 and 4-7) and the mesh (1 device, or 8
devices over data 2 x fsdp 4, with the batch sharded over both and a parameter
reduction sharded over fsdp); through ``Task.generate`` with the real network
(``row_offset``, data 2 x fsdp 2) too.  The eval
bound of a row is the same for eval batches of 8 and of 4, on 1 device and on 8.  The
float64 draws run where the backend has float64 (the CPU here) and follow their law.

Most checks use a small parametric stand-in network (compiles in about a second); the
real backbone runs the end-to-end checks of one sampler and of the eval bound.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import linear
from mdm_jax.sampling import SAMPLERS, filters, get_sampler
from mdm_jax.sampling.common import row_keys, row_uniform
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import init_state, make_optimizer
from mdm_jax.trainers.steps import evaluate, make_eval_step

VOCAB = 20
MESHES = {"one": (1, 1, 1), "mixed": (2, 4, 1), "both": (2, 2, 1)}
SEED = 3


def _mesh(name):
  shape = MESHES[name]
  c = get_base_config()
  c.mesh.shape = shape
  return shd.make_mesh(c.mesh, devices=jax.devices()[: int(np.prod(shape))])


# ------------------------------------------------------------ a small stand-in network
def _codec(sampler):
  return PrimeCodec(VOCAB, 1, VOCAB) if sampler == "ar" else PrimeCodec(VOCAB, 2, 5)


def _net_params(codec, width=16):
  rng = np.random.default_rng(0)
  return {"emb": jnp.asarray(rng.normal(size=(codec.ell, codec.mask_id + 1, width)), jnp.float32),
          "out": jnp.asarray(rng.normal(size=(width, VOCAB)) * 0.4, jnp.float32)}


def _net(params, digits, t, *, train=False, rng=None):
  """Logits from every digit of every position: batch sharded over (data, fsdp), the
  width (a reduction of the output matmul) over fsdp."""
  del t, train, rng
  digits = jax.lax.with_sharding_constraint(digits, P(("data", "fsdp")))
  h = sum(params["emb"][j][digits[..., j]] for j in range(digits.shape[-1]))     # [B, L, D]
  h = jnp.tanh(h + 0.5 * jnp.mean(h, axis=1, keepdims=True))
  return h @ params["out"]


def _sampler_kwargs(sampler, codec, n):
  if sampler == "ar":
    return dict(vocab_size=VOCAB, batch_size=n, seq_len=8, bos_id=codec.mask_id)
  kw = dict(codec=codec, schedule=linear(), batch_size=n, seq_len=8, num_steps=4)
  if sampler == "self_correct":
    kw["correction_caps"] = (2.0, 1.0, 1.0)      # it re-masks at this size
  return kw


def _direct(sampler, mesh_name="one", n=8, row_offset=0):
  codec = _codec(sampler)
  mesh = _mesh(mesh_name)
  params = _net_params(codec)
  params = {"emb": jax.device_put(params["emb"], NamedSharding(mesh, P(None, None, "fsdp"))),
            "out": jax.device_put(params["out"], NamedSharding(mesh, P("fsdp", None)))}
  fn = jax.jit(functools.partial(get_sampler(sampler), _net,
                                 **_sampler_kwargs(sampler, codec, n)))
  with jax.set_mesh(mesh):
    res = fn(params, row_keys(jax.random.key(SEED), n, row_offset))
  return np.asarray(res.tokens)


_reference = functools.lru_cache(maxsize=None)(_direct)     # 1 device, 8 rows


@pytest.mark.parametrize("sampler", sorted(SAMPLERS.names()))
def test_samples_do_not_depend_on_the_batch(sampler):
  """8 rows at once == rows 0-3 and rows 4-7 drawn in two calls (global row ids)."""
  full = _reference(sampler)
  halves = np.concatenate([_direct(sampler, n=4, row_offset=0),
                           _direct(sampler, n=4, row_offset=4)])
  assert full.shape == (8, 8) and np.all((full >= 0) & (full < VOCAB))
  np.testing.assert_array_equal(halves, full)
  assert len({tuple(r) for r in full}) > 1        # the rows are not one row repeated


@pytest.mark.parametrize("sampler", sorted(SAMPLERS.names()))
def test_samples_do_not_depend_on_the_mesh(sampler):
  """1 device == 8 devices over (data 2, fsdp 4): the batch sharded over both axes and the
  network's output reduction over fsdp (one mesh with both axes, one compile)."""
  np.testing.assert_array_equal(_direct(sampler, "mixed"), _reference(sampler))


# ------------------------------------------------------------ the real backbone
def _config(objective="diffusion", mesh_shape=(1, 1, 1)):
  c = get_base_config()
  c.objective = objective
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.cond_dim = 1, 32, 2, 16
  c.model.mlp_ratio = 2
  c.data.seq_len = 8
  c.prime.ell = 1 if objective == "ar" else 2
  c.sampling.num_steps = 4
  c.sampling.num_samples = 8
  c.sampling.masking_picture = False
  c.sampling.correction_caps = (2.0, 1.0, 1.0)      # self_correct re-masks at this size
  c.sampling.seed = 3
  c.eval.num_time_samples = 2
  c.mesh.shape = mesh_shape
  return c


@functools.lru_cache(maxsize=None)
def _run(objective, mesh_name):
  """(config, task, params, mesh, rules, shardings) for a mesh of MESHES."""
  shape = MESHES[mesh_name]
  c = _config(objective, shape)
  mesh = shd.make_mesh(c.mesh, devices=jax.devices()[: int(np.prod(shape))])
  rules = shd.logical_rules(c.mesh)
  task = build_task(c, vocab_size=VOCAB)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, seed=0)
  return c, task, state.params, mesh, rules, shardings


def _sample(mesh_name, n=8, row_offset=0, precision="float32", sampler="ancestral"):
  c, task, params, mesh, rules, _ = _run("diffusion", mesh_name)
  c = c.copy_and_resolve_references()
  c.sampling.precision = precision
  res, _ = task.generate(params, c, sampler=sampler, num_samples=n, mesh=mesh, rules=rules,
                         row_offset=row_offset)
  return np.asarray(res.tokens)


def test_generate_with_row_offset_on_a_mesh():
  """Task.generate with the real network: 8 samples on 1 device == two calls of 4
  (row_offset 0 and 4) on 4 devices over (data 2, fsdp 2); another offset, other rows."""
  full = _sample("one")
  assert full.shape == (8, 8) and np.all((full >= 0) & (full < VOCAB))
  np.testing.assert_array_equal(np.concatenate([_sample("both", 4, 0), _sample("both", 4, 4)]),
                                full)
  assert not np.array_equal(_sample("both", 4, 2), full[:4])


def test_row_keys_are_fold_ins_of_the_global_row():
  key = jax.random.key(7)
  rows = row_keys(key, 4, row_offset=5)
  want = [jax.random.key_data(jax.random.fold_in(key, 5 + i)) for i in range(4)]
  np.testing.assert_array_equal(jax.random.key_data(rows), np.stack(want))
  assert row_keys(rows, 4) is rows                       # per-row keys pass through
  with pytest.raises(ValueError, match="per-row keys"):
    row_keys(rows, 3)
  u = row_uniform(rows, (4, 3))
  np.testing.assert_array_equal(u[1:], row_uniform(rows[1:], (3, 3)))   # row b from key b


def _eval(mesh_name, batch_size, rows):
  c, task, params, mesh, rules, shardings = _run("diffusion", mesh_name)
  eval_step = make_eval_step(task, c, mesh, rules, shardings.params)
  batches = [{"tokens": rows[i:i + batch_size]} for i in range(0, len(rows), batch_size)]
  return evaluate(eval_step, task, params, batches, mesh, seed=11)


def test_eval_bound_does_not_depend_on_the_eval_batch():
  """Per row: task.bound with global row ids gives the same value in batches of 8 and 4;
  ``evaluate`` gives the same summary for batch 8 on 1 device and 4 on 4 devices."""
  rows = np.random.default_rng(0).integers(0, VOCAB, (8, 8)).astype(np.int32)
  _, task, params, _, _, _ = _run("diffusion", "one")
  key = jax.random.key(11)
  bound = jax.jit(lambda p, t, r: task.bound(p, t, key, 2, row_ids=r))
  full = np.asarray(bound(params, rows, np.arange(8)))
  halves = np.concatenate([np.asarray(bound(params, rows[:4], np.arange(4))),
                           np.asarray(bound(params, rows[4:], np.arange(4, 8)))])
  np.testing.assert_allclose(halves, full, rtol=1e-6)
  # The rows' own ids matter: row 0 evaluated as row 4 gets other times and masks.
  assert not np.allclose(np.asarray(bound(params, rows[:4], np.arange(4, 8))), full[:4])
  ref = _eval("one", 8, rows)
  got = _eval("both", 4, rows)          # batches of 4 over 4 devices (data 2, fsdp 2)
  np.testing.assert_allclose(got["nll"], ref["nll"], rtol=1e-6)
  assert got["eval_tokens"] == ref["eval_tokens"] == 64
  np.testing.assert_allclose(ref["nll"], full.sum() / 64, rtol=1e-5)   # the same per-row values


def test_float64_sampling_runs_and_is_float64():
  """precision=float64 samples with float64 draws (valid tokens, batch-invariant too)."""
  full = _sample("one", precision="float64")
  assert full.shape == (8, 8) and np.all((full >= 0) & (full < VOCAB))
  halves = np.concatenate([_sample("one", 4, 0, "float64"), _sample("one", 4, 4, "float64")])
  np.testing.assert_array_equal(halves, full)
  with filters.sampling_precision("float64"):
    assert filters.draw_dtype() == np.float64
    u = row_uniform(row_keys(jax.random.key(0), 2), (2, 3))
    assert u.dtype == np.float64
  assert filters.draw_dtype() == np.float32


def test_float64_categorical_follows_its_law():
  """The float64 Gumbel draw: a chi-square test against the categorical it draws from,
  including a category of probability 1e-9 that must (almost) never appear."""
  p = np.array([0.5, 0.3, 0.2 - 1e-9, 1e-9])
  n = 20000
  with filters.sampling_precision("float64"):
    draw = jax.jit(lambda k: filters.sample_categorical(
        row_keys(k, n), np.broadcast_to(np.log(p), (n, 4))))
    x = np.asarray(draw(jax.random.key(1)))
  counts = np.bincount(x, minlength=4)
  assert counts[3] == 0
  _, pval = stats.chisquare(counts[:3], n * p[:3] / p[:3].sum())
  assert pval > 1e-4


def test_precision_errors(monkeypatch):
  with pytest.raises(ConfigError, match="float32"):
    filters.check_precision("float16")

  class Tpu:
    platform = "tpu"

  monkeypatch.setattr(filters.jax, "devices", lambda *a: [Tpu()])
  with pytest.raises(ConfigError, match="needs a backend with float64"):
    with filters.sampling_precision("float64"):
      pass
  c = _config()
  c.sampling.precision = "half"
  with pytest.raises(ConfigError, match="sampling.precision"):
    build_task(c, vocab_size=VOCAB)
