"""One train step is the same on every mesh; parameters are sharded as the rules say."""

import jax
import numpy as np
import pytest

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import sharding as shd
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import init_state
from mdm_jax.trainers.state import make_optimizer
from mdm_jax.trainers.steps import make_train_step
def _config(mesh_shape, micro=1):
  c = get_base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.cond_dim = 2, 64, 4, 16
  c.model.mlp_ratio = 2
  c.data.seq_len = 16
  c.training.batch_size = 8
  c.training.num_microbatches = micro
  c.training.warmup_steps = 1
  c.prime.ell = 2
  c.mesh.shape = mesh_shape
  return c


def _one_step(mesh_shape, micro=1):
  c = _config(mesh_shape, micro)
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = shd.make_mesh(c.mesh, devices=devices)
  rules = shd.logical_rules(c.mesh)
  task = build_task(c, vocab_size=40)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, seed=0)
  step = make_train_step(task, tx, c, mesh, rules, shardings)
  tokens = np.random.default_rng(0).integers(0, 40, (8, 16)).astype(np.int32)
  with jax.set_mesh(mesh):
    batch = {"tokens": shd.global_batch(tokens, shd.batch_sharding(mesh))}
    new, metrics = step(state, batch)
  return new, jax.device_get(metrics)


def test_step_identical_across_meshes():
  ref_state, ref_m = _one_step((1, 1, 1))
  ref_params = jax.device_get(ref_state.params)
  # One mesh that uses all three axes at once (data 2, fsdp 2, tensor 2): each axis's
  # collectives must leave the step unchanged.  (The microbatching test runs pure data
  # parallelism; tests/test_benchmarks.py compiles (8, 1, 1) and (1, 8, 1).)
  for shape in [(2, 2, 2)]:
    st, m = _one_step(shape)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
                 jax.device_get(st.params), ref_params)
    if shape == (2, 2, 2):
      qkv = st.params["blocks"]["qkv"]          # (layers, embed, 3, heads, kv)
      assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
      shard_shape = qkv.addressable_shards[0].data.shape
      assert shard_shape == (2, 64 // 2, 3, 4 // 2, 16)
      mu = st.opt_state[1][0].mu["blocks"]["mlp_in"]   # optimizer state sharded too
      assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_microbatching_matches_full_batch():
  full_state, full = _one_step((2, 1, 1), micro=1)
  acc_state, acc = _one_step((2, 1, 1), micro=4)
  # Times are stratified over the global batch and masks are drawn per global row,
  # so gradient accumulation gives the same update up to summation order.
  np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-5)
  np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-6),
               jax.device_get(acc_state.params), jax.device_get(full_state.params))


def test_bad_mesh_errors():
  c = _config((3, -1, 1))
  with pytest.raises(ValueError, match="not divisible"):
    shd.make_mesh(c.mesh)
  c = _config((2, 2, 1))
  with pytest.raises(ValueError, match="needs 4 devices"):
    shd.make_mesh(c.mesh)


def _mesh_of(owners, shape):
  """A stand-in with what process_batch_slice reads: the axis sizes and, in mesh order,
  devices owned by the processes ``owners``."""
  import types  # pylint: disable=import-outside-toplevel
  grid = np.empty(len(owners), dtype=object)
  grid[:] = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(owners)]
  return types.SimpleNamespace(shape=dict(zip(("data", "fsdp", "tensor"), shape)),
                               devices=grid.reshape(shape))


def _fake_mesh(shape, order, devices_per_process=2):
  """Devices 0..n-1 (``devices_per_process`` per process) laid out in ``order``."""
  return _mesh_of([i // devices_per_process for i in order], shape)


@pytest.mark.parametrize("shape,order,expected", [
    ((2, 2, 1), (0, 1, 2, 3), [(0, 2), (1, 2)]),     # data across hosts
    ((1, 4, 1), (0, 1, 2, 3), [(0, 2), (1, 2)]),     # FSDP across hosts
    ((1, 2, 2), (0, 1, 2, 3), [(0, 2), (1, 2)]),     # fsdp across, tensor within
    ((1, 2, 2), (0, 2, 3, 1), [(0, 1), (0, 1)]),     # both across: every host holds all rows
    ((1, 1, 4), (0, 1, 2, 3), [(0, 1), (0, 1)]),     # tensor across: the whole batch each
])
def test_process_batch_slice(shape, order, expected):
  mesh = _fake_mesh(shape, order)
  assert [shd.process_batch_slice(mesh, p) for p in (0, 1)] == expected


def test_process_batch_slice_with_scattered_rows_and_refusals():
  # A pod mesh in ICI order: each host's rows are not one block; each loads one slice.
  assert [shd.process_batch_slice(_fake_mesh((1, 4, 1), (0, 2, 1, 3)), p)
          for p in (0, 1)] == [(0, 2), (1, 2)]
  with pytest.raises(ValueError, match="different sizes"):       # 3 rows against 1
    shd.process_batch_slice(_mesh_of([0, 0, 0, 1], (1, 4, 1)), 0)
  with pytest.raises(ValueError, match="overlapping"):           # rows {0, 1} and {1}
    shd.process_batch_slice(_mesh_of([0, 0, 0, 1, 1, 1], (1, 3, 2)), 0)


def test_device_order_builds_the_mesh_in_that_order():
  import ml_collections  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict({"shape": (1, 2, 2), "axes": ("data", "fsdp", "tensor"),
                                 "device_order": (0, 2, 3, 1)})
  devs = jax.devices()[:4]
  mesh = shd.make_mesh(c, devices=devs)
  assert [d.id for d in mesh.devices.flat] == [devs[i].id for i in (0, 2, 3, 1)]
  c.device_order = (0, 1, 1, 2)
  with pytest.raises(ValueError, match="permutation"):
    shd.make_mesh(c, devices=devs)
