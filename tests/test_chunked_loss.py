"""The head and the loss a slice of positions at a time (``model.loss_chunk``) and the padded
head (``model.vocab_multiple``) change no number: the training loss and its gradient, and
the evaluation bound, equal those computed from the full logits (float32, tiny models)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging
from jax.sharding import PartitionSpec as P

from mdm_jax.configs import shakespeare_mdm, shakespeare_prime
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion import elbo, prime
from mdm_jax.tasks import build_task

VOCAB = 37          # odd, as GPT-2's 50,257: a padded head has 48 columns at multiple 16


def _config(ell, overrides):
  c = (shakespeare_mdm.get_config("tiny") if ell == 1
       else shakespeare_prime.get_config(f"ell={ell},tiny"))
  c.model.dtype = "float32"
  c.model.dropout = 0.0
  c.model.num_layers = 1            # the head and the loss are what is tested: keep it small
  c.data.seq_len = 32
  c.update_from_flattened_dict(overrides)
  return c


def _params(task):
  @jax.jit
  def init(key):
    params = nn.unbox(task.init_params(key))
    # Perturb the zero-initialised head and adaLN so the predictions are not uniform.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return init(jax.random.key(0))


def _loss_and_grad(task, params, tokens, key):
  def total(p):
    per_seq, _ = task.loss(p, tokens, key, train=True)
    return jnp.sum(per_seq), per_seq
  return jax.jit(jax.value_and_grad(total, has_aux=True))(params)


def _close(a, b, rtol=2e-5, scale_atol=2e-6):
  """Equal up to float32 summation order: rtol, plus an atol of ``scale_atol`` times the
  leaf's largest entry (a gradient entry is a sum of terms much larger than itself)."""
  def one(x, y):
    y = np.asarray(y)
    atol = scale_atol * float(np.max(np.abs(y))) + 1e-6
    np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=atol)
  jax.tree.map(one, a, b)


CASES = {
    "mdm_padded": (1, {"model.vocab_multiple": 16}),
    "prime2_marginal": (2, {"schedule.name": "linear"}),
    "prime2_marginal_no_carry": (2, {"schedule.name": "linear", "prime.carry_over": False,
                                     "model.vocab_multiple": 16}),
    "prime2_joint": (2, {"schedule.name": "linear", "prime.loss": "joint"}),
    "prime2_flat": (2, {"schedule.name": "linear", "training.loss_weighting": "flat"}),
    "prime2_slot_weights": (2, {"schedule.name": "slot_poly"}),
    "prime2_genmd4": (2, {"schedule.name": "genmd4", "sampling.sampler": "ancestral",
                          "model.vocab_multiple": 16}),
    "prime2_plackett_luce": (2, {"schedule.name": "plackett_luce",
                                 "model.time_conditioning": False}),
    "mdm_learned_poly": (1, {"schedule.name": "learned_poly"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_loss_and_gradient_equal_the_full_logits(case):
  ell, overrides = CASES[case]
  full = build_task(_config(ell, overrides), VOCAB)
  chunked = build_task(_config(ell, {**overrides, "model.loss_chunk": 24}), VOCAB)
  assert full.split is None and chunked.split.chunk == 24
  assert elbo.chunk_length(full.seq_len, 24) == 16          # 32 positions: 2 slices of 16
  params = _params(full)
  tokens = jax.random.randint(jax.random.key(2), (4, full.seq_len), 0, VOCAB)
  key = jax.random.key(3)
  (l_full, per_full), g_full = _loss_and_grad(full, params, tokens, key)
  (l_chunk, per_chunk), g_chunk = _loss_and_grad(chunked, params, tokens, key)
  assert np.all(np.isfinite(np.asarray(per_full)))
  _close(per_chunk, per_full)
  _close(l_chunk, l_full)
  _close(g_chunk, g_full)


@pytest.mark.parametrize("ell", [1, 2])
def test_eval_bound_is_unchanged(ell):
  cfg = _config(ell, {"schedule.name": "linear", "model.vocab_multiple": 16})
  full = build_task(cfg, VOCAB)
  cfg.model.loss_chunk = 16
  chunked = build_task(cfg, VOCAB)
  params = _params(full)
  tokens = jax.random.randint(jax.random.key(4), (4, full.seq_len), 0, VOCAB)
  key = jax.random.key(5)
  b_full = jax.jit(lambda p: full.bound(p, tokens, key, 2))(params)
  b_chunk = jax.jit(lambda p: chunked.bound(p, tokens, key, 2))(params)
  _close(b_chunk, b_full)
  with elbo.unrolled_slices():          # the straight-line form the FLOP count lowers
    b_unrolled = jax.jit(lambda p: chunked.bound(p, tokens, key, 2))(params)
  _close(b_unrolled, b_full)


def test_padded_head_masks_its_extra_columns():
  task = build_task(_config(2, {"model.vocab_multiple": 16}), VOCAB)
  params = _params(task)
  assert params["head"].shape[-1] == 48
  digits = task.codec.encode(jax.random.randint(jax.random.key(6), (2, task.seq_len), 0, VOCAB))
  t = jnp.full((2,), 0.5)
  logits = task.apply_fn(params, digits, t)
  assert logits.shape == (2, task.seq_len, VOCAB)           # what samplers see: exactly V
  x = task.features_fn(params, digits, t)
  padded = task.model.head_logits(params, x)
  assert padded.shape == (2, task.seq_len, 48)
  # Equal up to float32 rounding: the head's matmul is fused differently at 48 columns.
  _close(padded[..., :VOCAB], logits)
  assert np.all(np.asarray(padded[..., VOCAB:]) <= -1e8)
  # The codec reads only the first V columns: the same code logits either way.
  _close(task.codec.code_logits(padded), task.codec.code_logits(logits))
  # Nothing of the padding reaches a probability.
  lp = task.codec.token_logprobs(padded)
  np.testing.assert_allclose(np.asarray(jnp.sum(jnp.exp(lp), -1)), 1.0, rtol=1e-5)


def test_code_logits_refuse_too_few_columns():
  codec = prime.PrimeCodec.create(VOCAB, 2)
  with pytest.raises(ValueError, match="V = 37"):
    codec.code_logits(jnp.zeros((1, VOCAB - 1)))


def test_loss_chunk_is_checked():
  with pytest.raises(ConfigError, match="loss_chunk"):
    build_task(_config(2, {"model.loss_chunk": -1}), VOCAB)


def test_replicated_dimension_warns_once_per_name(monkeypatch):
  seen = []
  monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: seen.append(msg % a))
  monkeypatch.setattr(shd, "_REPLICATED_WARNED", set())
  mesh = shd.make_mesh(_config(1, {"mesh.shape": (1, 1, -1)}).mesh)
  if mesh.shape["tensor"] < 2:
    # One device: build the message path with a fake axis size instead.
    monkeypatch.setattr(shd, "_axis_size", lambda m, e: 2)
  for _ in range(3):
    assert shd.fit_spec(P(None, "tensor"), (8, VOCAB), mesh, "head") == P(None, None)
  assert shd.fit_spec(P(None, "tensor"), (8, 48), mesh, "head") == P(None, "tensor")
  shd.fit_spec(P("tensor"), (VOCAB,), mesh, "head_bias")
  assert len(seen) == 2 and "head" in seen[0] and "head_bias" in seen[1]
  assert "vocab_multiple" in seen[0]
