"""MC-DiT (docs/method/mc_dit.md §5 unit tests): Gaussian diffusion, the dit | mdt | mcdit arms, masks,
gradient routing, inference isolation, samplers, guidance, sharding and the CLI path."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.diffusion import gaussian as g
from mdm_jax.tasks import gaussian as gt
from mdm_jax.core import sharding as shd
from mdm_jax.tasks import build_task
from mdm_jax.trainers.inference import sample_checkpoint
from mdm_jax.trainers.loop import train_and_evaluate
from mdm_jax.trainers.state import init_state
from mdm_jax.trainers.state import make_optimizer
from mdm_jax.trainers.steps import make_train_step
from mdm_jax.data import images
from mdm_jax.networks.mc_dit import MCDiT, patchify_images, unpatchify_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  spec = importlib.util.spec_from_file_location("_mcdit_cfg", os.path.join(
      ROOT, "configs", "fashion_mnist_mcdit.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _task(arm, **gaussian):
  c = _config(f"arm={arm},smoke")
  for k, v in gaussian.items():
    c.gaussian[k] = v
  return build_task(c, 256), c


_PARAMS = {}


def _params(task, seed=0):
  """Unboxed initial parameters (jit-compiled init, cached per model config)."""
  key = (repr(task.mc), seed)
  if key not in _PARAMS:
    x = jnp.zeros((2, 784), jnp.float32)
    init = jax.jit(lambda k: nn.unbox(task.model.init(k, x, jnp.ones((2,)),
                                                      jnp.zeros((2,), jnp.int32))["params"]))
    _PARAMS[key] = init(jax.random.key(seed))
  return _PARAMS[key]


def _batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (b, 784)), jnp.int32), jnp.arange(b, dtype=jnp.int32)


def _perturb(params, scale=0.02, seed=7):
  """Random offsets on every parameter: leaves the adaLN-Zero start (all branches matter)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _draws(b, n, p, k, seed=0):
  return gt.draw(jax.random.key(seed), jnp.arange(b), n, p, k, 0.0)


