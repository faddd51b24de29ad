"""The lm-evaluation-harness model (mdm_jax/cli/lm_eval_model.py, python -m mdm_jax.lm_eval) and
the conditional bound behind it (mdm_jax/diffusion/conditional.py).

Offline throughout: lm-eval's own evaluator runs tasks that the tests write as YAML over
local JSONL files.  The Markov-source checks use the Bayes-optimal denoiser of a known
chain (enumerated, as in tests/test_losses.py), for which the bound is tight: its
conditional bound must equal the chain's exact -log p(continuation | context) within its
Monte Carlo error, and never fall below it.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mdm_jax.diffusion import elbo, prime
from mdm_jax.diffusion.conditional import conditional_bound_samples
from mdm_jax.diffusion.schedules import get_schedule
from mdm_jax.data.tokenizers import CharTokenizer
from mdm_jax.tasks.masked import MaskedDiffusionTask
from tests.test_losses import _oracle_apply

lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[test]' (lm-eval)")
from lm_eval.tasks import TaskManager  # noqa: E402
from mdm_jax.cli import lm_eval_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIN = get_schedule(ml_collections.ConfigDict({"name": "linear"}))
CHARS = "abcd"
L = 6


def chain():
  """a -> next letter w.p. 0.8, the one after w.p. 0.2 (cyclic); uniform start."""
  trans = np.zeros((4, 4))
  for i in range(4):
    trans[i, (i + 1) % 4], trans[i, (i + 2) % 4] = 0.8, 0.2
  return np.full(4, 0.25), trans


def chain_nll(ids, first=True):
  p0, trans = chain()
  out = -np.log(p0[ids[0]]) if first else 0.0
  return out - sum(np.log(trans[a, b]) for a, b in zip(ids[:-1], ids[1:]))


def chain_sequences(length=L):
  p0, trans = chain()
  seqs, probs = [[i] for i in range(4)], list(p0)
  for _ in range(length - 1):
    seqs, probs = zip(*[(s + [j], p * trans[s[-1], j]) for s, p in zip(seqs, probs)
                        for j in range(4) if trans[s[-1], j] > 0])
    seqs, probs = list(seqs), list(probs)
  return np.array(seqs), np.array(probs)


class OracleTask:
  """A masked-diffusion 'task' whose network is the chain's exact posterior (V = 5: the
  char tokenizer's a-d and U+FFFD, which the chain never emits)."""
  objective = "diffusion"
  split = None
  time_conditioning = False

  def __init__(self, ell=1):
    self.codec = prime.PrimeCodec.create(5, ell)
    self.schedule = LIN
    self.loss_cfg = elbo.DiffusionLossConfig(t_min=1e-3)
    self.seq_len = L
    seqs, probs = chain_sequences()
    self._apply = _oracle_apply(self.codec, seqs, probs)

  def apply_fn(self, params, digits, t, *, train=False, rng=None):
    return self._apply(params, digits, t, train=train, rng=rng)

  def default_sampler(self, config):
    return "first_hitting"

  def sampler_kwargs(self, sampler, config, num_samples, seq_len, num_steps):
    return MaskedDiffusionTask.sampler_kwargs(self, sampler, config, num_samples, seq_len,
                                              num_steps)


def sampling_config():
  c = ml_collections.ConfigDict()
  c.sampling = dict(num_steps=L, temperature=1.0, top_k=0, top_p=1.0, seed=0)
  c.prime = dict(carry_over=True)
  return c


def oracle_evaluator(ell=1, k=32, batch_size=8):
  return lm_eval_model.DiffusionLMEvaluator(
      OracleTask(ell), None, CharTokenizer(list(CHARS)), sampling_config(),
      num_time_samples=k, batch_size=batch_size, seed=0)


@pytest.mark.parametrize("ell", [1, 2])
def test_conditional_bound_is_tight_for_the_exact_denoiser(ell):
  """E[bound on x_1 x_2 | x_0] (x_3.. absent) = -log p(x_1 x_2 | x_0) pointwise; and a wrong
  model's bound is above its own -log p."""
  task = OracleTask(ell)
  x = np.array([0, 1, 3, 0, 1, 2])
  rows = 3000
  tokens = jnp.asarray(np.tile(x, (rows, 1)))
  pos = np.arange(L)
  visible = jnp.asarray(np.tile(pos < 1, (rows, 1)))
  scored = jnp.asarray(np.tile((pos >= 1) & (pos < 3), (rows, 1)))
  s = jax.jit(lambda k: conditional_bound_samples(
      task.apply_fn, None, tokens, visible, scored, k, codec=task.codec,
      schedule=task.schedule, cfg=task.loss_cfg, num_time_samples=2))(jax.random.key(1))
  s = np.asarray(s, np.float64).mean(axis=0)
  m, se = s.mean(), s.std() / np.sqrt(rows)
  exact = chain_nll(x[:3], first=False)          # -log 0.8 - log 0.2
  assert m >= exact - 4 * se, (m, exact, se)
  assert abs(m - exact) < 4 * se + 0.01, (m, exact, se)
  # Scoring the context too changes the number by exactly the context's own -log p.
  scored_all = jnp.asarray(np.tile(pos < 3, (rows, 1)))
  s2 = conditional_bound_samples(task.apply_fn, None, tokens, jnp.zeros_like(visible),
                                 scored_all, jax.random.key(2), codec=task.codec,
                                 schedule=task.schedule, cfg=task.loss_cfg, num_time_samples=2)
  m2 = np.asarray(s2, np.float64).mean()
  assert abs(m2 - chain_nll(x[:3])) < 4 * np.asarray(s2).std() / np.sqrt(2 * rows) + 0.01


