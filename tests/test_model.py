import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.configs.base import get_base_config
from mdm_jax.networks import build_model
from mdm_jax.networks.dit import DiTConfig, SubTokenEmbed, project


def _cfg(**kw):
  c = get_base_config().model
  c.num_layers, c.d_model, c.num_heads, c.cond_dim = 2, 48, 2, 16
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("ell,d", [(2, 48), (3, 48), (5, 52)])
def test_subtoken_embedding_locality(ell, d):
  cfg = DiTConfig(vocab_size=60, ell=ell, base=8, d_model=d, num_heads=2)
  emb = SubTokenEmbed(cfg)
  digits = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 5, ell)))
  params = nn.unbox(emb.init(jax.random.key(0), digits))
  base = emb.apply(params, digits)
  assert base.shape == (2, 5, d)
  w = d // ell
  changed = digits.at[1, 3, ell - 1].set((digits[1, 3, ell - 1] + 1) % 9)
  diff = np.abs(np.asarray(emb.apply(params, changed) - base)) > 0
  assert diff[1, 3, (ell - 1) * w: ell * w].all()
  diff[1, 3, (ell - 1) * w: ell * w] = False
  assert not diff.any()          # only that slot of that token changed
  # Every slot shares one table of b+1 rows (the mask row included).
  assert params["params"]["table"].shape == (9, w)


@pytest.mark.parametrize("per_slot", [False, True])
def test_sum_embedding_locality_and_tables(per_slot):
  ell, b = 3, 8
  cfg = DiTConfig(vocab_size=60, ell=ell, base=b, d_model=48, num_heads=2,
                  digit_merge="sum", per_slot_tables=per_slot)
  emb = SubTokenEmbed(cfg)
  digits = jnp.asarray(np.random.default_rng(0).integers(0, b + 1, (2, 5, ell)))
  params = nn.unbox(emb.init(jax.random.key(0), digits))
  table = np.asarray(params["params"]["table"])
  assert table.shape == ((b + 1) * (ell if per_slot else 1), 48)
  out = np.asarray(emb.apply(params, digits))
  rows = np.asarray(digits) + (np.arange(ell) * (b + 1) if per_slot else 0)
  np.testing.assert_allclose(out, table[rows].sum(axis=2), rtol=1e-6, atol=1e-7)
  changed = digits.at[1, 3, 0].set((digits[1, 3, 0] + 1) % (b + 1))
  diff = np.abs(np.asarray(emb.apply(params, changed)) - out).max(axis=-1) > 0
  assert diff[1, 3] and diff.sum() == 1          # only that token's vector moved
  # The same digit in two slots: one vector when shared, two when per slot.
  same = jnp.full((1, 1, ell), 2)
  e0 = np.asarray(emb.apply(params, same))[0, 0]
  rows = 2 + np.arange(ell) * (b + 1 if per_slot else 0)
  np.testing.assert_allclose(e0, table[rows].sum(0), rtol=1e-6)


@pytest.mark.parametrize("ell,b", [(1, 11), (2, 8), (3, 4)])
def test_joint_embedding_one_row_per_partial_state(ell, b):
  cfg = DiTConfig(vocab_size=b ** ell, ell=ell, base=b, d_model=16, num_heads=2,
                  digit_merge="joint")
  emb = SubTokenEmbed(cfg)
  # Every partial state of one token (each digit in 0..b, b = masked), one per position.
  states = np.stack(np.meshgrid(*[np.arange(b + 1)] * ell, indexing="ij"), -1).reshape(1, -1, ell)
  params = nn.unbox(emb.init(jax.random.key(0), jnp.asarray(states)))
  table = np.asarray(params["params"]["table"])
  assert table.shape == ((b + 1) ** ell, 16)
  out = np.asarray(emb.apply(params, jnp.asarray(states)))[0]
  # A bijection between partial states and rows: the i-th state (row-major) reads row i.
  np.testing.assert_array_equal(out, table)
  # Changing one digit of one token moves that token's vector only.
  digits = jnp.asarray(np.random.default_rng(1).integers(0, b + 1, (2, 5, ell)))
  base = np.asarray(emb.apply(params, digits))
  changed = digits.at[0, 2, ell - 1].set((digits[0, 2, ell - 1] + 1) % (b + 1))
  moved = np.abs(np.asarray(emb.apply(params, changed)) - base).max(-1) > 0
  assert moved[0, 2] and moved.sum() == 1


def test_joint_embedding_validated():
  with pytest.raises(ValueError, match=r"\(b\+1\)\*\*ell"):
    DiTConfig(vocab_size=2 ** 24, ell=2, base=2 ** 12, d_model=16, num_heads=2,
              digit_merge="joint")
  with pytest.raises(ValueError, match="per_slot_tables"):
    DiTConfig(vocab_size=64, ell=2, base=8, d_model=16, num_heads=2, digit_merge="joint",
              per_slot_tables=True)