# ------------------------------------------------------------------ 8. shapes
@pytest.mark.parametrize("p", [2, 4])
def test_patchify_round_trip_exact(p):
  x = jnp.asarray(np.random.default_rng(p).normal(size=(3, 784)), jnp.float32)
  patches = patchify_images(x, (28, 28, 1), p)
  assert patches.shape == (3, (28 // p) ** 2, p * p)
  np.testing.assert_array_equal(np.asarray(unpatchify_images(patches, (28, 28, 1), p)),
                                np.asarray(x))
  img = np.asarray(x).reshape(3, 28, 28)        # patch 1 = rows 0..p-1, columns p..2p-1
  np.testing.assert_array_equal(np.asarray(patches[:, 1]), img[:, :p, p:2 * p].reshape(3, -1))


# ------------------------------------------------------------------ 2. masks
def test_exact_mask_counts_and_distinct_masks():
  assert g.num_masked(49, 0.3) == 15 and g.num_masked(49, 0.5) == 25 and g.num_masked(49, 0) == 0
  keys = jax.random.split(jax.random.key(0), 16)
  mask, keep = g.token_masks(keys, 49, 15)
  mask, keep = np.asarray(mask), np.asarray(keep)
  assert (mask.sum(1) == 15).all()
  assert keep.shape == (16, 34) and (np.diff(keep, axis=1) > 0).all()     # sorted, distinct
  for m, kp in zip(mask, keep):
    assert not m[kp].any() and m.sum() + len(kp) == 49
  assert len({m.tobytes() for m in mask}) == 16
  with pytest.raises(ValueError, match="mask ratio"):
    g.num_masked(49, 1.0)


# ------------------------------------------------------------------ 3 + 4. mixed input, clean targets
def _stub_branches(seen, clean_out):
  def denoise(params, x, level, y, train=False):
    return jnp.zeros_like(x)

  def clean(params, z, visible, level, y, train=False):
    seen["z"], seen["visible"] = z, visible
    return clean_out(z)
  return gt.Branches(denoise=denoise, clean=clean)


def test_mixed_input_is_x0_on_visible_and_noisy_on_masked():
  task, _ = _task("mcdit")
  tokens, labels = _batch()
  x0 = task.images_to_patches(tokens)
  n_steps = jnp.array([0, 10, 500, 999])
  dr = _draws(4, 49, 16, 25)
  seen = {}
  gt.arm_loss("mcdit", task.gc, task.schedule, _stub_branches(seen, lambda z: z), None, x0,
              labels, n_steps, dr)
  z, m = np.asarray(seen["z"]), np.asarray(dr.mask)
  np.testing.assert_array_equal(np.asarray(seen["visible"]), ~m)
  np.testing.assert_array_equal(z[~m], np.asarray(x0)[~m])                 # bit-exact
  ac = task.schedule.alphas_cumprod[np.asarray(n_steps)][:, None, None]
  expect = np.sqrt(ac) * np.asarray(x0) + np.sqrt(1 - ac) * np.asarray(dr.eps_aux)
  np.testing.assert_allclose(z[m], expect[m], rtol=1e-5, atol=1e-5)
  assert not np.allclose(z[m], np.asarray(x0)[m])


def test_clean_targets_zero_for_x0_positive_for_xt():
  task, _ = _task("mcdit")
  tokens, labels = _batch()
  x0 = task.images_to_patches(tokens)
  dr = _draws(4, 49, 16, 25)
  n_steps = jnp.array([100, 300, 600, 900])
  _, parts = gt.arm_loss("mcdit", task.gc, task.schedule, _stub_branches({}, lambda z: x0), None,
                         x0, labels, n_steps, dr)
  np.testing.assert_array_equal(np.asarray(parts["loss_aux"]), 0.0)
  _, parts = gt.arm_loss("mcdit", task.gc, task.schedule, _stub_branches({}, lambda z: z), None,
                         x0, labels, n_steps, dr)
  assert (np.asarray(parts["loss_aux"]) > 1e-3).all()
  # K = 0: L_C := 0 and the clean branch is never called
  dr0 = _draws(4, 49, 16, 0)
  _, parts = gt.arm_loss("mcdit", task.gc, task.schedule, _stub_branches({}, lambda z: z), None,
                         x0, labels, n_steps, dr0)
  np.testing.assert_array_equal(np.asarray(parts["loss_aux"]), 0.0)


# ------------------------------------------------------------------ 1. ratio 0
def _split(tree, drop):
  return {k: v for k, v in tree.items() if k not in drop}


def test_mcdit_at_ratio_or_weight_zero_equals_dit():
  dit_task, _ = _task("dit")
  tokens, labels = _batch()
  key = jax.random.key(3)

  def mean_loss(task, p):
    per, _ = task.loss(p, tokens, key, train=True, labels=labels)
    return jnp.mean(per)

  aux = ("dc", "dc_decoder_pos_embed", "e_clean")
  params = _perturb(_params(_task("mcdit")[0]))
  shared = _split(params, aux)
  l_dit, g_dit = jax.jit(jax.value_and_grad(lambda p: mean_loss(dit_task, p)))(shared)
  for setting in ({"mask_ratio": 0.0}, {"lambda_c": 0.0}):
    mc_task, _ = _task("mcdit", **setting)
    l_mc, g_mc = jax.jit(jax.value_and_grad(lambda p, t=mc_task: mean_loss(t, p)))(params)
    np.testing.assert_allclose(float(l_mc), float(l_dit), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 _split(g_mc, aux), g_dit)
    for name in ("dc", "e_clean"):
      assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_mc[name]))


def test_mdt_masked_pass_at_ratio_zero_is_the_full_pass():
  task, _ = _task("mdt")
  params = _params(task)
  # a non-trivial mask token / side block, so the test fails if either leaked in
  params = _perturb(params)
  x = jax.random.normal(jax.random.key(1), (3, 49, 16))
  lvl, y = jnp.array([5.0, 400.0, 900.0]), jnp.array([1, 2, 10])
  full = jax.jit(lambda p: task.model.apply({"params": p}, x, lvl, y,
                                            method=MCDiT.denoise))(params)
  masked_pass = jax.jit(lambda p, keep, mask: task.model.apply(
      {"params": p}, x, keep, mask, lvl, y, method=MCDiT.mdt_masked))
  keep = jnp.broadcast_to(jnp.arange(49, dtype=jnp.int32), (3, 49))
  masked = masked_pass(params, keep, jnp.zeros((3, 49), bool))
  np.testing.assert_allclose(np.asarray(masked), np.asarray(full), rtol=1e-5, atol=1e-6)
  mask, keep = g.token_masks(jax.random.split(jax.random.key(0), 3), 49, 15)
  part = jax.jit(lambda p, keep, mask: task.model.apply(
      {"params": p}, x, keep, mask, lvl, y, method=MCDiT.mdt_masked))(params, keep, mask)
  assert not np.allclose(np.asarray(part), np.asarray(full), atol=1e-4)


