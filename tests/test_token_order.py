"""data.token_order: the context numbering of the vocabulary and everything that carries it."""

import json
import os

import numpy as np
import pytest

from mdm_jax.configs.base import get_base_config
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.core.config import to_dict
from mdm_jax.core.errors import ConfigError
from mdm_jax.tasks import validate_config
from mdm_jax import data as data_lib
from mdm_jax.diffusion import prime
from mdm_jax.data import array_record_prepare as ar
from mdm_jax.data import text as text_lib
from mdm_jax.data import token_order
from mdm_jax.data import tokenizers as tokenizers_lib


def _class_language(num_classes=8, per_class=8, length=40_000, seed=0):
  """A stream whose tokens are interchangeable within a class.

  The class sequence is a Markov chain with a random (Dirichlet) transition
  matrix, so no two classes share their contexts; the token is uniform within
  its class; token ids are then shuffled, so the original numbering says
  nothing about the classes.
  Returns (stream, classes): ``classes[k]`` is the set of ids of class k.
  """
  rng = np.random.default_rng(seed)
  k = num_classes
  cumulative = np.cumsum(rng.dirichlet(np.full(k, 0.5), size=k), axis=1)
  u = rng.random(length)
  cls = np.empty(length, np.int64)
  cls[0] = 0
  for i in range(1, length):
    cls[i] = min(int(np.searchsorted(cumulative[cls[i - 1]], u[i])), k - 1)
  within = rng.integers(0, per_class, length)
  shuffle = rng.permutation(k * per_class)
  stream = shuffle[cls * per_class + within]
  classes = [set(shuffle[c * per_class:(c + 1) * per_class].tolist()) for c in range(k)]
  return stream, classes


