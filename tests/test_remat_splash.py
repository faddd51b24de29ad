"""Rematerialisation policies (model.remat) and splash attention (model.attention_impl=splash)."""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mdm_jax.configs.base import get_base_config
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.networks import attention as attn
from mdm_jax.networks import build_model
from mdm_jax.networks.dit import DiTConfig
from mdm_jax.tasks import validate_config


def _cfg(**kw):
  c = get_base_config().model
  c.num_layers, c.d_model, c.num_heads, c.cond_dim = 2, 32, 2, 16
  for k, v in kw.items():
    c[k] = v
  return c


def _loss_and_grads(model_cfg, params=None):
  model = build_model(model_cfg, vocab_size=12, ell=1, base=12)
  digits = jnp.asarray(np.random.default_rng(0).integers(0, 13, (2, 8, 1)))
  t = jnp.asarray([0.3, 0.8])
  if params is None:
    params = nn.unbox(model.init(jax.random.key(0), digits, t))
  # A non-zero head and gates, so every block's gradient is non-zero.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                        params)

  def loss(p):
    return jnp.mean(jnp.square(model.apply(p, digits, t, train=False)))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return params, value, grads


@pytest.mark.parametrize("scan", [True, False])
def test_every_remat_policy_keeps_the_parameters_and_the_gradients(scan):
  """Each policy changes what the backward pass recomputes, never the parameter tree,
  the loss or the gradients."""
  p0, v0, g0 = _loss_and_grads(_cfg(scan_layers=scan, remat="none"))
  shapes = jax.tree.map(jnp.shape, p0)
  # Unrolled, each block is wrapped the same way: three policies cover the wrapping.
  for name in attn.REMAT_POLICIES if scan else ("dots", "attention", "full"):
    p, v, g = _loss_and_grads(_cfg(scan_layers=scan, remat=name))
    assert jax.tree.map(jnp.shape, p) == shapes, name
    np.testing.assert_allclose(v, v0, rtol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_policies_keep_less_than_no_remat_in_a_scan():
  """What one scanned block saves for the backward pass: 'none' keeps the most, 'full'
  only the block input; the projections-only policy keeps less than all matmuls."""
  cfg = DiTConfig(vocab_size=8, num_layers=2, d_model=32, num_heads=2, cond_dim=8)
  x, c = jnp.ones((2, 16, 32)), jnp.ones((2, 8))

  def saved(remat):
    from mdm_jax.networks.dit import dit_blocks  # pylint: disable=import-outside-toplevel

    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x, c):
        return dit_blocks(dataclasses.replace(cfg, remat=remat), x, c, False)

    m = Stack()
    p = m.init(jax.random.key(0), x, c)
    f = lambda x: jnp.sum(m.apply(p, x, c))          # noqa: E731
    _, f_vjp = jax.vjp(f, x)
    res = [a for a in jax.tree.leaves(f_vjp) if hasattr(a, "size")]
    return sum(int(a.size) for a in res)

  sizes = {name: saved(name) for name in attn.REMAT_POLICIES}
  assert sizes["full"] < sizes["dots"] < sizes["matmuls"] < sizes["none"]
  assert sizes["attention"] < sizes["dots_attention"] < sizes["none"]


def test_unknown_policy_and_attention_are_config_errors():
  with pytest.raises(ValueError, match="model.remat must be one of none"):
    DiTConfig(vocab_size=8, remat="dotz")
  with pytest.raises(ValueError, match=r"must be xla\|cudnn\|splash"):
    DiTConfig(vocab_size=8, attention_impl="flash")
  from mdm_jax.configs.shakespeare_mdm import get_config  # pylint: disable=import-outside-toplevel
  c = get_config("tiny")
  for key, bad in (("remat", "dotz"), ("attention_impl", "flash")):
    c2 = c.copy_and_resolve_references()
    c2.model[key] = bad
    with pytest.raises(ConfigError, match=f"model.{key}"):
      validate_config(c2)
  c.model.remat, c.model.attention_impl = "dots_attention", "splash"
  validate_config(c)


def _qkv(b=2, length=128, h=2, k=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(kk, (b, length, h, k), jnp.float32) for kk in ks]


@pytest.mark.parametrize("causal", [False, True])
def test_splash_matches_the_reference_attention_in_interpret_mode(causal):
  """The Pallas kernel (interpreted on the CPU), forward and backward, against XLA's."""
  q, k, v = _qkv()

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  splash = lambda q, k, v: attn.splash_attention(q, k, v, causal=causal, interpret=True)  # noqa: E731
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
  np.testing.assert_allclose(splash(q, k, v), ref(q, k, v), atol=2e-6)
  gs = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  gr = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(gs, gr):
    np.testing.assert_allclose(a, b, atol=5e-6)


def test_splash_under_a_mesh_runs_per_device():
  """Batch over (data, fsdp) and heads over tensor on 8 CPU devices: the kernel runs per
  device under shard_map and gives the reference result."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  c = get_base_config()
  c.mesh.shape = (2, 2, 2)
  mesh = shd.make_mesh(c.mesh, jax.devices()[:8])
  rules = shd.logical_rules(c.mesh)
  q, k, v = _qkv(b=4, h=4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert attn._qkv_spec(q.shape, mesh) == P(("data", "fsdp"), None, "tensor", None)
    out = jax.jit(lambda q, k, v: attn.splash_attention(q, k, v, interpret=True))(q, k, v)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-6)


def test_splash_needs_a_length_multiple_of_128():
  assert [attn.splash_block(n) for n in (128, 384, 1024)] == [128, 128, 512]
  with pytest.raises(ValueError, match="multiple of 128"):
    attn.splash_block(100)


def test_splash_off_tpu_falls_back_with_a_warning(caplog):
  """On the CPU the config still runs: the XLA attention, the same numbers, one warning."""
  _, v0, _ = _loss_and_grads(_cfg(attention_impl="xla"))
  attn._warn_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    _, v1, _ = _loss_and_grads(_cfg(attention_impl="splash"))
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  assert any("needs a TPU" in r.getMessage() and "cpu" in r.getMessage()
             for r in caplog.records)


def test_splash_train_step_compiles_for_tpu():
  """The trainer's step with splash attention compiles for a v5p:2x2x1 slice (no TPU
  needed); the compiled program calls the Pallas kernel."""
  pytest.importorskip("libtpu", reason="libtpu is not installed")
  from mdm_jax.benchmarks import tpu_compile as tc  # pylint: disable=import-outside-toplevel
  from mdm_jax.configs.shakespeare_mdm import get_config  # pylint: disable=import-outside-toplevel
  c = get_config("tiny")
  c.data.seq_len = 128
  c.model.attention_impl = "splash"
  c.model.remat = "dots_attention"
  devices, info = tc.tpu_devices("v5p:2x2x1")
  mesh = tc.tpu_mesh(c.mesh, devices)
  fn, args, _ = tc.build_programs(c, 64, mesh, 8, ("train",))["train"]
  r = tc.compile_one(fn, args, mesh, tc.CHIPS[info["family"]], 1)
  assert r["fits"]
  with jax.set_mesh(mesh):
    hlo = fn.lower(*args).as_text()
  assert "tpu_custom_call" in hlo and "splash" in hlo