def test_loglikelihood_matches_the_chain_and_reports_its_error():
  ev = oracle_evaluator(k=64)
  pairs = [("ab", "c"), ("ab", "d"), ("abc", "da"), ("", "bcd")]
  out = ev.loglikelihood(pairs)
  se = np.array(ev.last_stderr)
  assert len(out) == 4 and np.all(se > 0)
  ids = {c: i for i, c in enumerate(CHARS)}
  for (ctx, cont), (ll, _), e in zip(pairs, out, se):
    seq = [ids[ch] for ch in ctx + cont]
    exact = chain_nll(seq, first=not ctx) - (chain_nll(seq[:len(ctx)]) if len(ctx) > 1 else 0)
    if ctx:
      exact = chain_nll(seq[len(ctx) - 1:], first=False)
    assert -ll >= exact - 4 * e - 1e-6, (ctx, cont, -ll, exact, e)
    assert abs(-ll - exact) < 4 * e + 0.02, (ctx, cont, -ll, exact, e)
  # is_greedy: the likely continuation is the argmax, the unlikely one is not.
  assert out[0][1] and not out[1][1]


def test_generate_until_keeps_the_prompt_and_stops():
  ev = oracle_evaluator()
  prompts = ["ab", "dab", "c", "ab"]
  outs = ev.generate_until([(p, {"until": ["a"], "max_gen_toks": 3}) for p in prompts])
  _, trans = chain()
  ids = {c: i for i, c in enumerate(CHARS)}
  for p, o in zip(prompts, outs):
    assert len(o) <= 3 and "a" not in o, (p, o)
    text = p + o
    assert all(trans[ids[a], ids[b]] > 0 for a, b in zip(text[:-1], text[1:])), (p, o)
  # Without a stop string, exactly max_gen_toks tokens come back.
  outs = ev.generate_until([("ab", {"until": [], "max_gen_toks": 4})])
  assert len(outs[0]) == 4


def write_tasks(root, docs_mc, docs_ppl):
  os.makedirs(root, exist_ok=True)
  for name, docs in (("mc", docs_mc), ("ppl", docs_ppl)):
    with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
      f.write("".join(json.dumps(d) + "\n" for d in docs))
  with open(os.path.join(root, "chain_mc.yaml"), "w") as f:
    f.write(f"""task: chain_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
  with open(os.path.join(root, "chain_ppl.yaml"), "w") as f:
    f.write(f"""task: chain_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("lm_eval_tasks"))
  rng = np.random.default_rng(0)
  seqs, probs = chain_sequences()
  docs_ppl = [{"text": "".join(CHARS[i] for i in seqs[j])}
              for j in rng.choice(len(seqs), size=12, p=probs)]
  docs_mc = [{"ctx": c, "choices": [n, s, o], "label": 0} for c, n, s, o in
             (("ab", "c", "d", "a"), ("bc", "d", "a", "b"), ("abcd", "a", "b", "d"),
              ("d", "a", "b", "c"), ("c", "d", "a", "c"))]
  write_tasks(root, docs_mc, docs_ppl)
  return root, docs_ppl


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def test_lm_eval_evaluator_on_local_tasks(task_dir):
  """lm-eval's simple_evaluate: multiple choice ranks by the bound; the rolling perplexity is
  the chain's exact one within the bound's error, and not below it."""
  root, docs_ppl = task_dir
  cls = lm_eval_model.register()
  assert lm_eval_model.register() is cls                  # registering twice is harmless
  from lm_eval.api.registry import get_model  # pylint: disable=import-outside-toplevel
  assert get_model("mdm_jax") is cls
  model = cls(evaluator=oracle_evaluator(k=64))
  res = lm_eval.simple_evaluate(model=model, tasks=["chain_mc", "chain_ppl"],
                                task_manager=TaskManager(include_path=root), log_samples=False)
  r = res["results"]
  assert r["chain_mc"]["acc,none"] == 1.0
  ids = {c: i for i, c in enumerate(CHARS)}
  exact = sum(chain_nll([ids[c] for c in d["text"]]) for d in docs_ppl)
  chars = sum(len(d["text"]) for d in docs_ppl)
  bound = np.log(r["chain_ppl"]["byte_perplexity,none"]) * chars
  se = np.sqrt(np.sum(np.square(model.last_stderr)))     # the rolling requests' errors
  assert bound >= exact - 4 * se, (bound, exact, se)
  assert abs(bound - exact) < 4 * se + 0.05, (bound, exact, se)
  np.testing.assert_allclose(r["chain_ppl"]["word_perplexity,none"],
                             np.exp(bound / len(docs_ppl)), rtol=1e-5)