def _digit0_groups(rank, classes, block):
  return [{int(rank[t]) // block for t in members} for members in classes]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_context_order_puts_each_word_class_in_one_prime_digit(seed):
  stream, classes = _class_language(seed=seed)
  # The fixture is not trivially solved by the original ids: classes straddle blocks.
  assert any(len(g) > 1 for g in _digit0_groups(np.arange(64), classes, 8))
  order = token_order.context_order(stream, 64)
  assert sorted(order.tolist()) == list(range(64))
  rank = token_order.rank_of(order)
  assert all(len(g) == 1 for g in _digit0_groups(rank, classes, 8))
  # So with Prime ell = 2 (b = 8) the first digit of a token is exactly its class.
  codec = prime.PrimeCodec.create(64, 2)
  digits = np.asarray(codec.encode(rank[stream]))
  for members in classes:
    ids = np.array(sorted(members))
    assert len(set(np.asarray(codec.encode(rank[ids]))[:, 0].tolist())) == 1
  assert digits.shape == (len(stream), 2)


def test_context_order_is_a_deterministic_permutation_for_any_vocabulary():
  rng = np.random.default_rng(1)
  stream = rng.integers(0, 50, 5_000)           # ids 50..99 never occur
  a = token_order.context_order(stream, 100)
  b = token_order.context_order(stream, 100)
  np.testing.assert_array_equal(a, b)
  assert sorted(a.tolist()) == list(range(100))
  np.testing.assert_array_equal(token_order.rank_of(a)[a], np.arange(100))


def test_random_order_is_a_seeded_permutation(corpus, tmp_path):
  a = token_order.compute_order("random", None, 300, seed=4)
  np.testing.assert_array_equal(a, token_order.compute_order("random", None, 300, seed=4))
  assert sorted(a.tolist()) == list(range(300)) and not np.array_equal(a, np.arange(300))
  assert not np.array_equal(a, token_order.compute_order("random", None, 300, seed=5))
  work = str(tmp_path / "w")
  one = data_lib.build_data(_text_cfg(corpus, token_order="random"), work)
  two = data_lib.build_data(_text_cfg(corpus, token_order="random", shuffle_seed=1), work)
  assert one.tokenizer.fingerprint() != two.tokenizer.fingerprint()   # the seed is in the key
  with pytest.raises(ValueError, match="data.token_order='nope'"):
    token_order.compute_order("nope", None, 10)


def test_context_order_errors():
  with pytest.raises(ValueError, match="at least 2 tokens"):
    token_order.context_order(np.array([3]), 10)
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    token_order.context_order(np.array([1, 2, 10]), 10)


def test_reordered_tokenizer_round_trip_and_save(tmp_path):
  text = "To be, or not to be: that is the question.\n"
  base = tokenizers_lib.CharTokenizer.from_text(text)
  order = np.random.default_rng(0).permutation(base.vocab_size)
  tok = tokenizers_lib.ReorderedTokenizer(base, order, "context")
  ids = tok.encode(text)
  np.testing.assert_array_equal(ids, tok.rank[base.encode(text)])
  assert not np.array_equal(ids, base.encode(text))
  assert tok.decode(ids) == text
  assert tok.fingerprint() != base.fingerprint()
  tok.save(str(tmp_path / "t.json"))
  back = tokenizers_lib.load_tokenizer(str(tmp_path / "t.json"))
  assert isinstance(back, tokenizers_lib.ReorderedTokenizer)
  assert back.fingerprint() == tok.fingerprint()
  np.testing.assert_array_equal(back.encode(text), ids)
  with pytest.raises(ValueError, match="permutation"):
    tokenizers_lib.ReorderedTokenizer(base, np.zeros(base.vocab_size, int), "context")


def _text_cfg(path, **overrides):
  cfg = get_base_config().data
  cfg.dataset, cfg.path, cfg.tokenizer, cfg.seq_len = "text_files", str(path), "char", 32
  cfg.eval_fraction = 0.1
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "plays.txt"
  path.write_text(data_lib.shakespeare_text()[:30_000], encoding="utf-8")
  return path


def test_make_text_data_renumbers_from_the_train_rows_and_caches(corpus, tmp_path, monkeypatch):
  plain = data_lib.build_data(_text_cfg(corpus))
  work = str(tmp_path / "w")
  data = data_lib.build_data(_text_cfg(corpus, token_order="context"), work)
  tok = data.tokenizer
  assert isinstance(tok, tokenizers_lib.ReorderedTokenizer)
  # Same text, new ids: the rows are the plain rows renumbered, and decode the same.
  np.testing.assert_array_equal(data.train, tok.rank[plain.train])
  np.testing.assert_array_equal(data.eval, tok.rank[plain.eval])
  assert tok.decode(data.train[3]) == plain.tokenizer.decode(plain.train[3])
  # Computed from the training rows alone (the held-out tail does not leak into it).
  np.testing.assert_array_equal(
      tok.order, token_order.context_order(plain.train.reshape(-1), tok.vocab_size))
  # Cached: a second load reuses the file and never recomputes.
  cache = os.path.join(work, "tokenizer", text_lib.ORDER_FILE)
  assert os.path.isfile(cache)
  listing = open(os.path.join(work, "tokenizer", text_lib.ORDER_TEXT_FILE),
                 encoding="utf-8").read().splitlines()
  assert len(listing) == tok.vocab_size + 1
  assert listing[1] == f"0\t{tok.order[0]}\t{tok.decode([0])!r}"

  def boom(*a, **k):
    raise AssertionError("recomputed")
  monkeypatch.setattr(token_order, "context_order", boom)
  again = data_lib.build_data(_text_cfg(corpus, token_order="context"), work)
  assert again.tokenizer.fingerprint() == tok.fingerprint()
  monkeypatch.undo()
  # A damaged cache is recomputed, not trusted.
  saved = json.loads(open(cache, encoding="utf-8").read())
  saved["order"] = [0] * len(saved["order"])
  with open(cache, "w", encoding="utf-8") as f:
    json.dump(saved, f)
  fixed = data_lib.build_data(_text_cfg(corpus, token_order="context"), work)
  assert fixed.tokenizer.fingerprint() == tok.fingerprint()
  with open(cache, "w", encoding="utf-8") as f:
    f.write("{not json")
  assert data_lib.build_data(_text_cfg(corpus, token_order="context"),
                                 work).tokenizer.fingerprint() == tok.fingerprint()


def test_token_order_config_errors():
  c = get_base_config()
  c.data.token_order = "frequency"
  with pytest.raises(ConfigError, match="data.token_order"):
    validate_config(c)
  c = get_base_config()
  c.data.dataset, c.data.token_order = "fashion_mnist", "context"
  with pytest.raises(ConfigError, match="token_order=id"):
    validate_config(c)
  with pytest.raises(ValueError, match="data.token_order='frequency'"):
    text_lib.apply_token_order(_text_cfg("x", token_order="frequency"),
                               tokenizers_lib.ByteTokenizer(), np.zeros((1, 4), np.int32),
                               np.zeros((1, 4), np.int32))


def test_checkpoint_compatibility_sees_the_order():
  base = to_dict(get_base_config())
  old = json.loads(json.dumps(base))
  del old["data"]["token_order"]                 # a checkpoint from before the key existed
  assert ckpt_lib.config_mismatches(old, base) == {}
  ctx = json.loads(json.dumps(base))
  ctx["data"]["token_order"] = "context"
  assert set(ckpt_lib.config_mismatches(old, ctx)) == {"data.token_order"}


def test_array_record_prepare_keeps_the_order(corpus, tmp_path):
  cfg = _text_cfg(corpus, token_order="context")
  out = str(tmp_path / "ds")
  ar.prepare(cfg, out, records_per_shard=50)
  read = _text_cfg(out, dataset="array_record", token_order="context")
  data = data_lib.build_data(read)
  direct = data_lib.build_data(cfg)
  assert data.tokenizer.fingerprint() == direct.tokenizer.fingerprint()
  np.testing.assert_array_equal(data.read_rows("train", [0, 5]), direct.train[[0, 5]])
  with pytest.raises(ConfigError, match="token_order=context"):
    data_lib.build_data(_text_cfg(out, dataset="array_record"))
  with pytest.raises(ar.PrepareError, match="token_order=id"):
    ar.prepare(cfg, str(tmp_path / "tf"), source="tfds:tiny_shakespeare")