def test_embedding_options_validated_and_model_runs():
  with pytest.raises(ValueError, match="digit_merge"):
    DiTConfig(vocab_size=60, ell=2, base=8, d_model=48, num_heads=2, digit_merge="mean")
  with pytest.raises(ValueError, match="tie_embeddings"):
    DiTConfig(vocab_size=60, ell=1, base=60, d_model=48, num_heads=2, tie_embeddings=True,
              digit_merge="sum")
  model = build_model(_cfg(digit_merge="sum", per_slot_tables=True), vocab_size=64, ell=2,
                      base=8, causal=False)
  digits = jnp.zeros((2, 6, 2), jnp.int32)
  params = model.init(jax.random.key(0), digits, jnp.full((2,), 0.5))
  assert model.apply(params, digits, jnp.full((2,), 0.5)).shape == (2, 6, 64)


def test_causal_vs_bidirectional_and_shapes():
  for causal in (False, True):
    m = build_model(_cfg(), vocab_size=30, ell=1, base=30, causal=causal)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 31, (2, 12, 1)))
    v = nn.unbox(m.init(jax.random.key(0), x, jnp.ones(2)))
    # Leave the zero init with random (not constant) offsets: constant offsets make every
    # projection rank one, and the attention's saturated output then hides a change
    # beyond float32 on some CPUs.
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                  for p, k in zip(leaves, keys)])
    y = m.apply(v, x, jnp.ones(2))
    assert y.shape == (2, 12, 30)
    x2 = x.at[:, -1].set((x[:, -1] + 1) % 31)
    y2 = m.apply(v, x2, jnp.ones(2))
    early_changed = np.abs(np.asarray(y2[:, :-1] - y[:, :-1])).max() > 1e-6
    assert early_changed != causal


def test_time_conditioning_switch():
  x = jnp.zeros((2, 8, 2), jnp.int32)
  for tc in (False, True):
    m = build_model(_cfg(time_conditioning=tc), vocab_size=20, ell=2, base=5)
    v = jax.tree.map(lambda p: p + 0.1, nn.unbox(m.init(jax.random.key(0), x, jnp.ones(2))))
    a, b = m.apply(v, x, jnp.full(2, 0.1)), m.apply(v, x, jnp.full(2, 0.9))
    assert (np.abs(np.asarray(a - b)).max() > 1e-6) == tc


def test_bf16_compute_keeps_f32_params_and_matches_roughly():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 6, (2, 16, 2)))
  m32 = build_model(_cfg(), vocab_size=20, ell=2, base=5)
  m16 = build_model(_cfg(dtype="bfloat16"), vocab_size=20, ell=2, base=5)
  v = jax.tree.map(lambda p: p + 0.05, nn.unbox(m32.init(jax.random.key(0), x, jnp.ones(2))))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  a = m32.apply(v, x, jnp.ones(2))
  b = m16.apply(v, x, jnp.ones(2)).astype(jnp.float32)
  assert np.abs(np.asarray(a - b)).max() < 0.1 * np.abs(np.asarray(a)).max() + 0.05


def test_scan_and_loop_layers_agree_and_tied_head():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 21, (2, 8, 1)))
  ms = build_model(_cfg(scan_layers=True), vocab_size=20, ell=1, base=20)
  ml = build_model(_cfg(scan_layers=False), vocab_size=20, ell=1, base=20)
  vs = nn.unbox(ms.init(jax.random.key(0), x, jnp.ones(2)))
  vl = nn.unbox(ml.init(jax.random.key(0), x, jnp.ones(2)))
  assert sum(p.size for p in jax.tree.leaves(vs)) == sum(p.size for p in jax.tree.leaves(vl))
  mt = build_model(_cfg(tie_embeddings=True), vocab_size=20, ell=1, base=20)
  vt = nn.unbox(mt.init(jax.random.key(0), x, jnp.ones(2)))
  assert "head" not in vt["params"]
  with pytest.raises(ValueError, match="tie_embeddings"):
    build_model(_cfg(tie_embeddings=True), vocab_size=20, ell=2, base=5)


def test_logical_axis_names_on_params():
  m = build_model(_cfg(), vocab_size=20, ell=2, base=5)
  v = m.init(jax.random.key(0), jnp.zeros((2, 8, 2), jnp.int32), jnp.ones(2))
  specs = nn.get_partition_spec(v)["params"]
  assert specs["blocks"]["mlp_in"] == jax.sharding.PartitionSpec(
      "layers", "embed", "mlp")
  assert specs["head"] == jax.sharding.PartitionSpec("embed", "vocab")
  assert specs["embed"]["table"] == jax.sharding.PartitionSpec("vocab", "embed")


