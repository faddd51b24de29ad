"""ArrayRecord shards: prepare, the grain pipeline over them, TFDS/HF sources and the CLI."""

import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from mdm_jax.configs.base import get_base_config
from mdm_jax.core.errors import ConfigError
from mdm_jax.tasks import validate_config
from mdm_jax import data as data_lib
from mdm_jax.data import array_record
from mdm_jax.data import array_record_prepare as ar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_config(**overrides):
  cfg = get_base_config().data
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _take(it, n):
  return [next(it)["tokens"].copy() for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def shakespeare():
  return data_lib.shakespeare_text()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
  path = tmp_path_factory.mktemp("corpus") / "plays.txt"
  path.write_text(shakespeare[:20_000], encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
  """6,000 characters, char tokens, 32-token rows, 7 rows per shard (many shards)."""
  small = tmp_path_factory.mktemp("small") / "small.txt"
  small.write_text(pathlib.Path(corpus).read_text(encoding="utf-8")[:6_000], encoding="utf-8")
  cfg = _data_config(dataset="text_files", path=str(small), tokenizer="char", seq_len=32,
                     eval_fraction=0.1)
  out = str(tmp_path_factory.mktemp("prepared") / "ds")
  messages = []
  meta = ar.prepare(cfg, out, records_per_shard=7, progress=messages.append)
  read_cfg = _data_config(dataset="array_record", path=out, tokenizer="char", seq_len=32)
  return {"cfg": cfg, "read_cfg": read_cfg, "out": out, "meta": meta, "messages": messages,
          "data": data_lib.build_data(read_cfg)}


# ------------------------------------------------------------------ prepare + round trip
def test_prepare_metadata_and_round_trip(prepared):
  meta, out, data = prepared["meta"], prepared["out"], prepared["data"]
  text_data = data_lib.build_data(prepared["cfg"])        # the in-memory text pipeline
  assert json.loads(pathlib.Path(out, "metadata.json").read_text()) == meta
  assert meta["format"] == array_record.FORMAT and meta["version"] == array_record.FORMAT_VERSION
  assert meta["seq_len"] == 32 and meta["tokenizer"]["kind"] == "char"
  assert meta["tokenizer"]["file"] == "tokenizer.json"
  assert meta["vocab_size"] == text_data.tokenizer.vocab_size == data.tokenizer.vocab_size
  assert data.tokenizer.fingerprint() == text_data.tokenizer.fingerprint()
  assert meta["source"]["kind"] == "corpus" and meta["source"]["dataset"] == "text_files"
  train, evals = meta["splits"]["train"], meta["splits"]["eval"]
  assert train["num_sequences"] == len(text_data.train) == data.num_train
  assert evals["num_sequences"] == len(text_data.eval) == data.num_eval
  assert train["num_tokens"] == train["num_sequences"] * 32
  n_shards = -(-train["num_sequences"] // 7)
  assert train["num_shards"] == n_shards > 10
  assert [s["file"] for s in train["shards"]] == [
      f"train-{i:05d}-of-{n_shards:05d}.array_record" for i in range(n_shards)]
  assert sorted(os.listdir(out)) == sorted(
      ["metadata.json", "tokenizer.json"] + [s["file"] for s in train["shards"] + evals["shards"]])
  # The shards hold exactly the text pipeline's packed rows, in order.
  np.testing.assert_array_equal(data.read_split("train"), text_data.train)
  np.testing.assert_array_equal(data.read_split("eval"), text_data.eval)
  assert data.tokenizer.decode(data.read_rows("train", [0])[0]) == \
      pathlib.Path(prepared["cfg"].path).read_text(encoding="utf-8")[:32]
  msgs = prepared["messages"]
  assert any("train:" in m and "sequences" in m and "shard" in m for m in msgs)
  assert "done" in msgs[-1] and "tokens" in msgs[-1]


def test_same_batches_as_the_text_pipeline(prepared):
  text_data = data_lib.build_data(prepared["cfg"])
  data = prepared["data"]
  assert _same(_take(iter(data.train_dataset(8, seed=5)), 4),
               _take(iter(text_data.train_dataset(8, seed=5)), 4))
  for a, b in zip(data.eval_batches(8, 0, 1, 2), text_data.eval_batches(8, 0, 1, 2)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["weights"], b["weights"])


# ------------------------------------------------------------------ the grain pipeline
def test_determinism_and_epochs(prepared):
  data = prepared["data"]
  n = data.num_train
  batches = _take(iter(data.train_dataset(n // 4, seed=0)), 9)
  for b in batches:
    assert b.shape == (n // 4, 32) and b.dtype == np.int32
  assert _same(batches, _take(iter(data.train_dataset(n // 4, seed=0)), 9))
  assert not _same(batches, _take(iter(data.train_dataset(n // 4, seed=1)), 9))
  # Each epoch is a permutation of the rows, and the epochs differ.
  every = data.read_split("train")
  key = lambda rows: sorted(map(bytes, rows))      # noqa: E731
  rows = np.concatenate(batches)
  assert key(rows[:n]) == key(every) and key(rows[n:2 * n]) == key(every)
  assert not np.array_equal(rows[:n], rows[n:2 * n])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_single_process_batch(prepared, process_count):
  data = prepared["data"]
  gbs = 24                                     # ~7 steps per epoch: 12 steps cross an epoch
  assert data.num_train < 12 * gbs
  single = _take(iter(data.train_dataset(gbs, seed=7)), 12)
  parts = [_take(iter(data.train_dataset(gbs, seed=7, process_index=p,
                                         process_count=process_count)), 12)
           for p in range(process_count)]
  for g in range(12):
    local = [parts[p][g] for p in range(process_count)]
    assert all(x.shape == (gbs // process_count, 32) for x in local)
    np.testing.assert_array_equal(np.concatenate(local), single[g])


def test_eval_batches_process_slices(prepared):
  data = prepared["data"]
  single = data.eval_batches(8, 0)
  assert len(single) == -(-data.num_eval // 8)
  real = np.concatenate([b["tokens"][b["weights"] > 0] for b in single])
  np.testing.assert_array_equal(real, data.read_split("eval"))
  for count in (2, 4):
    hosts = [data.eval_batches(8, 0, p, count) for p in range(count)]
    for g, b in enumerate(single):
      np.testing.assert_array_equal(np.concatenate([h[g]["tokens"] for h in hosts]), b["tokens"])
      np.testing.assert_array_equal(np.concatenate([h[g]["weights"] for h in hosts]),
                                    b["weights"])
  assert len(data.eval_batches(8, 1)) == 1


def test_iterator_checkpoint(prepared):
  data = prepared["data"]
  for p, count in ((0, 1), (1, 2)):
    it = iter(data.train_dataset(16, seed=3, process_index=p, process_count=count))
    _take(it, 11)                                # past the first epoch
    state = it.get_state()
    state = json.loads(json.dumps(state))        # checkpointable as JSON
    expected = _take(it, 5)
    fresh = iter(data.train_dataset(16, seed=3, process_index=p, process_count=count))
    fresh.set_state(state)
    assert _same(expected, _take(fresh, 5))
  # The state counts global batches, so it also resumes under another process count.
  single = iter(data.train_dataset(16, seed=3))
  _take(single, 6)
  state = single.get_state()
  expected = _take(single, 2)
  for p in range(2):
    it = iter(data.train_dataset(16, seed=3, process_index=p, process_count=2))
    it.set_state(state)
    assert _same([b[p * 8:(p + 1) * 8] for b in expected], _take(it, 2))


def test_pipeline_errors(prepared):
  data = prepared["data"]
  with pytest.raises(ValueError, match="multiple"):
    data.train_dataset(6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="larger than"):
    data.train_dataset(data.num_train + 1, seed=0)


# ------------------------------------------------------------------ atomic writes, bad dirs
def test_interrupted_prepare_leaves_nothing_that_looks_complete(prepared, tmp_path, monkeypatch):
  out = str(tmp_path / "ds")

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ar._SplitWriter, "finish", killed)   # pylint: disable=protected-access
  with pytest.raises(KeyboardInterrupt):
    ar.prepare(prepared["cfg"], out, records_per_shard=7)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == []                # no output, and the temp dir was removed
  # A hard kill (no clean-up) leaves only DIR.tmp-*: reading DIR names it.
  leftover = tmp_path / "ds.tmp-1234-abcd"
  leftover.mkdir()
  (leftover / "train-00000.partial").write_bytes(b"x")
  cfg = _data_config(dataset="array_record", path=out, tokenizer="char", seq_len=32)
  with pytest.raises(FileNotFoundError, match=r"does not exist.*ds\.tmp-1234-abcd.*interrupted"):
    data_lib.build_data(cfg)
  # prepare still works next to the leftover.
  ar.prepare(prepared["cfg"], out, records_per_shard=7)
  assert data_lib.build_data(cfg).num_train == prepared["data"].num_train


def test_missing_empty_and_incomplete_dirs(prepared, tmp_path):
  cfg = lambda path: _data_config(dataset="array_record", path=str(path), tokenizer="char",  # noqa
                                  seq_len=32)
  with pytest.raises(FileNotFoundError, match=r"does not exist.*--mode=prepare"):
    data_lib.build_data(cfg(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="is empty"):
    data_lib.build_data(cfg(tmp_path / "empty"))
  import shutil
  broken = tmp_path / "broken"
  shutil.copytree(prepared["out"], broken)
  (broken / "metadata.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no metadata.json"):
    data_lib.build_data(cfg(broken))
  shutil.rmtree(broken)
  shutil.copytree(prepared["out"], broken)
  (broken / prepared["meta"]["splits"]["train"]["shards"][3]["file"]).unlink()
  with pytest.raises(FileNotFoundError, match=r"incomplete: 1 file\(s\).*missing"):
    data_lib.build_data(cfg(broken))
  shutil.rmtree(broken)
  shutil.copytree(prepared["out"], broken)
  meta = json.loads((broken / "metadata.json").read_text())
  meta["splits"]["eval"]["num_sequences"] += 1
  (broken / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(FileNotFoundError, match="incomplete"):
    data_lib.build_data(cfg(broken))
  # An existing dataset is not overwritten by accident.
  with pytest.raises(ar.PrepareError, match="--overwrite"):
    ar.prepare(prepared["cfg"], prepared["out"])
  ar.prepare(prepared["cfg"], str(broken), records_per_shard=1000, overwrite=True)
  assert data_lib.build_data(cfg(broken)).metadata["splits"]["train"]["num_shards"] == 1


def test_config_mismatch_errors(prepared, tmp_path):
  out = prepared["out"]
  ok = dict(dataset="array_record", path=out, tokenizer="char", seq_len=32)
  with pytest.raises(ConfigError, match=r"--config\.data\.seq_len=32"):
    data_lib.build_data(_data_config(**{**ok, "seq_len": 64}))
  with pytest.raises(ConfigError, match=r"--config\.data\.tokenizer=char"):
    data_lib.build_data(_data_config(**{**ok, "tokenizer": "byte"}))
  with pytest.raises(ConfigError, match=r"data\.path"):
    data_lib.build_data(_data_config(**{**ok, "path": ""}))
  bpe_out = str(tmp_path / "bpe")
  ar.prepare(_data_config(**{**dict(prepared["cfg"]), "tokenizer": "bpe",
                             "bpe_vocab_size": 280}), bpe_out)
  bpe = dict(ok, path=bpe_out, tokenizer="bpe", bpe_vocab_size=280)
  assert data_lib.build_data(_data_config(**bpe)).tokenizer.vocab_size == 280
  with pytest.raises(ConfigError, match=r"--config\.data\.bpe_vocab_size=280"):
    data_lib.build_data(_data_config(**{**bpe, "bpe_vocab_size": 512}))
  # The full config validates with the new dataset name, and needs a path.
  config = get_base_config()
  config.data.dataset = "array_record"
  with pytest.raises(ConfigError, match="data.path"):
    validate_config(config)
  config.data.path = out
  validate_config(config)


def test_prepare_errors(prepared, tmp_path):
  with pytest.raises(ar.PrepareError, match="tfds:NAME"):
    ar.prepare(prepared["cfg"], str(tmp_path / "a"), source="s3:bucket")
  with pytest.raises(ar.PrepareError, match="data.dataset"):
    ar.prepare(_data_config(dataset="array_record", path=prepared["out"]), str(tmp_path / "b"))
  with pytest.raises(ar.PrepareError, match="too small"):
    ar.prepare(_data_config(**{**dict(prepared["cfg"]), "seq_len": 10_000}), str(tmp_path / "c"))
  with pytest.raises(ar.PrepareError, match="data.tokenizer='wordpiece'"):
    ar.prepare(_data_config(tokenizer="wordpiece"), str(tmp_path / "e"))
  with pytest.raises(FileNotFoundError, match="nothing"):
    ar.prepare(_data_config(dataset="text_files", path=str(tmp_path / "nothing*.txt")),
               str(tmp_path / "d"))
  assert sorted(os.listdir(tmp_path)) == []        # failed prepares leave nothing behind


# ------------------------------------------------------------------ TFDS and Hugging Face sources
def test_tfds_source_offline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from mdm_jax.data import tfds_builders     # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build_shakespeare_plays(data_dir)          # local files only, no download
  train_src = tfds.data_source("shakespeare_plays", split="train", data_dir=data_dir,
                               download=False)
  test_src = tfds.data_source("shakespeare_plays", split="test", data_dir=data_dir,
                              download=False)
  assert len(train_src) == 36 and len(test_src) == 2
  plays = [train_src[i]["text"].decode() for i in range(3)]
  cfg = _data_config(tokenizer="byte", seq_len=128)
  out = str(tmp_path / "ds")
  meta = ar.prepare(cfg, out, source="tfds:shakespeare_plays", tfds_data_dir=data_dir,
                    eval_split="test", max_documents=3, records_per_shard=500)
  src = meta["source"]
  assert src["kind"] == "tfds" and src["name"] == "shakespeare_plays"
  assert src["train_documents"] == 3 and src["eval_documents"] == 2
  data = data_lib.build_data(_data_config(dataset="array_record", path=out,
                                              tokenizer="byte", seq_len=128))
  stream = np.frombuffer("\n\n".join(plays).encode("utf-8"), np.uint8).astype(np.int32)
  np.testing.assert_array_equal(data.read_split("train").ravel(),
                                stream[:data.num_train * 128])
  assert data.num_train == len(stream) // 128 and data.num_train == meta["splits"]["train"][
      "num_sequences"]
  assert meta["splits"]["train"]["num_shards"] == -(-data.num_train // 500)
  evals = "\n\n".join(test_src[i]["text"].decode() for i in range(2)).encode("utf-8")
  assert data.num_eval == len(evals) // 128
  assert next(iter(data.train_dataset(4, seed=0)))["tokens"].shape == (4, 128)
  # No eval split: the last documents of the train split are held out.
  meta = ar.prepare(_data_config(tokenizer="char", seq_len=64, eval_fraction=0.3),
                    str(tmp_path / "held_out"), source="tfds:shakespeare_plays",
                    tfds_data_dir=data_dir, max_documents=4)
  assert meta["source"]["train_documents"] == 3 and meta["source"]["eval_documents"] == 1
  assert meta["source"]["tokenizer_sample_characters"] > 0
  # A dataset that is not prepared fails at once offline, with what to do.
  with pytest.raises(ar.PrepareError, match=r"not prepared.*--tfds_download"):
    ar.prepare(cfg, str(tmp_path / "x"), source="tfds:shakespeare_plays",
               tfds_data_dir=str(tmp_path / "empty_tfds"))
  with pytest.raises(ar.PrepareError, match="text_key"):
    ar.prepare(cfg, str(tmp_path / "y"), source="tfds:shakespeare_plays",
               tfds_data_dir=data_dir, text_key="body", eval_split="test")
  assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


class _FakeHFDataset:
  """The part of ``datasets.Dataset`` that prepare uses: len, column slices."""

  column_names = ["text", "id"]

  def __init__(self, texts):
    self._texts = list(texts)

  def __len__(self):
    return len(self._texts)

  def __getitem__(self, sl):
    return {"text": self._texts[sl], "id": list(range(len(self._texts)))[sl]}


def test_hf_source(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)         # not installed
  with pytest.raises(ar.PrepareError, match="pip install datasets"):
    ar.prepare(_data_config(tokenizer="byte", seq_len=16), str(tmp_path / "a"),
               source="hf:Skylion007/openwebtext")
  docs = [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]
  calls = []

  def load_dataset(name, config_name=None, split=None):
    calls.append((name, config_name, split))
    return _FakeHFDataset(docs)

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  # A tokenizer that cannot be built fails before anything is downloaded.
  with pytest.raises(FileNotFoundError, match="gpt2_bpe_path"):
    ar.prepare(_data_config(tokenizer="gpt2", gpt2_bpe_path=str(tmp_path / "no.tiktoken")),
               str(tmp_path / "b"), source="hf:some/corpus")
  assert not calls and not os.path.exists(tmp_path / "b")
  out = str(tmp_path / "hf")
  meta = ar.prepare(_data_config(tokenizer="byte", seq_len=16, eval_fraction=0.1), out,
                    source="hf:some/corpus", source_config="raw")
  assert calls == [("some/corpus", "raw", "train")]
  assert meta["source"]["train_documents"] == 36 and meta["source"]["eval_documents"] == 4
  data = data_lib.build_data(_data_config(dataset="array_record", path=out,
                                              tokenizer="byte", seq_len=16))
  stream = "\n\n".join(docs[:36]).encode("utf-8")
  assert data.tokenizer.decode(data.read_split("train").ravel()) == \
      stream[:data.num_train * 16].decode("utf-8")
  assert data.tokenizer.decode(data.read_split("eval").ravel()).startswith(docs[36])


# ------------------------------------------------------------------ command line
def _run(args, expect_ok=True):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)                 # one CPU device, like a user's laptop
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if expect_ok and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}")
  return proc


TINY = "--config=configs/shakespeare_prime.py:tiny"


@pytest.fixture(scope="module")
def cli_prepared(tmp_path_factory, corpus):
  out = str(tmp_path_factory.mktemp("cli") / "shakespeare_char64")
  proc = _run([TINY, "--mode=prepare", f"--output={out}", "--config.data.dataset=text_files",
               f"--config.data.path={corpus}", "--config.data.tokenizer=char",
               "--config.data.eval_fraction=0.1", "--records_per_shard=100"])
  return out, proc


def test_main_prepare(cli_prepared, tmp_path):
  out, proc = cli_prepared
  summary = json.loads(proc.stdout)
  meta = json.loads(pathlib.Path(out, "metadata.json").read_text())
  assert summary["path"] == out and summary["seq_len"] == 64 == meta["seq_len"]
  assert summary["train_sequences"] == meta["splits"]["train"]["num_sequences"] > 200
  assert summary["train_shards"] == meta["splits"]["train"]["num_shards"] >= 3
  assert "--config.data.dataset=array_record" in summary["train_with"]
  assert "prepare: train:" in proc.stderr and "shard" in proc.stderr and "done" in proc.stderr
  # Errors: exit code 2 and one line.
  p = _run([TINY, "--mode=prepare", f"--output={out}"], expect_ok=False)
  assert p.returncode == 2 and "--overwrite" in p.stderr
  assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:")
  p = _run([TINY, "--mode=prepare", f"--output={tmp_path / 'x'}", "--source=tfds:lm1b",
            f"--tfds_data_dir={tmp_path / 'tfds'}"], expect_ok=False)
  assert p.returncode == 2 and "--config.data.token_order=id" in p.stderr   # a context order
  p = _run([TINY, "--mode=prepare", f"--output={tmp_path / 'x'}", "--source=tfds:lm1b",
            "--config.data.token_order=id", f"--tfds_data_dir={tmp_path / 'tfds'}"],
           expect_ok=False)
  assert p.returncode == 2 and "--tfds_download" in p.stderr
  p = _run([TINY, "--mode=prepare"], expect_ok=False)
  assert p.returncode != 0 and "--output" in p.stderr


def test_train_on_array_record(cli_prepared, tmp_path):
  out, _ = cli_prepared
  args = [TINY, "--config.data.dataset=array_record", f"--config.data.path={out}",
          "--config.data.tokenizer=char"]
  wd = str(tmp_path / "run")
  _run(args + [f"--workdir={wd}", "--config.training.num_steps=3",
               "--config.training.log_every=1", "--config.eval.every_steps=3",
               "--config.checkpoint.every_steps=3", "--config.sampling.num_steps=4",
               "--config.sampling.num_samples=1"])
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  assert final["step"] == 3 and np.isfinite(final["eval_nll"]) and np.isfinite(final["train_loss"])
  assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))
  assert os.path.isfile(os.path.join(wd, "samples", "step_3.txt"))
  # A config that does not match the shards fails early, naming the key.
  p = _run(args + [f"--workdir={tmp_path / 'bad'}", "--config.data.seq_len=32"], expect_ok=False)
  assert p.returncode == 2 and "--config.data.seq_len=64" in p.stderr
