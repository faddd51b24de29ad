"""The GPT-2 judge (mdm_jax/networks/gpt2.py) against Hugging Face's GPT2LMHeadModel, and the
peers' generative-perplexity protocol (mdm_jax/metrics/gen_ppl.py, ``score_texts_judge``).

The fixtures in tests/fixtures/gpt2/ were written once by ``make_gpt2_fixture.py`` there with
torch and transformers: a tiny random GPT-2 (2 layers, d = 32, vocabulary 100, 64 positions)
as model.safetensors and as pytorch_model.bin, its tokenizer, and its logits and per-token
NLL on fixed ids.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.core.errors import ConfigError
from mdm_jax.metrics import gen_ppl
from mdm_jax.networks import gpt2
from mdm_jax.trainers import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "gpt2")


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIX, "reference.npz")))


@pytest.mark.parametrize("sub", ["tiny", "tiny_bin"])
def test_logits_match_transformers(sub, reference):
  model, params, cfg = gpt2.load_gpt2(os.path.join(FIX, sub))
  assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.eos_token_id) == (2, 32, 100, 99)
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(reference["ids"])))
  ref = reference["logits"]
  assert logits.shape == ref.shape
  assert np.std(ref) > 0.1                       # logits that differ between tokens
  np.testing.assert_allclose(logits, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)
  nll = np.asarray(gpt2.token_nll_fn(model, params)(jnp.asarray(reference["ids"])))
  assert np.all(nll[:, 0] == 0)
  np.testing.assert_allclose(nll[:, 1:], reference["nll"], atol=1e-4, rtol=1e-5)


def test_a_wrong_weight_changes_the_logits(reference, tmp_path):
  """The comparison has power: a transposed attention projection is caught."""
  model, params, _ = gpt2.load_gpt2(os.path.join(FIX, "tiny"))
  bad = jax_tree_copy(params)
  k = bad["h_0"]["c_proj"]["kernel"]
  bad["h_0"]["c_proj"]["kernel"] = k.T
  logits = np.asarray(model.apply({"params": bad}, jnp.asarray(reference["ids"])))
  assert np.abs(logits - reference["logits"]).max() > 1e-2


def jax_tree_copy(params):
  return {k: (jax_tree_copy(v) if isinstance(v, dict) else v) for k, v in params.items()}


def test_bad_folders_are_refused(tmp_path):
  with pytest.raises(ConfigError, match="config.json"):
    gpt2.load_gpt2(str(tmp_path))
  d = tmp_path / "m"
  shutil.copytree(os.path.join(FIX, "tiny"), d)
  os.remove(d / "model.safetensors")
  with pytest.raises(ConfigError, match="neither model.safetensors"):
    gpt2.load_gpt2(str(d))
  cfg = json.load(open(os.path.join(FIX, "tiny", "config.json")))
  cfg["scale_attn_by_inverse_layer_idx"] = True
  shutil.copy(os.path.join(FIX, "tiny", "model.safetensors"), d / "model.safetensors")
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
    gpt2.load_gpt2(str(d))


def test_judge_rows_count_up_to_the_first_eos():
  eos = 9
  toks, mask = gen_ppl.judge_rows([np.array([1, 2, 3]), np.array([eos, 4, eos, 5, 6, 7, 8, 1])],
                                  max_length=6, context=3, eos_id=eos)
  np.testing.assert_array_equal(toks, [[1, 2, 3, eos, eos, eos], [eos, 4, eos, 5, 6, 7]])
  # Row 0: chunk [1 2 3] counts 2, 3; chunk [eos eos eos]: position 3 opens a chunk (not
  # counted), and the first EOS at a position >= 1 was at position 3, so nothing after it.
  np.testing.assert_array_equal(mask[0], [0, 1, 1, 0, 0, 0])
  # Row 1: a leading EOS is context; the EOS at position 2 is counted, nothing after it.
  np.testing.assert_array_equal(mask[1], [0, 1, 1, 0, 0, 0])
  _, mask = gen_ppl.judge_rows([np.array([1, 2])], max_length=6, context=6, eos_id=eos)
  np.testing.assert_array_equal(mask[0], [0, 1, 1, 0, 0, 0])   # the closing EOS is charged


def test_generative_perplexity_under_gpt2(reference):
  """score_texts_judge equals the protocol applied by hand to the reference NLL."""
  scorer = inference.load_scorer("gpt2:" + os.path.join(FIX, "tiny"))
  assert scorer.protocol == "judge" and scorer.seq_len == 64 and scorer.eos_id == 99
  ids = reference["ids"]
  texts = [scorer.tokenizer.decode(row) for row in ids]
  for row, text in zip(ids, texts):
    np.testing.assert_array_equal(scorer.tokenizer.encode(text), row)   # round trip
  scorer.max_length = 40                 # one chunk of 40 <= 64 positions: the reference's rows
  scorer.seq_len = 40
  res = gen_ppl.score_texts(scorer, texts, batch_size=2)
  # By hand: tokens 2..40 of each row, row 1 up to and including its EOS at position 25.
  nll = reference["nll"]
  total = nll[0].sum() + nll[1, :25].sum() + nll[2].sum()
  count = 39 + 25 + 39
  assert res["num_tokens"] == count
  np.testing.assert_allclose(res["nats_per_token"], total / count, rtol=1e-5)
  np.testing.assert_allclose(res["gen_ppl"], np.exp(total / count), rtol=1e-5)
  ent = np.mean([-(p * np.log(p)).sum() for p in
                 (np.unique(r, return_counts=True)[1] / len(r) for r in ids)])
  np.testing.assert_allclose(res["sample_entropy"], ent, rtol=1e-6)
  # Batching does not move the number.
  res1 = gen_ppl.score_texts(scorer, texts, batch_size=1)
  np.testing.assert_allclose(res1["gen_ppl"], res["gen_ppl"], rtol=1e-6)


def test_features_match_transformers_hidden_states(reference):
  scorer = inference.load_scorer("gpt2:" + os.path.join(FIX, "tiny"))
  h = np.asarray(scorer.features(reference["ids"]))
  np.testing.assert_allclose(h, reference["features"], atol=1e-4, rtol=0)
  texts = [scorer.tokenizer.decode(row[:n]) for row, n in zip(reference["ids"], (40, 17, 3))]
  f = gen_ppl.text_features(scorer, texts, batch_size=2)
  np.testing.assert_allclose(f, reference["features"][[0, 1, 2], [39, 16, 2]], atol=1e-4)


def test_mauve_on_judge_features_tells_apart_a_collapsed_sampler():
  mauve = pytest.importorskip("mauve", reason="pip install -e '.[test]' (mauve-text)")
  del mauve
  scorer = inference.load_scorer("gpt2:" + os.path.join(FIX, "tiny"))
  rng = np.random.default_rng(0)
  words = lambda n, hi: [" ".join(f"w{i}" for i in rng.integers(0, hi, 12)) for _ in range(n)]  # noqa: E731
  reference, same, collapsed = words(60, 50), words(60, 50), ["w97 " * 11 + "w97"] * 60
  good = gen_ppl.mauve_score(scorer, reference, same)
  bad = gen_ppl.mauve_score(scorer, reference, collapsed)
  assert good["mauve"] > 0.5 > bad["mauve"] and good["num_samples"] == 60, (good, bad)
  ar_like = gen_ppl.Scorer(token_nll=None, tokenizer=scorer.tokenizer, seq_len=8)
  with pytest.raises(gen_ppl.ScoreError, match="no features"):
    gen_ppl.text_features(ar_like, ["w1"])