def _randomise_local_conv(params, rng):
  """Random taps for every local_conv kernel in a params tree."""
  flat = flax.traverse_util.flatten_dict(params)
  for path in list(flat):
    if path[-1] == "local_conv":
      flat[path] = jnp.asarray(rng.normal(0, 0.5, flat[path].shape), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("causal", [False, True])
def test_local_conv_identity_at_init_and_no_lookahead(causal):
  digits = jnp.asarray(np.random.default_rng(1).integers(0, 30, (2, 12, 1)))
  t = jnp.full((2,), 0.5)
  plain = build_model(_cfg(gate_init=1.0), vocab_size=30, ell=1, base=30, causal=causal)
  conv = build_model(_cfg(gate_init=1.0, local_conv=3), vocab_size=30, ell=1, base=30,
                     causal=causal)
  flat = flax.traverse_util.flatten_dict(nn.unbox(conv.init(jax.random.key(0), digits, t))["params"])
  kernels = [v for k, v in flat.items() if k[-1] == "local_conv"]
  assert kernels and all(k.shape[-2:] == (3, 48) and not k.any() for k in kernels)
  # Leave the other zero inits (head, adaLN) so the comparison is not 0 == 0.
  noise = np.random.default_rng(3)
  flat = {k: (v if k[-1] == "local_conv" else v + noise.normal(0, 0.05, v.shape).astype(np.float32))
          for k, v in flat.items()}
  p_conv = flax.traverse_util.unflatten_dict(flat)
  stripped = flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if k[-1] != "local_conv" and "ln_conv" not in k})
  out_conv = conv.apply({"params": p_conv}, digits, t)
  assert np.abs(np.asarray(out_conv)).max() > 1e-3
  np.testing.assert_allclose(out_conv, plain.apply({"params": stripped}, digits, t), atol=1e-5)
  # With learnt taps the output changes, and the causal model still never looks ahead.
  p_rand = _randomise_local_conv(p_conv, np.random.default_rng(2))
  base = conv.apply({"params": p_rand}, digits, t)
  assert np.abs(np.asarray(base - out_conv)).max() > 1e-3
  later = digits.at[:, 8:].set((digits[:, 8:] + 1) % 30)
  diff = np.abs(np.asarray(conv.apply({"params": p_rand}, later, t) - base)).max(axis=(0, 2))
  assert (diff[8:] > 1e-6).all()
  if causal:
    assert (diff[:8] < 1e-6).all()


def test_local_conv_bad_width():
  with pytest.raises(ValueError, match="local_conv"):
    build_model(_cfg(local_conv=2), vocab_size=30, ell=1, base=30, causal=False)


@pytest.mark.parametrize("width,causal", [(3, False), (5, False), (2, True), (3, True)])
def test_length_conv_matches_numpy(width, causal):
  from mdm_jax.networks.dit import _length_conv   # pylint: disable=import-outside-toplevel

  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return _length_conv(self, x, width, causal, jnp.float32)

  x = np.random.default_rng(0).normal(size=(2, 7, 6)).astype(np.float32)
  m = Conv()
  p = nn.unbox(m.init(jax.random.key(0), x))
  assert not np.asarray(m.apply(p, x)).any()              # zero taps at init
  w = np.random.default_rng(1).normal(size=(width, 6)).astype(np.float32)
  y = np.asarray(m.apply({"params": {"local_conv": jnp.asarray(w)}}, x))
  offs = range(-(width - 1), 1) if causal else range(-(width // 2), width // 2 + 1)
  want = np.zeros_like(x)
  for i, o in enumerate(offs):
    for l in range(7):
      if 0 <= l + o < 7:
        want[:, l] += w[i] * x[:, l + o]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, n_in, eq", [
    ((2, 5, 8), (8, 3, 2, 4), 1, "bld,dthk->blthk"),    # qkv
    ((2, 5, 2, 4), (2, 4, 8), 2, "blhk,hkd->bld"),      # attention output
    ((3, 7, 8), (8, 11), 1, "bld,dv->blv"),             # MLP / head
])
def test_project_is_the_einsum_with_its_gradients(x_shape, w_shape, n_in, eq):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  ref = jnp.einsum(eq, x, w)
  np.testing.assert_allclose(project(x, w, n_in), ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, ref.shape)
  got = jax.grad(lambda x, w: jnp.sum(project(x, w, n_in) * g), (0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(jnp.einsum(eq, x, w) * g), (0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