# ------------------------------------------------------------------ 5. gradient routing
def test_gradient_routing_between_branches():
  task, _ = _task("mcdit")
  params = _perturb(_params(task))
  tokens, labels = _batch()
  x0 = task.images_to_patches(tokens)
  dr = _draws(4, 49, 16, 25)
  steps = jnp.array([50, 300, 600, 950])

  def part(name):
    def f(p):
      _, parts = gt.arm_loss("mcdit", task.gc, task.schedule, task.branches(), p, x0, labels,
                             steps, dr)
      return jnp.mean(parts[name])
    return jax.jit(jax.grad(f))(params)

  def mx(tree):
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))

  g_c, g_g = part("loss_aux"), part("loss_g")
  assert mx(g_c["dn"]) == 0.0 and mx(g_c["dn_decoder_pos_embed"]) == 0.0
  assert mx(g_g["dc"]) == 0.0 and mx(g_g["dc_decoder_pos_embed"]) == 0.0
  assert mx(g_g["e_clean"]) == 0.0 and mx(g_c["e_clean"]) > 0.0
  assert mx(g_c["encoder"]) > 0.0 and mx(g_g["encoder"]) > 0.0
  assert mx(g_c["dc"]) > 0.0 and mx(g_g["dn"]) > 0.0


# ------------------------------------------------------------------ 6. inference isolation
def test_sampling_ignores_clean_branch_and_e_clean():
  task, _ = _task("mcdit")
  params = _perturb(_params(task))
  labels = jnp.array([0, 3, 7, 10])
  run = jax.jit(lambda p: task.sample_images(p, jax.random.key(5), labels, num_steps=5,
                                             sampler="ddim", guidance=1.5)[0])
  base = np.asarray(run(params))
  other = dict(params)
  fresh = _params(task, seed=9)
  other["dc"], other["dc_decoder_pos_embed"] = fresh["dc"], jax.tree.map(lambda x: x + 1.0,
                                                                         fresh["dc_decoder_pos_embed"])
  other["e_clean"] = fresh["e_clean"] + 1.0
  np.testing.assert_array_equal(np.asarray(run(other)), base)
  changed = dict(params)
  changed["dn"] = jax.tree.map(lambda x: x + 0.05, params["dn"])
  assert not np.allclose(np.asarray(run(changed)), base)


# ------------------------------------------------------------------ 7. information
def test_mutual_information_and_noisy_regression():
  rho = np.array([0.9, 0.6, 0.3])
  ab = [1.0, 0.9, 0.5, 0.1, 0.01]
  i_n2n = [g.mi_noisy_to_noisy(rho, a) for a in ab]
  assert i_n2n[0] == pytest.approx(g.mi_clean_to_clean(rho))
  assert all(x > y for x, y in zip(i_n2n, i_n2n[1:]))      # decreasing in t (increasing noise)
  # ε^M is independent of X_t^U: least squares of ε^M on X_t^U has ~0 coefficients
  rng = np.random.default_rng(0)
  n, d = 20000, 4
  cov = 0.7 * np.ones((2 * d, 2 * d)) + 0.3 * np.eye(2 * d)   # correlated U and M patches
  x0 = rng.multivariate_normal(np.zeros(2 * d), cov, n)
  eps = rng.normal(size=(n, 2 * d))
  a, s = np.sqrt(0.5), np.sqrt(0.5)
  xt = a * x0 + s * eps
  xu, e_m = np.c_[np.ones(n), xt[:, :d]], eps[:, d]
  coef, res, *_ = np.linalg.lstsq(xu, e_m, rcond=None)
  se = np.sqrt(res[0] / (n - d - 1) * np.diag(np.linalg.inv(xu.T @ xu)))
  assert (np.abs(coef) < 3 * se).all()
  coef_x0, *_ = np.linalg.lstsq(xu, x0[:, d], rcond=None)        # but X0^M IS predictable
  assert np.abs(coef_x0[1:]).sum() > 10 * se[1:].sum()


