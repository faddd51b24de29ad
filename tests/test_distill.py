"""Di[M]O one-step distillation (mdm_jax/tasks/distill.py, docs/method/algorithms.md §5): the surrogate's
gradient, the KL gradients, the fixed point, the token initialisation, the frozen
parameters, generator steps lowering the divergence to the teacher, and the CLI."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.core.config import to_dict
from mdm_jax.trainers import distill
from mdm_jax.core import sharding as shd
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import init_boxed, init_state
from mdm_jax.trainers.state import _name_matches, make_optimizer
from mdm_jax.core.errors import ConfigError
from mdm_jax.networks.embed_noise import perturb_embeddings
from mdm_jax.diffusion.prime import PrimeCodec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 16          # tiny vocabulary (pixel levels) for the unit tests
SIDE = 8        # 8 x 8 x 1 images -> L = 64 tokens


def _config(arg="tiny"):
  spec = importlib.util.spec_from_file_location(
      "_distill_cfg", os.path.join(ROOT, "configs", "fashion_mnist_mdm.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.model.image_shape = (SIDE, SIDE, 1)
  c.data.seq_len = SIDE * SIDE
  c.model.patch_size = 4
  c.distill.batch_size = 16
  c.distill.learning_rate = 3e-3
  c.distill.warmup_steps = 1
  c.distill.ema_decay = 0.0
  return c


def _jitter(tree, key, scale):
  leaves, tdef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  """A tiny image task, a non-trivial random teacher (zero-initialised heads jittered)."""
  c = _config()
  task = build_task(c, V)
  teacher = jax.jit(lambda k: _jitter(nn.unbox(task.model.init(
      k, jnp.zeros((2, SIDE * SIDE, 1), jnp.int32), jnp.ones((2,)))["params"]),
      jax.random.key(1), 0.2))(jax.random.key(0))
  settings = distill.DistillSettings.from_config(c)
  tx = distill.optimizers(c)
  dtask = distill.DistillTask(task, settings, aux_steps=int(c.distill.aux_steps), teacher=teacher)
  step = distill.make_distill_step(dtask, tx, ema_decay=0.0, donate=False)
  start = jax.jit(lambda p: init_boxed(dtask, tx, jax.random.key(0), frozen=p))
  return c, task, teacher, settings, start, tx, step


# ------------------------------------------------------------------ §5.4 test 1
def test_surrogate_gradient_is_g_over_batch_and_zero_off_mask():
  b, length = 3, 5
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  z = jax.random.normal(k1, (b, length, V))
  lp_aux = jax.nn.log_softmax(jax.random.normal(k2, (b, length, V)) * 2)
  lp_teacher = jax.nn.log_softmax(jax.random.normal(k3, (b, length, V)) * 2)
  masked = jax.random.bernoulli(k4, 0.5, (b, length)).at[0, 0].set(True).at[0, 1].set(False)
  for beta in (0.0, 0.3, 1.0):
    g = distill.dimo_grad_target(lp_aux, lp_teacher, masked, beta)
    grad = jax.grad(lambda zz, g=g: distill.surrogate_loss(zz, g))(z)
    np.testing.assert_allclose(grad, g / b, atol=1e-7)
    assert np.all(np.asarray(grad)[~np.asarray(masked)] == 0.0)
    assert np.abs(np.asarray(grad)[np.asarray(masked)]).max() > 1e-3
    # no gradient flows into the target through the probabilities
    gz = jax.grad(lambda la: distill.surrogate_loss(
        z, distill.dimo_grad_target(la, lp_teacher, masked, beta)))(lp_aux)
    assert np.all(np.asarray(gz) == 0.0)


# ------------------------------------------------------------------ §5.4 test 3
def test_forward_reverse_and_jeffreys_targets_match_autodiff_of_the_kl():
  k1, k2 = jax.random.split(jax.random.key(3))
  u = jax.random.normal(k1, (4, V)) * 1.5            # the auxiliary's logits
  lp_t = jax.nn.log_softmax(jax.random.normal(k2, (4, V)) * 1.5)
  masked = jnp.ones((1, 4), bool)

  def fwd_kl(uu):   # D(p_phi || p_psi) as a function of psi's logits
    return jnp.sum(distill.token_kl(lp_t, jax.nn.log_softmax(uu)))

  def rev_kl(uu):   # D(p_psi || p_phi)
    return jnp.sum(distill.token_kl(jax.nn.log_softmax(uu), lp_t))

  lp_u = jax.nn.log_softmax(u)[None]
  g_f = distill.dimo_grad_target(lp_u, lp_t[None], masked, 0.0)[0]
  g_r = distill.dimo_grad_target(lp_u, lp_t[None], masked, 1.0)[0]
  g_j = distill.dimo_grad_target(lp_u, lp_t[None], masked, 0.25)[0]
  np.testing.assert_allclose(g_f, jax.grad(fwd_kl)(u), atol=2e-6)
  np.testing.assert_allclose(g_r, jax.grad(rev_kl)(u), atol=2e-6)
  np.testing.assert_allclose(g_j, 0.75 * jax.grad(fwd_kl)(u) + 0.25 * jax.grad(rev_kl)(u),
                             atol=2e-6)
  assert float(jnp.abs(g_f - g_r).max()) > 1e-3     # the two really differ here


# ------------------------------------------------------------------ §5.4 test 4
def test_token_initialisation_masks_exactly_round_r_L_and_embedding_noise_keeps_moment():
  codec = PrimeCodec.create(V, 2)          # Prime digits: a masked token has every digit masked
  length = 37
  for r in (0.0, 0.013, 0.6, 0.5, 1.0):
    digits, masked = distill.init_tokens(jax.random.key(7), codec, 6, length, r)
    want = min(max(int(np.floor(r * length + 0.5)), 1), length)
    assert digits.shape == (6, length, 2)
    np.testing.assert_array_equal(np.asarray(masked).sum(-1), want)
    d = np.asarray(digits)
    assert np.all(d[np.asarray(masked)] == codec.mask_id)
    vis = d[~np.asarray(masked)]
    assert np.all(vis < codec.base) and np.all(codec.decode(vis) >= 0)
  # the visible tokens are uniform random (not constant)
  digits, masked = distill.init_tokens(jax.random.key(8), PrimeCodec.create(V, 1), 64, 64, 0.5)
  vis = np.asarray(digits)[..., 0][~np.asarray(masked)]
  counts = np.bincount(vis, minlength=V)
  assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
  # which positions are masked varies between rows
  assert len({tuple(row) for row in np.asarray(masked)}) > 50
  # e' = sigma eps + sqrt(1 - sigma^2) e keeps E|e'|^2 = sigma^2 d + (1 - sigma^2)|e|^2
  d_emb, sigma = 24, 0.3
  e = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (d_emb,)) * 2.0, (20000, 1, d_emb))
  eps = jax.random.normal(jax.random.key(2), e.shape)
  out = perturb_embeddings(e, sigma, eps)
  want = sigma ** 2 * d_emb + (1 - sigma ** 2) * float(jnp.sum(e[0, 0] ** 2))
  assert float(jnp.mean(jnp.sum(out ** 2, -1))) == pytest.approx(want, rel=0.02)
  np.testing.assert_allclose(perturb_embeddings(e[:2], 0.0, eps[:2]), e[:2], atol=1e-6)
  with pytest.raises(ValueError, match="embed_noise eps has shape"):
    perturb_embeddings(e[:2], 0.1, eps[:3])


def test_backbones_use_the_embedding_noise_and_generator_outputs_valid_tokens(setup):
  _, task, teacher, settings, *_ = setup

  @jax.jit
  def run(p, k):
    digits, _ = distill.init_tokens(k, task.codec, 2, task.seq_len, 0.6)
    z0 = distill.generator_logits(task, p, digits, jax.random.key(1), 0.0)
    plain = task.model.apply({"params": p}, digits, jnp.ones((2,)))
    z1 = distill.generator_logits(task, p, digits, jax.random.key(1), 0.3)
    return z0, plain, z1, distill.one_step_generate(task, p, k, 8, settings)

  z0, plain, z1, tokens = run(teacher, jax.random.key(5))
  np.testing.assert_allclose(z0, plain, atol=1e-5)
  assert float(jnp.abs(z1 - z0).max()) > 1e-3
  # the one-step generator: complete sequences of valid tokens (never the mask id V)
  t = np.asarray(tokens)
  assert t.shape == (8, task.seq_len) and t.dtype == np.int32
  assert t.min() >= 0 and t.max() < V and len(np.unique(t)) > 1
  np.testing.assert_array_equal(t, np.asarray(run(teacher, jax.random.key(5))[3]))
  assert not np.array_equal(t, np.asarray(run(teacher, jax.random.key(6))[3]))
  # the text DiT takes the same argument
  from mdm_jax.networks.dit import DiT, DiTConfig
  dit = DiT(DiTConfig(vocab_size=V, ell=1, base=V, num_layers=1, d_model=16, num_heads=2,
                      cond_dim=16, gate_init=1.0))
  x = jnp.zeros((2, 5, 1), jnp.int32)
  eps = jax.random.normal(jax.random.key(3), (2, 5, 16))

  @jax.jit
  def run_text(eps):
    p = _jitter(nn.unbox(dit.init(jax.random.key(0), x, jnp.ones((2,)))["params"]),
                jax.random.key(2), 0.2)
    return (dit.apply({"params": p}, x, jnp.ones((2,))),
            dit.apply({"params": p}, x, jnp.ones((2,)), embed_noise=(0.5, eps)))

  a, b = run_text(eps)
  assert float(jnp.abs(a - b).max()) > 1e-4


# ------------------------------------------------------------------ §5.4 test 2 + init + freezing
def test_state_starts_from_teacher_fixed_point_and_frozen_parameters(setup):
  c, task, teacher, settings, start, tx, step = setup
  from flax import traverse_util
  state = start(teacher)
  for tree in (state.params["generator"], state.params["auxiliary"],
               state.ema_params["generator"]):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(teacher)):
      np.testing.assert_array_equal(a, b)
  # psi = phi at the start: g = 0, so the first generator update is exactly zero ...
  new, m = step(state, {})
  assert float(m["fkl"]) == 0.0 and float(m["g_norm"]) == 0.0 and float(m["gen_grad_norm"]) == 0
  for a, b in zip(jax.tree.leaves(new.params["generator"]), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(a, b)
  # ... while the auxiliary learns the generator's samples; frozen embeddings, position
  # embeddings and output bias do not move in either model
  frozen = tuple(c.distill.frozen_params)
  flat_t = traverse_util.flatten_dict(teacher)
  flat_a = traverse_util.flatten_dict(new.params["auxiliary"])
  n_frozen = 0
  for k, v in flat_t.items():
    if _name_matches(k, frozen):
      n_frozen += 1
      np.testing.assert_array_equal(flat_a[k], v)
  assert n_frozen == 4   # digit_table, pos_row, pos_col, head_bias
  assert np.abs(np.asarray(flat_a[("head",)]) - np.asarray(flat_t[("head",)])).max() > 0
  assert int(new.step) == 1 and all(np.isfinite(float(v)) for v in m.values())
  # second step: psi != phi now, so g and the generator's gradient are non-zero; the
  # generator's frozen parameters still do not move
  new2, m2 = step(new, {})
  assert float(m2["fkl"]) > 0 and float(m2["g_norm"]) > 0 and float(m2["gen_grad_norm"]) > 0
  flat_g = traverse_util.flatten_dict(new2.params["generator"])
  for k, v in flat_t.items():
    if _name_matches(k, frozen):
      np.testing.assert_array_equal(flat_g[k], v)
  assert np.abs(np.asarray(flat_g[("head",)]) - np.asarray(flat_t[("head",)])).max() > 0


# ------------------------------------------------------------------ §5.4 test 6 (on-policy aux)
def test_generator_steps_with_an_on_policy_auxiliary_descend_the_token_kl(setup):
  """With p_psi = the generator's own output distribution (an exact on-policy auxiliary), the
  surrogate's parameter gradient is (n_masked / B) x the gradient of the token-level forward
  KL to the teacher, and Adam steps on it lower that KL on a fixed batch."""
  _, task, teacher, settings, *_ = setup
  import optax
  gen = _jitter(teacher, jax.random.key(11), 0.2)
  k_init, k_noise, k_s, k_m = jax.random.split(jax.random.key(4), 4)
  b = 4

  @jax.jit
  def fixed_batch(gen):
    digits, _ = distill.init_tokens(k_init, task.codec, b, task.seq_len, settings.r_init)
    z0 = distill.generator_logits(task, gen, digits, k_noise, settings.sigma_p)
    x = distill.sample_from_logits(k_s, task.codec, z0, 1.0)
    noisy, masked, t = distill.remask(k_m, task, x, settings)
    return digits, masked, distill.model_logprobs(task, teacher, noisy, t, True)

  digits, masked, lp_teacher = fixed_batch(gen)
  n = float(jnp.sum(masked))

  def divergence(p):
    lp = task.codec.token_logprobs(distill.generator_logits(task, p, digits, k_noise,
                                                            settings.sigma_p))
    return jnp.sum(distill.token_kl(lp_teacher, lp) * masked) / n

  def surrogate(p):
    z = distill.generator_logits(task, p, digits, k_noise, settings.sigma_p)
    g = distill.dimo_grad_target(task.codec.token_logprobs(z), lp_teacher, masked, 0.0)
    return distill.surrogate_loss(z, g)

  tx = optax.adam(1e-2)
  opt = tx.init(gen)

  @jax.jit
  def upd(p, o):
    g_s, (d, g_d) = jax.grad(surrogate)(p), jax.value_and_grad(divergence)(p)
    u, o = tx.update(g_s, o, p)
    return optax.apply_updates(p, u), o, d, g_s, g_d

  history = []
  for i in range(15):
    gen, opt, d, g_s, g_d = upd(gen, opt)
    history.append(float(d))
    if i == 0:
      for a, c in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_d)):   # float32: compare norms
        c = np.asarray(c) * n / b
        assert np.linalg.norm(np.asarray(a) - c) <= 1e-3 * np.linalg.norm(c) + 1e-7
  assert history[-1] < 0.5 * history[0], history


# ------------------------------------------------------------------ end to end: the real loop
def test_distillation_steps_lower_the_teacher_nll_of_generator_samples(setup):
  """Full two-phase updates (the auxiliary learns on-policy from a copy of the teacher): the
  teacher's NLL of the generator's re-masked samples, on fixed randomness, falls."""
  _, _, teacher, _, start, _, step = setup
  state = start(teacher)
  state = state.replace(params={**state.params, "generator": _jitter(
      state.params["generator"], jax.random.key(2), 0.2)})

  def probe(s):   # the step's own metrics on fixed keys (step 0), averaged over 3 keys
    vals = []
    for i in range(3):
      _, m = step(s.replace(step=jnp.zeros((), jnp.int32),
                            key=jax.random.key_data(jax.random.key(50 + i))), {})
      vals.append(float(m["teacher_nll"]))
    return float(np.mean(vals))

  before = probe(state)
  for _ in range(30):
    state, m = step(state, {})
  after = probe(state)
  assert after < 0.6 * before, (before, after)
  assert int(state.step) == 30 and np.isfinite(float(m["aux_loss"]))


# ------------------------------------------------------------------ config errors
@pytest.mark.parametrize("key,value,match", [
    ("r_init", 1.5, "distill.r_init"), ("sigma_p", -0.1, "distill.sigma_p"),
    ("mask_ratio", "linear", "distill.mask_ratio"), ("beta", 2.0, "distill.beta"),
    ("num_steps", 0, "distill.num_steps"), ("label_smoothing", 1.0, "distill.label_smoothing")])
def test_bad_distill_config_is_rejected(key, value, match):
  c = _config()
  c.distill[key] = value
  with pytest.raises(ConfigError, match=match):
    distill.validate_distill_config(c)


# ------------------------------------------------------------------ CLI: distil + evaluate
def test_cli_distill_resume_and_evaluate(tmp_path):
  from PIL import Image
  from mdm_jax.data import build_data as make_text_data
  from mdm_jax.trainers.classifier import train_classifier
  from mdm_jax.cli import eval_images as eval_images_cli
  from mdm_jax.data import images
  rng = np.random.default_rng(0)
  folder = tmp_path / "imgs"
  for cls in ("dark", "light"):
    (folder / cls).mkdir(parents=True)
    for i in range(12):
      base = 40 if cls == "dark" else 200
      Image.fromarray(np.clip(rng.normal(base, 20, (SIDE, SIDE)), 0, 255).astype(np.uint8)).save(
          folder / cls / f"{i}.png")
  overrides = [f"--config.data.path={folder}", "--config.data.dataset=image_folder",
               "--config.data.channels=1", f"--config.data.seq_len={SIDE * SIDE}",
               f"--config.model.image_shape=({SIDE}, {SIDE}, 1)",
               "--config.data.eval_fraction=0.25", "--config.data.max_eval_examples=0",
               "--config.data.max_train_examples=0"]
  c = _config()
  c.data.path, c.data.dataset, c.data.channels = str(folder), "image_folder", 1
  c.data.eval_fraction, c.data.max_eval_examples, c.data.max_train_examples = 0.25, 0, 0
  # a teacher checkpoint (random weights stand in for a trained run)
  teacher_wd = str(tmp_path / "teacher")
  data = make_text_data(c.data)
  task = build_task(c, data.tokenizer.vocab_size)
  mesh = shd.make_mesh(c.mesh)
  tx, _ = make_optimizer(c.training)
  state, _ = init_state(task, tx, mesh, shd.logical_rules(c.mesh), 0)
  ck = ckpt_lib.Checkpointer(os.path.join(teacher_wd, "checkpoints"), async_save=False)
  ck.save(5, state, None, to_dict(c), force=True)
  ck.close()
  clf_dir = str(tmp_path / "clf")
  train_classifier(data.images("train"), data.train_labels, data.num_classes,
                               steps=3, batch_size=8, path=clf_dir)

  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  cfg = "--config=configs/fashion_mnist_mdm.py:tiny"
  wd = str(tmp_path / "dimo")
  dflags = ["--config.distill.batch_size=4", "--config.distill.log_every=1",
            "--config.distill.num_samples=4", "--config.distill.checkpoint_every=2"]
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", cfg, "--mode=distill",
                         f"--workdir={wd}", f"--teacher_workdir={teacher_wd}",
                         "--config.distill.num_steps=2", *dflags, *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "distill 2/2" in proc.stderr and "steps/s" in proc.stderr
  res = json.loads(proc.stdout)
  assert res["step"] == 2 and os.path.isfile(res["grid_png"])
  assert images.read_png(res["grid_png"]).shape[0] >= 2 * SIDE
  meta = json.load(open(os.path.join(wd, "distill_meta.json")))
  assert meta["teacher_workdir"] == teacher_wd
  # the one-step generator's classifier Frechet distance (eval_images --mode=evaluate_distilled)
  out = eval_images_cli.evaluate_generator(c, wd, clf_dir, num_samples=8, sample_batch=4)
  assert out["step"] == 2 and out["nfe_per_sample"] == 1 and out["fd_num_samples"] == 8
  assert out["classifier_frechet_distance"] >= 0 and out["seconds_per_image"] > 0
  assert out["bits_per_dim"] is None and os.path.isfile(out["grid_png"])
  assert os.path.isfile(os.path.join(wd, "image_eval_onestep_step_2.json"))
  # resume (in process): the run restores step 2 (nothing left to do at num_steps=2)
  c.distill.batch_size, c.distill.log_every, c.distill.num_samples = 4, 1, 0
  c.distill.num_steps, c.distill.checkpoint_every = 2, 2
  with pytest.raises(ConfigError, match="--teacher_workdir"):
    distill.distill(c, "", wd)
  res = distill.distill(c, teacher_wd, wd)
  assert res["step"] == 2
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True, async_save=False)
  assert ck.latest_step() == 2
  ck.close()
