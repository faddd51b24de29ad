"""Generative perplexity (mdm_jax/metrics/gen_ppl.py): exact AR scores of texts, and --mode=score."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.core.config import from_dict
from mdm_jax.metrics import gen_ppl as eval_text
from mdm_jax.benchmarks import sampler_table
from mdm_jax.trainers.inference import load_scorer, sample_checkpoint
from mdm_jax.trainers.setup import restore_for_inference
from mdm_jax.diffusion import autoregressive as ar_lib
from mdm_jax.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AR_TINY = "--config=configs/shakespeare_ar.py:tiny"
CHAR = "--config.data.tokenizer=char"


def _run(args, expect_ok=True):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if expect_ok and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}")
  return proc


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  """A tiny character-level AR run (150 steps): decode -> encode is the identity."""
  wd = str(tmp_path_factory.mktemp("ar_tiny"))
  _run([AR_TINY, CHAR, f"--workdir={wd}", "--config.training.num_steps=150",
        "--config.training.learning_rate=1e-2"])
  return wd


@pytest.fixture(scope="module")
def scorer(ar_run):
  return load_scorer(ar_run)       # the config comes from the run's config.json


@pytest.fixture(scope="module")
def ar_model(ar_run):
  """(task, EMA params) of the AR run, restored independently of the scorer."""
  with open(os.path.join(ar_run, "config.json")) as f:
    config = from_dict(json.load(f))
  task, state, *_ = restore_for_inference(config, ar_run)
  return task, state.ema_params


def _ar_nll(ar_model, rows):
  task, params = ar_model
  rows = jnp.asarray(np.asarray(rows, np.int32))
  return np.asarray(ar_lib.ar_loss(task.apply_fn, params, rows,
                                   jax.random.PRNGKey(0), bos_id=task.codec.mask_id,
                                   train=False)[0])


def test_held_out_rows_score_their_exact_ar_nll(scorer, ar_model):
  rows = np.asarray(scorer.eval_rows[:5])
  texts = [scorer.tokenizer.decode(r) for r in rows]
  r = eval_text.score_texts(scorer, texts, batch_size=4)   # 5 windows: a padded second batch
  assert r["num_tokens"] == rows.size and r["num_texts"] == 5
  want = _ar_nll(ar_model, rows)
  np.testing.assert_allclose(r["nats_per_token"], want.sum() / rows.size, rtol=1e-5)
  np.testing.assert_allclose(r["gen_ppl"], np.exp(want.sum() / rows.size), rtol=1e-5)
  np.testing.assert_allclose(np.log(r["per_text"]), want / rows.shape[1], rtol=1e-5)
  assert r["nats_per_char"] == pytest.approx(want.sum() / sum(map(len, texts)), rel=1e-5)


def test_a_long_text_is_scored_in_windows_that_each_start_from_bos(scorer, ar_model):
  ids = np.asarray(scorer.eval_rows[:3]).reshape(-1)
  length = scorer.seq_len
  ids = ids[:2 * length + 7]                       # two full windows and 7 tokens
  r = eval_text.score_texts(scorer, [scorer.tokenizer.decode(ids)])
  want = (_ar_nll(ar_model, ids[:2 * length].reshape(2, length)).sum()
          + _ar_nll(ar_model, ids[None, 2 * length:]).sum())     # the tail as a 7-token row
  assert r["num_tokens"] == len(ids)
  np.testing.assert_allclose(r["nats_per_token"] * len(ids), want, rtol=1e-5)


def test_real_text_scores_better_than_random_characters(scorer):
  refs = eval_text.reference_texts(scorer, 4, 100)
  assert len(refs) == 4 and all(len(t) == 100 for t in refs) and len(set(refs)) == 4
  chars = scorer.tokenizer.chars
  rng = np.random.default_rng(0)
  noise = ["".join(rng.choice(list(chars), 100)) for _ in range(4)]
  real, rand = eval_text.score_texts(scorer, refs), eval_text.score_texts(scorer, noise)
  assert real["gen_ppl"] < 0.5 * rand["gen_ppl"]
  assert 0 < real["entropy"] < rand["entropy"] <= np.log(len(chars)) + 1e-6
  repeated = eval_text.score_texts(scorer, [refs[0][:10] * 10])
  assert repeated["entropy"] < real["entropy"] and repeated["distinct_tokens"] <= 0.1


def test_read_texts_takes_sample_json_sample_txt_and_plain_text(tmp_path):
  texts = ["First line\nsecond line", "  indented\n\nwith a gap", "x"]
  (tmp_path / "s.json").write_text(json.dumps({"sampler": "ancestral", "texts": texts}))
  with open(tmp_path / "s.txt", "w") as f:     # the layout sample_and_write writes
    for i, t in enumerate(texts):
      f.write(f"===== sample {i} (step 5, ancestral, T=16) =====\n{t}\n\n")
  (tmp_path / "plain.txt").write_text("To be, or not to be")
  assert eval_text.read_texts(str(tmp_path / "s.json")) == texts
  assert eval_text.read_texts(str(tmp_path / "s.txt")) == texts
  assert eval_text.read_texts(str(tmp_path / "plain.txt")) == ["To be, or not to be"]
  (tmp_path / "old.json").write_text(json.dumps({"sampler": "ancestral"}))
  with pytest.raises(eval_text.ScoreError, match="no 'texts'"):
    eval_text.read_texts(str(tmp_path / "old.json"))
  with pytest.raises(FileNotFoundError):
    eval_text.read_texts(str(tmp_path / "missing.json"))


def test_only_an_ar_run_can_score(tmp_path, scorer):
  with pytest.raises(ConfigError, match="no config.json"):
    load_scorer(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"objective": "diffusion"}))
  with pytest.raises(ConfigError, match="autoregressive"):
    load_scorer(str(tmp_path))
  with pytest.raises(eval_text.ScoreError):
    eval_text.score_texts(scorer, [])


def test_samples_carry_gen_ppl_when_a_scorer_is_set(ar_run, scorer):
  config = from_dict(json.load(open(os.path.join(ar_run, "config.json"))))
  config.sampling.scorer_workdir = ar_run          # the run scores its own samples
  out = sample_checkpoint(config, ar_run)
  sdir = os.path.join(ar_run, "samples")
  newest = max((os.path.join(sdir, f) for f in os.listdir(sdir) if f.endswith(".json")),
               key=os.path.getmtime)
  written = json.load(open(newest))
  again = eval_text.score_texts(scorer, written["texts"])
  assert written["gen_ppl"] == pytest.approx(again["gen_ppl"], rel=1e-6)
  assert out["gen_ppl"] == written["gen_ppl"] and out["gen_entropy"] == again["entropy"]


def test_score_mode_on_the_command_line(ar_run, tmp_path):
  samples = sorted(f for f in os.listdir(os.path.join(ar_run, "samples")) if f.endswith(".json"))
  path = os.path.join(ar_run, "samples", samples[-1])
  proc = _run([AR_TINY, CHAR, f"--workdir={ar_run}", "--mode=score", f"--texts={path}"])
  out = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert out[path]["gen_ppl"] > 1.0 and out[path]["num_texts"] == 2
  ref = out["reference (held-out text)"]
  assert ref["num_texts"] == 2 and ref["gen_ppl"] > 1.0
  assert "| texts | gen ppl |" in proc.stderr
  bad = _run([AR_TINY, CHAR, f"--workdir={ar_run}", "--mode=score"], expect_ok=False)
  assert bad.returncode != 0 and "--texts" in bad.stderr
  wrong = _run(["--config=configs/shakespeare_prime.py:tiny", f"--workdir={ar_run}",
                "--mode=score", f"--texts={path}"], expect_ok=False)
  assert wrong.returncode == 2 and "configs/shakespeare_ar.py" in wrong.stderr
  assert "Traceback" not in wrong.stderr


def test_sampler_table_scores_each_row(ar_run, scorer, ar_model):
  config = from_dict(json.load(open(os.path.join(ar_run, "config.json"))))
  config.sampling.scorer_workdir = ar_run
  rows = sampler_table.run_table(config, ar_run, ["ar"], steps=[8], num_samples=2)
  task, params = ar_model
  res, _ = task.generate(params, config, num_steps=8, sampler="ar",
                         num_samples=2)                  # the same seed: the same samples
  again = eval_text.score_texts(scorer, [scorer.tokenizer.decode(r)
                                         for r in np.asarray(res.tokens)])
  assert rows[0]["gen_ppl"] == pytest.approx(again["gen_ppl"], rel=1e-5)
  table = sampler_table.markdown(rows).splitlines()
  assert table[0].endswith("gen ppl | gen entropy |") and f"{again['gen_ppl']:.1f}" in table[2]
  assert "gen ppl" not in sampler_table.markdown([{k: v for k, v in rows[0].items()
                                                   if not k.startswith("gen_")}])