# ------------------------------------------------------------------ samplers + guidance
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "edm_heun"])
def test_samplers_recover_a_gaussian_data_distribution(sampler):
  mu, s0 = 0.3, 0.2                   # x0 ~ N(mu, s0^2): the exact denoiser is linear
  sched = g.make_schedule("linear", 1000)
  edm = g.EDMConfig()

  def eps_fn(x, n):
    a, s = g.alpha_sigma(sched, n)
    a, s = a[:, None], s[:, None]
    return s * (x - a * mu) / (a ** 2 * s0 ** 2 + s ** 2)

  def d_fn(x, sig):
    return mu + (s0 ** 2 / (s0 ** 2 + sig[:, None] ** 2)) * (x - mu)

  shape = (4000, 2)
  if sampler == "edm_heun":
    x, nfe = g.edm_heun_sample(d_fn, jax.random.key(0), shape, edm, 40)
    assert nfe == 80
  elif sampler == "ddim":
    x, nfe = g.ddim_sample(eps_fn, jax.random.key(0), shape, sched, 100, clip_x0=False)
    assert nfe == 100
  else:
    # ancestral sampling with a fixed variance is exact only as the steps shrink: at 100
    # steps the posterior variance ("small") under-disperses and beta ("large") over-disperses
    stds = {v: float(np.asarray(g.ddpm_sample(eps_fn, jax.random.key(0), shape, sched, 100,
                                              variance=v, clip_x0=False)[0]).std())
            for v in ("small", "large")}
    assert stds["small"] < s0 < stds["large"]
    x, nfe = g.ddpm_sample(eps_fn, jax.random.key(0), shape, sched, 1000, clip_x0=False)
    assert nfe == 1000
  x = np.asarray(x)
  assert abs(x.mean() - mu) < 0.02 and abs(x.std() - s0) < 0.02


def test_classifier_free_guidance_combination():
  def apply(x, level, y):
    return x * 0 + y[:, None].astype(jnp.float32)     # output = label value
  x, lvl, y = jnp.zeros((3, 2)), jnp.zeros((3,), jnp.int32), jnp.array([1, 2, 3])
  np.testing.assert_allclose(g.guided_model_fn(apply, y, 10, 1.0)(x, lvl)[:, 0], [1, 2, 3])
  np.testing.assert_allclose(g.guided_model_fn(apply, y, 10, 0.0)(x, lvl)[:, 0], [10, 10, 10])
  np.testing.assert_allclose(g.guided_model_fn(apply, y, 10, 1.5)(x, lvl)[:, 0],
                             [10 + 1.5 * (v - 10) for v in (1, 2, 3)])


def test_bad_config_gives_clear_errors():
  from mdm_jax.core.errors import ConfigError
  c = _config("arm=mcdit,smoke")
  c.gaussian.sampler = "edm_heun"
  with pytest.raises(ConfigError, match="does not fit gaussian.form"):
    build_task(c, 256)
  with pytest.raises(ValueError, match="Unknown config variant"):
    _config("arm=mcdit,bogus")
  c = _config("arm=mcdit,smoke")
  c.model.patch_size = 5
  with pytest.raises(ConfigError, match="patch_size"):
    build_task(c, 256)


# ------------------------------------------------------------------ sharding + the trainer's path
def test_sharded_train_step_matches_unsharded_loss():
  task, c = _task("mcdit")
  c.mesh.shape = (2, 2, 2)
  mesh, rules = shd.make_mesh(c.mesh), shd.logical_rules(c.mesh)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, 0)
  specs = {str(s.spec) for s in jax.tree.leaves(shardings.params)}
  assert any("fsdp" in s or "tensor" in s for s in specs)      # parameters really sharded
  tokens, labels = _batch(8)
  # the trainer's loss of step 0 recomputed on one device from the same parameters
  k = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
  k_t, k_loss = jax.random.split(k)
  from mdm_jax.diffusion import elbo as losses
  t = losses.sample_times(k_t, 8, task.loss_cfg.t_min, task.loss_cfg.antithetic)
  host = jax.device_get(state.params)
  per, _ = jax.jit(lambda p: task.loss(p, tokens, k_loss, train=True, t=t,
                                       row_ids=jnp.arange(8), labels=labels))(host)
  step = make_train_step(task, tx, c, mesh, rules, shardings)
  bs = shd.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    _, m = step(state, {"tokens": shd.global_batch(np.asarray(tokens), bs),
                        "labels": shd.global_batch(np.asarray(labels), bs)})
  np.testing.assert_allclose(float(m["loss"]), float(jnp.sum(per)) / (8 * 784), rtol=1e-4)
  assert float(m["loss_aux"]) > 0