def ar_task():
  from mdm_jax.configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  from mdm_jax.tasks import build_task  # pylint: disable=import-outside-toplevel
  c = get_base_config()
  c.objective, c.prime.ell = "ar", 1
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.data.seq_len = 8
  c.sampling.sampler = "ar"
  task = build_task(c, 256)
  return task, task.init_params(jax.random.key(3)), c


def test_ar_run_gives_its_exact_nll():
  """Through the same adapter an AR task returns its own exact NLL: the per-token NLL of
  task.token_nll for pairs, and task.bound (the AR loss) per seq_len window when rolling."""
  from mdm_jax.data.tokenizers import ByteTokenizer  # pylint: disable=import-outside-toplevel
  task, params, config = ar_task()
  tok = ByteTokenizer()
  ev = lm_eval_model.DiffusionLMEvaluator(task, params, tok, config, batch_size=4)
  assert ev.exact
  doc = "to be or not to be, that is"                    # 27 bytes: windows 8, 8, 8, 3
  ids = tok.encode(doc)
  rows = np.zeros((4, 8), np.int32)
  for w in range(4):
    part = ids[8 * w:8 * w + 8]
    rows[w, :len(part)] = part
  nll = np.asarray(jax.jit(task.token_nll)(params, jnp.asarray(rows)), np.float64)
  own = np.asarray(jax.jit(lambda p, x: task.bound(p, x, jax.random.key(0), 1))(
      params, jnp.asarray(rows[:3])))
  expect = nll[:3].sum() + nll[3, :3].sum()
  np.testing.assert_allclose(nll[:3].sum(axis=1), own, rtol=1e-5)   # the task's own loss
  (rolled,) = ev.loglikelihood_rolling([doc])
  np.testing.assert_allclose(-rolled, expect, rtol=1e-5)
  out = ev.loglikelihood([("to be", " or")])
  np.testing.assert_allclose(-out[0][0], nll[0, 5:8].sum(), rtol=1e-5)
  inputs = np.concatenate([[[task.bos_id]], rows[:1, :-1]], 1)[..., None]
  logits = jax.jit(task.apply_fn)(params, jnp.asarray(inputs), jnp.zeros(1))
  greedy = np.argmax(np.asarray(logits)[0, 5:8, :256], -1)
  assert out[0][1] == bool(np.all(greedy == rows[0, 5:8]))
  gen = ev.generate_until([("to be", {"until": ["\n"], "max_gen_toks": 2})])
  # At most max_gen_toks byte tokens: each decodes to at most one character (a byte that is
  # not valid UTF-8 on its own decodes to U+FFFD, which re-encodes to three bytes).
  assert len(gen[0]) <= 2


@pytest.fixture(scope="module")
def converted_workdir(tmp_path_factory):
  """The published Prime (ell = 2) fixture converted to a workdir."""
  from mdm_jax.core.config import load_config  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers import published  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path_factory.mktemp("lm_eval_conv") / "prime_l2")
  c = load_config("shakespeare_prime:tiny")
  c.data.tokenizer = "byte"
  published.convert_checkpoint(
      "mdm-prime", os.path.join(ROOT, "tests", "fixtures", "published", "prime_tiny_l2.ckpt"),
      wd, base_config=c)
  return wd


def test_converted_checkpoint_sharded_and_from_the_command_line(converted_workdir, task_dir):
  """A converted published checkpoint: the bound over the 8-device mesh equals the unsharded
  one, and python -m mdm_jax.lm_eval runs lm-eval's CLI on it."""
  root, _ = task_dir
  ev = lm_eval_model.DiffusionLMEvaluator.from_workdir(converted_workdir, num_time_samples=2,
                                                       batch_size=2)
  assert ev.mesh is not None and ev.batch_size == len(jax.devices())
  pairs = [("To be, or not", " to be"), ("Is this a dagger", " which I see")]
  sharded = ev.loglikelihood(pairs)
  single = lm_eval_model.DiffusionLMEvaluator(
      ev.task, jax.tree.map(np.asarray, ev.params), ev.tokenizer, ev.config,
      num_time_samples=2, batch_size=ev.batch_size)
  unsharded = single.loglikelihood(pairs)
  np.testing.assert_allclose([x for x, _ in sharded], [x for x, _ in unsharded], rtol=1e-4)
  assert all(np.isfinite(x) and x < 0 for x, _ in sharded)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["HF_DATASETS_CACHE"] = os.path.join(root, "hf_cache")
  out = os.path.join(root, "out")
  proc = subprocess.run(
      [sys.executable, "-m", "mdm_jax.lm_eval", "--model", "mdm_jax", "--model_args",
       f"workdir={converted_workdir},num_time_samples=2", "--batch_size", "4",
       "--tasks", "chain_ppl", "--include_path", root, "--output_path", out],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "chain_ppl" in proc.stdout and "word_perplexity" in proc.stdout, proc.stdout[-2000:]
