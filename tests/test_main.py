"""End to end through the command line, as a user runs it (tiny sizes)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, expect_ok=True, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)                 # one CPU device, like a user's laptop
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if expect_ok and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}")
  return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("prime_tiny"))
  cfg = "--config=configs/shakespeare_prime.py:tiny"
  proc = _run([cfg, f"--workdir={wd}", "--config.eval.every_steps=10"])
  return wd, cfg, proc


def test_train_writes_metrics_samples_checkpoints(trained):
  wd, _, proc = trained
  assert "steps/s" in proc.stderr and "tok/s" in proc.stderr and "ETA" in proc.stderr
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  assert final["step"] == 30 and final["eval_ppl_bound"] > 1.0
  # The loss falls on real text: the untrained model (zero-initialised head) predicts
  # uniformly over the V BPE tokens, a bound of ln V nats per token; 30 tiny steps
  # must beat it clearly.
  import math
  vocab = json.load(open(os.path.join(wd, "tokenizer", "tokenizer_meta.json")))
  assert vocab["vocab_size"] == 4096
  assert final["eval_nll"] < math.log(vocab["vocab_size"]) - 0.15, (final, vocab)
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("eval/ppl_bound" in r for r in recs) and any("train/loss" in r for r in recs)
  assert os.listdir(os.path.join(wd, "tensorboard"))
  text = open(os.path.join(wd, "samples", "step_30.txt")).read()
  assert "sample 0" in text and len(text) > 100
  stats = json.load(open(os.path.join(wd, "samples", "step_30.json")))
  assert stats["nfe"] >= 1 and stats["tokens_per_s"] > 0
  # the known-word rate is recomputed from the written texts and the corpus's words
  from mdm_jax.data import corpora
  from mdm_jax.metrics import text as text_metrics
  bodies = [b.split("=====\n", 1)[1] for b in text.split("===== sample ")[1:]]
  want, n = text_metrics.known_word_rate([b[:-2] for b in bodies],
                                     text_metrics.corpus_words(corpora.shakespeare_text()))
  assert stats["num_words"] == n > 0 and stats["known_word_rate"] == pytest.approx(want)
  want, n = text_metrics.known_bigram_rate([b[:-2] for b in bodies],
                                       text_metrics.corpus_bigrams(corpora.shakespeare_text()))
  assert stats["num_bigrams"] == n and stats["known_bigram_rate"] == pytest.approx(want)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "30"))


def test_eval_and_sample_modes(trained):
  wd, cfg, _ = trained
  ev = json.loads(_run([cfg, f"--workdir={wd}", "--mode=eval"]).stdout)
  assert ev["step"] == 30 and ev["bound"].startswith("valid")
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  assert ev["nll"] == pytest.approx(final["eval_nll"], rel=1e-4)   # fixed eval key
  out = json.loads(_run([cfg, f"--workdir={wd}", "--mode=sample", "--sample_steps=8"]).stdout)
  assert out["num_steps"] == 8 and out["nfe"] <= 9
  name = f"step_30-{out['sampler']}-T8-seed{out['sampling']['seed']}"
  assert out["samples_txt"] == os.path.join(wd, "samples", name + ".txt")
  # Other settings with the same sampler, T and seed: a new file, not a replacement.
  out2 = json.loads(_run([cfg, f"--workdir={wd}", "--mode=sample", "--sample_steps=8",
                          "--config.sampling.top_p=0.5"]).stdout)
  assert out2["samples_txt"] == os.path.join(wd, "samples", name + "-2.txt")
  assert os.path.exists(out["samples_txt"]) and os.path.exists(os.path.join(wd, "samples", "step_30.txt"))
  # Best-by-eval checkpoint: the step whose eval bound was lowest (evals at 10, 20, 30).
  evals = {r["step"]: r["eval/nll"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
           if "eval/nll" in r}
  assert sorted(evals) == [10, 20, 30]
  best_step = min(evals, key=evals.get)
  assert os.listdir(os.path.join(wd, "checkpoints_best")) == [str(best_step)]
  ev = json.loads(_run([cfg, f"--workdir={wd}", "--mode=eval",
                        "--config.checkpoint.restore=best"]).stdout)
  assert ev["step"] == best_step and ev["nll"] == pytest.approx(evals[best_step], rel=1e-4)


def test_resume_continues_from_checkpoint(trained):
  wd, cfg, _ = trained
  proc = _run([cfg, f"--workdir={wd}", "--config.training.num_steps=40"])
  assert "40/40" in proc.stderr
  steps = [r["step"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
           if "train/loss" in r]
  assert 40 in steps and steps.count(10) == 1   # steps 1..30 were not retrained


def test_incompatible_checkpoint_names_the_fields(trained):
  wd, cfg, _ = trained
  proc = _run([cfg, f"--workdir={wd}", "--mode=eval", "--config.model.d_model=128"],
              expect_ok=False)
  assert proc.returncode == 2 and "model.d_model" in proc.stderr and "checkpoint=64" in proc.stderr


def test_clear_errors(tmp_path):
  cfg = "--config=configs/shakespeare_prime.py:tiny"
  p = _run([cfg, f"--workdir={tmp_path}/a", "--config.prime.loss=bogus"], expect_ok=False)
  assert p.returncode == 2 and "prime.loss" in p.stderr and "marginal" in p.stderr
  # Flag-parsing failures (unknown key, wrong type, unknown variant, missing file): one line, no
  # traceback from inside ml_collections.
  for args, needle in [(["--config.model.no_such_key=1"], "unknown config key 'no_such_key'"),
                       (["--config.training.num_steps=abc"], "num_steps=abc"),
                       (["--config=configs/shakespeare_prime.py:tiny,nope=1"], "nope"),
                       (["--config=configs/no_such_config.py"], "no_such_config.py")]:
    argv = [cfg, *args] if args[0].startswith("--config.") else args
    p = _run([*argv, f"--workdir={tmp_path}/b"], expect_ok=False)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
  p = _run([cfg, f"--workdir={tmp_path}/c", "--mode=eval"], expect_ok=False)
  assert p.returncode == 2 and "No checkpoint" in p.stderr
  p = _run([cfg, f"--workdir={tmp_path}/d", "--config.data.dataset=text_files",
            f"--config.data.path={tmp_path}/nothing*.txt"], expect_ok=False)
  assert p.returncode == 2 and "nothing" in p.stderr


@pytest.mark.parametrize("module,cfg", [
    ("mdm_jax.cli.eval_images", "configs/fashion_mnist_prime.py"),
    ("mdm_jax.cli.eval_gaussian", "configs/fashion_mnist_mcdit.py"),
    ("mdm_jax.benchmarks.train_bench", "configs/shakespeare_prime.py"),
    ("mdm_jax.benchmarks.collectives", "configs/owt_prime.py"),
    ("mdm_jax.benchmarks.prime_study", "configs/shakespeare_prime.py"),
    ("mdm_jax.benchmarks.sampler_table", "configs/shakespeare_prime.py")])
def test_every_config_cli_reports_a_bad_key_in_one_line(module, cfg):
  proc = subprocess.run([sys.executable, "-m", module, f"--config={cfg}",
                         "--config.model.no_such_key=1"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "unknown config key 'no_such_key'" in proc.stderr and "Traceback" not in proc.stderr
  assert f"usage: python -m {module}" in proc.stderr