def _fake_fashion(tmp_path, n_train=64, n_test=16):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("t10k", n_test)):
    images.write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"),
                     rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    images.write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"),
                     (np.arange(n) % 10).astype(np.uint8))


def test_train_then_sample_from_checkpoint_writes_png(tmp_path):
  data_dir = tmp_path / "fm"
  data_dir.mkdir()
  _fake_fashion(data_dir)
  c = _config("arm=mdt,smoke")
  c.data.path = str(data_dir)
  c.training.num_steps = 2
  c.eval.every_steps = c.checkpoint.every_steps = 2
  c.checkpoint.keep_best = 0
  wd = str(tmp_path / "run")
  res = train_and_evaluate(c, wd)
  assert res["step"] == 2 and np.isfinite(res["eval_denoise_loss"])
  assert len([k for k in res if k.startswith("eval_denoise_loss_t")]) == 8
  out = sample_checkpoint(c, wd)
  assert out["sampler"] == "ddim" and out["num_samples"] == 4
  img = images.read_png(out["grid_png"])
  assert img.ndim == 3 and img.shape[0] > 28


@pytest.mark.parametrize("name,arg", [("fashion_mnist_mcdit.py", "arm=dit"),
                                      ("fashion_mnist_mcdit.py", "arm=mdt,patch=2"),
                                      ("fashion_mnist_mcdit.py", "arm=mcdit,small,edm"),
                                      ("cifar10_mcdit.py", "arm=mcdit")])
