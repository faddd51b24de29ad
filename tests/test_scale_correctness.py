"""Correctness at scale: results must not depend on how the network is laid out or which
compute dtype it runs in, the bound must be valid for every schedule, the samplers must
query the network only where it was trained, and the EMA must follow the parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mdm_jax.configs.base import get_base_config
from mdm_jax.diffusion import elbo, prime
from mdm_jax.diffusion.schedules import get_schedule
from mdm_jax.networks import build_model, weight_decay_mask
from mdm_jax.trainers.state import make_optimizer


def _model_cfg(**kw):
  c = get_base_config().model
  c.num_layers, c.d_model, c.num_heads, c.cond_dim, c.mlp_ratio = 2, 32, 2, 16, 2
  for k, v in kw.items():
    c[k] = v
  return c


def _init(model, ell=1, vocab=20, seq_len=8):
  x = jnp.asarray(np.random.default_rng(0).integers(0, vocab + 1, (2, seq_len, ell)))
  return nn.unbox(model.init(jax.random.key(0), x, jnp.ones(2)))["params"], x


def _stack_blocks(unrolled, num_layers):
  """The unrolled tree (``block_i``) in the scanned layout (``blocks``, layers first)."""
  out = {k: v for k, v in unrolled.items() if not k.startswith("block_")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[unrolled[f"block_{i}"] for i in range(num_layers)])
  return out


# ------------------------------------------------------------------ 1. weight decay by path
def test_weight_decay_mask_same_for_scanned_and_unrolled_layers():
  kw = dict(local_conv=3, mlp_bias=True, head_bias=True)
  ps, _ = _init(build_model(_model_cfg(scan_layers=True, **kw), vocab_size=20, ell=1, base=20))
  pl, _ = _init(build_model(_model_cfg(scan_layers=False, **kw), vocab_size=20, ell=1, base=20))
  ms = weight_decay_mask(ps)
  unrolled = weight_decay_mask(pl)
  assert unrolled["block_0"] == unrolled["block_1"]
  ml = {k: v for k, v in unrolled.items() if not k.startswith("block_")}
  ml["blocks"] = unrolled["block_0"]          # block_i/x -> blocks/x
  flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ms)}
  flat_l = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ml)}
  assert flat_s == flat_l
  # Matrices and tables are decayed; norm scales, adaLN / MLP / head biases are not.
  assert ms["blocks"]["qkv"] and ms["blocks"]["mlp_in"] and ms["head"] and ms["embed"]["table"]
  assert ms["blocks"]["adaLN"]["kernel"] and ms["blocks"]["local_conv"]
  assert not ms["blocks"]["ln_attn"]["scale"] and not ms["blocks"]["adaLN"]["bias"]
  assert not ms["blocks"]["mlp_in_bias"] and not ms["head_bias"]
  assert not ms["ln_final"]["scale"]
  # A learned schedule's parameters are never decayed, whatever their shape.
  sched = {"schedule": {"hidden": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}}
  assert not any(jax.tree.leaves(weight_decay_mask(sched)))


def test_one_decayed_step_is_the_same_scanned_and_unrolled():
  tc = get_base_config().training
  tc.weight_decay, tc.warmup_steps, tc.learning_rate, tc.lr_schedule = 0.1, 1, 1e-2, "constant"
  tx, _ = make_optimizer(tc)
  ml = build_model(_model_cfg(scan_layers=False), vocab_size=20, ell=1, base=20)
  pl, _ = _init(ml)
  ps = _stack_blocks(pl, 2)
  rng = np.random.default_rng(1)
  gl = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), pl)
  gs = _stack_blocks(gl, 2)

  def step(params, grads):
    # Two steps, so Adam's moments and the decay both act.
    state = tx.init(params)
    for _ in range(2):
      upd, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, upd)
    return params

  new_s, new_l = step(ps, gs), _stack_blocks(step(pl, gl), 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-6, atol=1e-7), new_s, new_l)
  # With a zero gradient a norm scale stays exactly 1 (no decay), a matrix shrinks.
  zeros = jax.tree.map(jnp.zeros_like, ps)
  z = step(ps, zeros)
  np.testing.assert_array_equal(np.asarray(z["blocks"]["ln_attn"]["scale"]), 1.0)
  assert np.all(np.abs(np.asarray(z["blocks"]["qkv"])) <= np.abs(np.asarray(ps["blocks"]["qkv"])))
  assert not np.allclose(np.asarray(z["blocks"]["qkv"]), np.asarray(ps["blocks"]["qkv"]))


# ------------------------------------------------------------------ 3. float32 logits
def test_bf16_model_bound_matches_float32_twin():
  """Under bfloat16 compute the head accumulates in and returns float32.

  The parameters are chosen so that every input of the head is exact in bfloat16 (adaLN-Zero
  blocks are the identity at init, each embedding row is +-0.5 with zero mean so the final
  norm gives +-1, and the head's weights are bfloat16 numbers): the only difference left
  between the two dtypes is how the head's dot is accumulated and rounded.  Logits rounded
  to bfloat16 (8 bits: steps of 1/16 between 8 and 16) moved the per-sequence bound (100 to
  250 nats here) by up to 0.5 nats; float32 logits leave about 5e-4 (float32 sums).
  """
  vocab, length, d = 64, 16, 32
  rng = np.random.default_rng(0)
  m32 = build_model(_model_cfg(d_model=d, dtype="float32"), vocab_size=vocab, ell=1, base=vocab)
  m16 = build_model(_model_cfg(d_model=d, dtype="bfloat16"), vocab_size=vocab, ell=1,
                    base=vocab)
  params, _ = _init(m32, vocab=vocab, seq_len=length)
  signs = np.stack([rng.permutation(np.repeat([0.5, -0.5], d // 2)) for _ in range(vocab + 1)])
  params["embed"]["table"] = jnp.asarray(signs, jnp.float32)
  head = jnp.asarray(rng.normal(size=(d, vocab)) * 1.0, jnp.bfloat16).astype(jnp.float32)
  params["head"] = head
  codec = prime.PrimeCodec.create(vocab, 1)
  schedule = get_schedule(ml_collections.ConfigDict({"name": "linear"}))
  cfg = elbo.DiffusionLossConfig(t_min=1e-3)
  tokens = jnp.asarray(rng.integers(0, vocab, (8, length)))

  def bound(model):
    def apply_fn(p, digits, t, *, train=False, rng=None):
      del rng
      return model.apply({"params": p}, digits, t, train=train)
    logits = apply_fn(params, jnp.full((2, length, 1), vocab), jnp.ones(2))
    b = elbo.diffusion_bound(apply_fn, params, tokens, jax.random.key(3), codec=codec,
                             schedule=schedule, cfg=cfg, num_time_samples=2)
    return logits, np.asarray(b, np.float64)

  l32, b32 = bound(m32)
  l16, b16 = bound(m16)
  assert np.abs(np.asarray(l32)).max() > 8.0          # logits where bfloat16 steps are 1/16
  err = np.abs(b16 - b32).max()
  assert err < 5e-3, (err, b32)
  assert l16.dtype == jnp.float32


# ------------------------------------------------------------------ 6. EMA warm-up
def _tiny_train(ema_decay=0.9999, steps=3):
  from mdm_jax.core import sharding as shd          # pylint: disable=import-outside-toplevel
  from mdm_jax.tasks import build_task                # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.state import init_state      # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.steps import make_train_step  # pylint: disable=import-outside-toplevel
  c = get_base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.cond_dim = 1, 32, 2, 16
  c.model.mlp_ratio, c.model.gate_init = 2, 1.0
  c.data.seq_len, c.training.batch_size, c.prime.ell = 8, 4, 1
  c.training.warmup_steps, c.training.lr_schedule, c.training.learning_rate = 1, "constant", 1e-2
  c.training.ema_decay = ema_decay
  c.mesh.shape = (1, 1, 1)
  mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
  rules = shd.logical_rules(c.mesh)
  task = build_task(c, vocab_size=12)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, seed=0)
  step = make_train_step(task, tx, c, mesh, rules, shardings)
  params = [jax.device_get(state.params)]
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    for _ in range(steps):
      tokens = rng.integers(0, 12, (4, 8)).astype(np.int32)
      state, _ = step(state, {"tokens": shd.global_batch(tokens, shd.batch_sharding(mesh))})
      params.append(jax.device_get(state.params))
  return params, jax.device_get(state.ema_params)


def test_ema_warmup_follows_the_parameters():
  decay = 0.9999
  params, ema = _tiny_train(decay, steps=3)
  want = params[0]
  for n in range(3):      # the closed form: e_{n+1} = d_n e_n + (1 - d_n) p_{n+1}
    d = min(decay, (1.0 + n) / (10.0 + n))
    want = jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, want, params[n + 1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ema, want)

  def dist(a, b):
    return float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))
  # After three steps the EMA sits by the current parameters, not by the initial ones.
  assert dist(ema, params[-1]) < 0.5 * dist(ema, params[0])


# ------------------------------------------------------------------ 2. scan_layers on resume
def test_resume_with_scan_layers_flipped_names_the_key(tmp_path):
  import os                                          # pylint: disable=import-outside-toplevel
  import subprocess                                  # pylint: disable=import-outside-toplevel
  import sys                                         # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  wd = str(tmp_path / "run")
  args = [sys.executable, "-m", "mdm_jax.main", "--config=configs/shakespeare_prime.py:tiny",
          "--config.data.tokenizer=char", "--config.model.num_layers=2",
          "--config.model.d_model=32", "--config.data.seq_len=16",
          "--config.training.num_steps=2", "--config.eval.every_steps=0",
          "--config.eval.num_batches=1", "--config.sampling.num_steps=2",
          "--config.sampling.num_samples=1", "--config.checkpoint.every_steps=2",
          f"--workdir={wd}"]
  first = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  proc = subprocess.run(args[:-1] + ["--config.training.num_steps=4",
                                     "--config.model.scan_layers=false", f"--workdir={wd}"],
                        cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "model.scan_layers: checkpoint=True  current=False" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "orbax" not in proc.stderr.lower()


# ------------------------------------------------------------------ 4. loglinear ends masked
def test_loglinear_is_fully_masked_at_one_and_its_bound_is_valid():
  """The samplers start from all-masked, so alpha(1) must be 0; with eps = 0.5 (exaggerated,
  so that a missing [alpha(1) > 0] part of the bound shows) the bound of the Bayes-optimal
  decoder on a 3-token Markov chain equals the entropy found by enumeration."""
  from tests.test_losses import _markov_source, _oracle_apply  # pylint: disable=import-outside-toplevel
  for eps in (1e-3, 0.5):
    s = get_schedule(ml_collections.ConfigDict({"name": "loglinear", "eps": eps}))
    assert float(s.alpha(jnp.float32(1.0))) == 0.0
    assert float(s.alpha(jnp.float32(0.0))) == 1.0
    t = jnp.linspace(1e-3, 1.0, 50)
    assert np.all(np.isfinite(np.asarray(s.weight(t)))) and np.all(np.asarray(s.weight(t)) > 0)
  seqs, probs, h = _markov_source()
  codec = prime.PrimeCodec.create(4, 1)
  apply_fn = _oracle_apply(codec, seqs, probs)
  rng = np.random.default_rng(1)
  n = 40000
  tokens = jnp.asarray(seqs[rng.choice(len(probs), size=n, p=probs / probs.sum())])
  cfg = elbo.DiffusionLossConfig(form="marginal", t_min=1e-3)
  loss, _ = jax.jit(lambda k: elbo.diffusion_loss(apply_fn, None, tokens, k, codec=codec,
                                                  schedule=s, cfg=cfg, train=False))(
                                                      jax.random.key(1))
  loss = np.asarray(loss, np.float64)
  m, se = loss.mean(), loss.std() / np.sqrt(n)
  assert m >= h - 4 * se, (m, h, se)
  assert abs(m - h) < 4 * se + 0.02, (m, h, se)


# ------------------------------------------------------------------ 5. sampling time grid
def test_samplers_query_the_network_only_at_trained_times():
  """Training draws t >= training.t_min; every diffusion sampler the task runs must ask a
  time-conditioned network only about such times (the last draw happens at t_min)."""
  from mdm_jax.sampling import generate                # pylint: disable=import-outside-toplevel
  from mdm_jax.tasks import build_task                # pylint: disable=import-outside-toplevel
  c = get_base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.cond_dim = 1, 16, 2, 8
  c.model.time_conditioning = True
  c.data.seq_len, c.prime.ell = 6, 2
  c.training.t_min = 0.05          # large, so a grid ending at 1e-5 would be caught
  task = build_task(c, vocab_size=9)
  vocab = task.codec.vocab_size
  for name in ("ancestral", "confidence", "first_hitting", "maskgit", "remdm", "self_correct",
               "punt", "eb", "fast_dllm"):
    seen = []

    def apply_fn(params, digits, t, *, train=False, rng=None):
      del params, train, rng
      jax.debug.callback(lambda x: seen.append(np.asarray(x).copy()), t)
      return jnp.zeros(digits.shape[:2] + (vocab,), jnp.float32)

    kw = task.sampler_kwargs(name, c, 2, 6, 8)
    kw.update(generate.sampler_options(generate.get_sampler(name), c.sampling))
    res = generate.get_sampler(name)(apply_fn, None, jax.random.key(0), **kw)
    jax.block_until_ready(res.tokens)
    times = np.concatenate([np.ravel(s) for s in seen])
    assert times.size and times.min() >= 0.05 * (1 - 1e-6), (name, times.min())
    assert np.all(np.asarray(res.digits) != task.codec.mask_id), name