def test_configs_build_abstractly(name, arg):
  """Each config builds its task and (abstract) parameters; sampling path = E + D_n in every arm."""
  from mdm_jax.tasks import validate_config
  from mdm_jax.trainers.setup import validate_batch
  spec = importlib.util.spec_from_file_location(f"_c_{name[:-3]}", os.path.join(ROOT, "configs",
                                                                               name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  validate_config(c)
  task = build_task(c, 256)
  h, w, ch = task.mc.image_shape
  x = jax.ShapeDtypeStruct((2, h * w * ch), jnp.float32)
  lvl, y = jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
  params = nn.unbox(jax.eval_shape(task.model.init, jax.random.key(0), x, lvl, y))["params"]
  d = int(c.model.d_model)
  assert params["encoder"]["blocks"]["qkv"].shape == (task.mc.n_encoder, d, 3, c.model.num_heads,
                                                      d // c.model.num_heads)
  assert ("dc" in params) == (task.mc.arm == "mcdit") and ("side" in params) == (
      task.mc.arm == "mdt")
  assert params["dn"]["head"].shape == (d, task.mc.patch_dim)
  if name.startswith("cifar"):
    assert task.mc.num_patches == 256 and d == 384 and c.model.dtype == "bfloat16"
  validate_batch(c, shd.make_mesh(c.mesh, jax.devices()[:8]))


# ------------------------------------------------------------------ ablations and probes
def test_context_t_noises_visible_patches_below_t_and_tells_their_level():
  """context_t: visible patches are X at t_u = floor(u t) < t (with G's ε), the masked ones at t
  (with ε'), and branch C receives t_u's level for the visible tokens."""
  task, _ = _task("mcdit,context_t")
  assert task.gc.context == "small_t" and task.mc.context_time
  x0 = task.images_to_patches(_batch()[0])
  dr = _draws(4, 49, 16, 25)
  steps = jnp.array([50, 300, 600, 950])
  seen = {}

  def clean(params, z, visible, level, y, train=False, visible_level=None):
    seen.update(z=z, visible=visible, level=level, visible_level=visible_level)
    return jnp.zeros_like(z)

  fns = gt.Branches(denoise=lambda p, x, lvl, y, train=False: jnp.zeros_like(x), clean=clean)
  gt.arm_loss("mcdit", task.gc, task.schedule, fns, None, x0, jnp.zeros(4, jnp.int32), steps, dr)
  t_u = jnp.floor(dr.u_ctx * steps).astype(steps.dtype)
  assert np.all(np.asarray(t_u) < np.asarray(steps))
  want_vis = g.q_sample(task.schedule, x0, t_u, dr.eps)
  want_msk = g.q_sample(task.schedule, x0, steps, dr.eps_aux)
  vis = np.asarray(seen["visible"])[..., None]
  np.testing.assert_array_equal(np.asarray(seen["z"]),
                                np.where(vis, np.asarray(want_vis), np.asarray(want_msk)))
  np.testing.assert_array_equal(np.asarray(seen["visible_level"]), np.asarray(t_u, np.float32))
  np.testing.assert_array_equal(np.asarray(seen["level"]), np.asarray(steps, np.float32))
  # The level projection starts at zero, then changes branch C's output (and only C's).
  params = _params(task)
  assert float(jnp.abs(params["ctx_time"]).max()) == 0.0
  z, vis_m = x0, jnp.arange(49)[None].repeat(4, 0) < 24
  run = jax.jit(lambda p, vl: task.model.apply({"params": p}, z, vis_m, steps * 1.0, None, False,
                                               vl, method=MCDiT.clean))
  p2 = dict(_perturb(params))
  a, b = run(p2, jnp.zeros(4)), run(p2, jnp.full((4,), 40.0))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  with pytest.raises(Exception, match="context_time"):
    c = _config("arm=mcdit,smoke")
    c.gaussian.context = "small_t"
    build_task(c, 256)


def test_single_decoder_and_c_without_g():
  """single_decoder: branch C decodes with D_n (no D_c parameters); with no visible patch its
  output is exactly the sampling path's.  c_only (λ_G = 0): the loss is λ_C L_C alone."""
  task, _ = _task("mcdit,c_only")
  params = _perturb(_params(task))
  assert not any(k.startswith("dc") for k in params) and task.gc.lambda_g == 0.0
  x = jax.random.normal(jax.random.key(1), (3, 49, 16))
  lvl, y = jnp.array([5.0, 400.0, 900.0]), jnp.array([1, 2, 10])
  none_visible = jnp.zeros((3, 49), bool)
  c_out = task.model.apply({"params": params}, x, none_visible, lvl, y, method=MCDiT.clean)
  d_out = task.model.apply({"params": params}, x, lvl, y, method=MCDiT.denoise)
  np.testing.assert_allclose(np.asarray(c_out), np.asarray(d_out), rtol=1e-5, atol=1e-6)
  tokens, labels = _batch()
  x0 = task.images_to_patches(tokens)
  dr = _draws(4, 49, 16, 25)
  steps = jnp.array([50, 300, 600, 950])
  total, parts = gt.arm_loss("mcdit", task.gc, task.schedule, task.branches(), params, x0,
                             labels, steps, dr)
  np.testing.assert_allclose(np.asarray(total), np.asarray(task.gc.lambda_c * parts["loss_aux"]),
                             rtol=1e-6)
  assert float(jnp.min(parts["loss_g"])) > 0.0       # L_G is still measured, not trained


def test_clean_branch_probes_on_known_maps(monkeypatch):
  """The collapse probe is 1 for a branch C that returns its input and 0 for one that ignores
  the masked patches; the context probe is the masked-patch MSE of the output."""
  task, _ = _task("mcdit")
  tokens, labels = _batch()
  x0 = task.images_to_patches(tokens)
  for name, fn, sens in [("identity", lambda p, z, vis, lvl, y, train=False: z, 1.0),
                         ("ignores", lambda p, z, vis, lvl, y, train=False:
                          jnp.where(vis[..., None], z, 0.25), 0.0)]:
    monkeypatch.setattr(gt.GaussianTask, "branches",
                        lambda self, fn=fn: gt.Branches(denoise=None, clean=fn))
    out = task.clean_probes(None, tokens, labels, jax.random.key(0), ratio=0.5)
    nb = int(task.gc.eval_buckets)
    assert out["inpaint_mse"].shape == (nb, 4) and out["noise_sensitivity"].shape == (nb, 4)
    np.testing.assert_allclose(np.asarray(out["noise_sensitivity"]), sens, atol=1e-6)
    mse = np.asarray(out["inpaint_mse"])
    if name == "ignores":      # a constant guess: the same error at every noise level
      np.testing.assert_allclose(mse, np.broadcast_to(mse[:1], mse.shape), rtol=1e-6)
      assert mse.min() > 0.0
    else:                      # copying the noisy patch: the error grows with the noise level
      assert np.all(np.diff(mse.mean(axis=1)) > 0)
