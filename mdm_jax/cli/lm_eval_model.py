"""mdm_jax runs as an EleutherAI lm-evaluation-harness model: ``--model mdm_jax``.

``register()`` registers the model with ``lm_eval.api.registry.register_model`` under the
name ``mdm_jax`` (lm-eval finds models of other packages only that way);
``python -m mdm_jax.lm_eval`` does that and then runs lm-eval's own command line with every
flag unchanged, and in Python ``register()`` followed by ``lm_eval.simple_evaluate(model=
"mdm_jax", model_args="workdir=runs/X,...")`` does the same.  ``model_args``:

  workdir=DIR             a trained run, or a published checkpoint converted by
                          ``python -m mdm_jax.convert`` (its folder is a workdir)
  restore=latest|best     which checkpoint (default: the run's checkpoint.restore)
  num_time_samples=K      stratified time samples per request (default 8)
  batch_size=N            rows per network call (rounded up to the batch-sharded devices)
  seed=S                  the Monte Carlo and sampling seed (default 0)
  sampler=NAME            generate_until: any registered sampler (default: the run's)
  num_steps=T             generate_until: sampler steps (default: the run's sampling.num_steps)
  use_ema=true|false      EMA or raw weights (default: the run's eval.use_ema)

The three request types, with the run's own tokenizer (``data/tokenizers.py``):

* ``loglikelihood(context, continuation)``: the context's tokens are visible, the
  continuation's are masked by the forward process and scored, the rest of the
  ``seq_len`` row is masked and never scored; the value is minus the valid (marginal)
  bound of ``mdm_jax.diffusion.conditional``, the mean of K stratified time samples.  The
  standard error of each request's mean (over its K samples) is kept in
  ``last_stderr`` and its largest and mean values are logged.  ``is_greedy`` is whether the
  argmax of the network's prediction with the whole continuation masked (t = 1) is the
  continuation.  For an ``objective="ar"`` run the value is the exact log-likelihood
  from ``task.token_nll`` (and ``is_greedy`` the teacher-forced argmax), no sampling.
* ``loglikelihood_rolling(document)``: the document's tokens cut into disjoint windows of
  ``seq_len``, each bounded on its own (no visible context; an AR window starts from BOS,
  as the AR eval bound does); the sum over windows.  lm-eval turns it into word, byte and
  token perplexities.
* ``generate_until(context, {"until": [...], "max_gen_toks": N})``: the prompt (its last
  ``seq_len - N`` tokens) fixed at the start of a row, the rest drawn by the sampler, the
  N tokens after the prompt decoded and cut before the first stop string.

Requests go through in batches of ``batch_size`` rows (padded with empty rows to one
compiled shape), sharded over the run's mesh like the eval batches.  docs/evaluation.md
states how each number is computed and how it compares with the peers'.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import logging

from mdm_jax.core import distributed, paths
from mdm_jax.core import sharding as shd
from mdm_jax.core.config import from_dict
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.conditional import conditional_bound_samples
from mdm_jax.sampling import generate as generate_lib
from mdm_jax.trainers.setup import restore_for_inference

MODEL_NAME = "mdm_jax"
_LOG = logging.getLogger("lm_eval.models.mdm_jax")   # under lm-eval's logger: its CLI shows it


@dataclasses.dataclass
class Rows:
  """A batch of request rows: tokens and the visible / scored masks, all [N, L]."""
  tokens: np.ndarray
  visible: np.ndarray
  scored: np.ndarray


class DiffusionLMEvaluator:
  """The computations behind the lm-eval model, on a task and its parameters (no lm-eval)."""

  def __init__(self, task, params, tokenizer, config, *, mesh=None, rules=None,
               num_time_samples: int = 8, batch_size: int = 8, seed: int = 0,
               sampler: Optional[str] = None, num_steps: Optional[int] = None):
    self.task, self.params, self.tokenizer, self.config = task, params, tokenizer, config
    self.mesh, self.rules = mesh, rules
    self.seq_len = int(task.seq_len)
    self.num_time_samples = int(num_time_samples)
    if self.num_time_samples < 1:
      raise ConfigError(f"num_time_samples must be >= 1, got {num_time_samples}.")
    shards = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
    self.batch_size = max(1, -(-int(batch_size) // shards) * shards)
    self.seed = int(seed)
    self.sampler = sampler
    self.num_steps = num_steps
    self.exact = task.objective == "ar"
    self.last_stderr: List[float] = []
    self._score_fn = None
    self._gen_fns: Dict[Any, Any] = {}
    self._calls = 0

  @classmethod
  def from_workdir(cls, workdir: str, restore: Optional[str] = None,
                   use_ema: Optional[bool] = None, **kwargs) -> "DiffusionLMEvaluator":
    """Restores the run (or converted checkpoint) in ``workdir`` with its saved config."""
    workdir = paths.resolve(workdir)
    path = paths.join(workdir, "config.json")
    if not paths.exists(path):
      raise ConfigError(f"No trained run in {workdir} (no config.json): pass workdir= a run "
                        "of mdm_jax or a folder written by python -m mdm_jax.convert.")
    with paths.open(path) as f:
      config = from_dict(json.load(f))
    if restore:
      config.checkpoint.restore = str(restore)
    task, state, mesh, rules, data, _ = restore_for_inference(config, workdir)
    ema = bool(config.eval.use_ema) if use_ema is None else bool(use_ema)
    params = state.ema_params if ema else state.params
    return cls(task, params, data.tokenizer, config, mesh=mesh, rules=rules, **kwargs)

  # ------------------------------------------------------------------ tokens
  def encode(self, text: str) -> List[int]:
    return [int(i) for i in np.asarray(self.tokenizer.encode(text)).reshape(-1)]

  def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """lm-eval's convention: trailing spaces of the context move to the continuation, and
    the continuation's ids are those of ``context + continuation`` after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
      context, continuation = context[:-n], context[-n:] + continuation
    whole = self.encode(context + continuation)
    ctx = self.encode(context)
    if whole[:len(ctx)] == ctx:
      return ctx, whole[len(ctx):]
    return ctx, self.encode(continuation)

  def request_row(self, context: Sequence[int], continuation: Sequence[int]) -> Rows:
    """One row: the context's last tokens visible, then the continuation scored."""
    n_cont = len(continuation)
    if n_cont > self.seq_len:
      raise ValueError(f"A continuation of {n_cont} tokens does not fit the model's "
                       f"seq_len={self.seq_len}.")
    whole = (list(context) + list(continuation))[-self.seq_len:]
    n = len(whole)
    tokens = np.zeros((1, self.seq_len), np.int32)
    tokens[0, :n] = whole
    pos = np.arange(self.seq_len)
    return Rows(tokens, (pos < n - n_cont)[None], ((pos >= n - n_cont) & (pos < n))[None])

  # ------------------------------------------------------------------ scoring
  def _build_score_fn(self):
    task, k = self.task, self.num_time_samples

    def fn(params, tokens, visible, scored, key):
      with nn.logical_axis_rules(self.rules or ()):
        if self.exact:
          nll = task.token_nll(params, tokens)                           # [B, L]
          samples = jnp.sum(jnp.where(scored, nll, 0.0), axis=1)[None]   # [1, B]
          bos = jnp.full((tokens.shape[0], 1), task.bos_id, jnp.int32)
          inputs = jnp.concatenate([bos, tokens[:, :-1]], axis=1)
          logits = task.apply_fn(params, inputs[..., None], jnp.zeros(tokens.shape[:1]))
        else:
          samples = conditional_bound_samples(
              task.apply_fn, params, tokens, visible, scored, key, codec=task.codec,
              schedule=task.schedule, cfg=task.loss_cfg, num_time_samples=k, split=task.split)
          digits = task.codec.encode(tokens)
          noisy = jnp.where(visible[..., None], digits, task.codec.mask_id)
          logits = task.apply_fn(params, noisy, jnp.ones(tokens.shape[:1], jnp.float32))
        best = jnp.argmax(logits[..., :task.codec.vocab_size], axis=-1)
        greedy = jnp.all(jnp.where(scored, best == tokens, True), axis=1)
        return samples, greedy

    if self.mesh is None:
      return jax.jit(fn)
    bs = shd.batch_sharding(self.mesh)
    return jax.jit(fn, in_shardings=(None, bs, bs, bs, shd.replicated(self.mesh)),
                   out_shardings=shd.replicated(self.mesh))

  def score_rows(self, rows: Rows) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bound mean [N], its standard error [N], is_greedy [N]) of each row, in nats."""
    if self._score_fn is None:
      self._score_fn = self._build_score_fn()
    n, b = len(rows.tokens), self.batch_size
    means, ses, greedy = [], [], []
    for start in range(0, n, b):
      parts = [np.asarray(a[start:start + b]) for a in (rows.tokens, rows.visible, rows.scored)]
      pad = b - len(parts[0])
      parts = [np.concatenate([p, np.zeros((pad,) + p.shape[1:], p.dtype)]) for p in parts]
      key = jax.random.key_data(jax.random.fold_in(jax.random.key(self.seed), self._calls))
      self._calls += 1
      if self.mesh is not None:
        bs = shd.batch_sharding(self.mesh)
        with jax.set_mesh(self.mesh):
          args = [shd.global_batch(p, bs) for p in parts]
          samples, gr = self._score_fn(self.params, *args, key)
      else:
        samples, gr = self._score_fn(self.params, *parts, key)
      samples = np.asarray(distributed.host_arrays(samples), np.float64)[:, :b - pad]
      k = samples.shape[0]
      means.append(samples.mean(axis=0))
      ses.append(samples.std(axis=0, ddof=1) / math.sqrt(k) if k > 1 else np.zeros(b - pad))
      greedy.append(np.asarray(distributed.host_arrays(gr))[:b - pad])
    if not means:
      return np.zeros(0), np.zeros(0), np.zeros(0, bool)
    return np.concatenate(means), np.concatenate(ses), np.concatenate(greedy)

  def loglikelihood(self, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
    """(log-likelihood lower bound, is_greedy) of each (context, continuation)."""
    rows = [self.request_row(*self.encode_pair(c, x)) for c, x in pairs]
    if not rows:
      return []
    mean, se, greedy = self.score_rows(Rows(*(np.concatenate([getattr(r, f) for r in rows])
                                              for f in ("tokens", "visible", "scored"))))
    self.last_stderr = [float(s) for s in se]
    self._log_stderr("loglikelihood")
    return [(-float(m), bool(g)) for m, g in zip(mean, greedy)]

  def loglikelihood_rolling(self, documents: Sequence[str]) -> List[float]:
    """Log-likelihood lower bound of each whole document (disjoint seq_len windows)."""
    rows, owner = [], []
    for i, doc in enumerate(documents):
      ids = self.encode(doc)
      for s in range(0, len(ids), self.seq_len):
        rows.append(self.request_row([], ids[s:s + self.seq_len]))
        owner.append(i)
    total = np.zeros(len(documents))
    var = np.zeros(len(documents))
    if rows:
      mean, se, _ = self.score_rows(Rows(*(np.concatenate([getattr(r, f) for r in rows])
                                           for f in ("tokens", "visible", "scored"))))
      np.add.at(total, owner, mean)
      np.add.at(var, owner, se ** 2)
    self.last_stderr = [float(v) for v in np.sqrt(var)]
    self._log_stderr("loglikelihood_rolling")
    return [-float(t) for t in total]

  def _log_stderr(self, what: str) -> None:
    if self.last_stderr and not self.exact:
      _LOG.info("mdm_jax %s: %d requests, K=%d time samples; standard error of the bound "
                   "mean %.4f, max %.4f nats.", what, len(self.last_stderr),
                   self.num_time_samples, float(np.mean(self.last_stderr)),
                   float(np.max(self.last_stderr)))

  # ------------------------------------------------------------------ generation
  def _sampler_fn(self, name: str, prompt_len: int):
    """A jitted (params, key, prompt [B, L], prompt_mask [B, L]) -> tokens [B, L]."""
    cache = (name, prompt_len if self.exact else -1)
    if cache in self._gen_fns:
      return self._gen_fns[cache]
    task, sc = self.task, self.config.sampling
    steps = int(self.num_steps or sc.num_steps)
    kw = task.sampler_kwargs(name, self.config, self.batch_size, self.seq_len, steps)
    kw.update(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p))
    fn = generate_lib.get_sampler(name)
    kw.update(generate_lib.sampler_options(fn, sc))
    if self.exact:
      kw["prompt_len"] = int(prompt_len)

    def run(params, key, prompt, prompt_mask):
      with nn.logical_axis_rules(self.rules or ()):
        extra = {} if self.exact else {"prompt_mask": prompt_mask}
        return fn(task.apply_fn, params, key, prompt=prompt, **extra, **kw).tokens

    self._gen_fns[cache] = jax.jit(run)
    return self._gen_fns[cache]

  def generate_until(self, requests: Sequence[Tuple[str, Dict[str, Any]]]) -> List[str]:
    """Continuations of each prompt, cut before the first stop string."""
    name = self.sampler or self.task.default_sampler(self.config)
    out: List[Optional[str]] = [None] * len(requests)
    prepared = []
    for i, (context, gen_kwargs) in enumerate(requests):
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen = min(int(gen_kwargs.get("max_gen_toks", 256)), self.seq_len - 1)
      ids = self.encode(context)[-(self.seq_len - max_gen):]
      prepared.append((i, ids, max_gen, until))
    groups: Dict[int, list] = {}
    for p in prepared:          # AR prompts are static lengths; diffusion takes any mix
      groups.setdefault(len(p[1]) if self.exact else 0, []).append(p)
    for plen, items in sorted(groups.items()):
      fn = self._sampler_fn(name, plen)
      for start in range(0, len(items), self.batch_size):
        chunk = items[start:start + self.batch_size]
        prompt = np.zeros((self.batch_size, self.seq_len), np.int32)
        mask = np.zeros((self.batch_size, self.seq_len), bool)
        for r, (_, ids, _, _) in enumerate(chunk):
          prompt[r, :len(ids)] = ids
          mask[r, :len(ids)] = True
        # One key per request, from its index (padding rows: indices past the end), so a
        # request's continuation does not depend on the batch it lands in.
        rows = [i for i, _, _, _ in chunk] + list(range(len(requests),
                                                        len(requests) + self.batch_size - len(chunk)))
        gen_key = jax.random.fold_in(jax.random.key(self.seed), 1_000_003)
        key = jax.vmap(lambda i: jax.random.fold_in(gen_key, i))(jnp.asarray(rows, jnp.uint32))
        if self.mesh is not None:
          with jax.set_mesh(self.mesh):
            toks = fn(self.params, key, jnp.asarray(prompt), jnp.asarray(mask))
        else:
          toks = fn(self.params, key, jnp.asarray(prompt), jnp.asarray(mask))
        toks = np.asarray(distributed.host_arrays(toks))
        for r, (i, ids, max_gen, until) in enumerate(chunk):
          text = self.tokenizer.decode(toks[r, len(ids):len(ids) + max_gen])
          cut = [text.find(s) for s in until if s and s in text]
          out[i] = text[:min(cut)] if cut else text
    return [o if o is not None else "" for o in out]


_REGISTERED: Dict[str, Any] = {}


def _to_bool(v) -> Optional[bool]:
  if v is None or isinstance(v, bool):
    return v
  return str(v).lower() in ("1", "true", "yes")


def register():
  """Registers the lm-eval model ``mdm_jax`` (once) and returns its class."""
  if MODEL_NAME in _REGISTERED:
    return _REGISTERED[MODEL_NAME]
  try:
    from lm_eval.api.model import LM  # pylint: disable=import-outside-toplevel
    from lm_eval.api.registry import register_model  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("The lm-evaluation-harness model needs lm-eval: pip install "
                      "'lm-eval>=0.4.13' (or pip install -e '.[test]').") from e

  class MdmJaxLM(LM):
    """lm-eval's view of a mdm_jax run (``mdm_jax.cli.lm_eval_model``)."""

    def __init__(self, workdir: Optional[str] = None, restore: Optional[str] = None,
                 num_time_samples: int = 8, batch_size: Any = 8, seed: int = 0,
                 sampler: Optional[str] = None, num_steps: Optional[int] = None,
                 use_ema: Any = None, evaluator: Optional[DiffusionLMEvaluator] = None,
                 max_batch_size: Any = None, device: Any = None, **unused):
      super().__init__()
      del max_batch_size, device       # lm-eval's own flags; the mesh decides placement
      if unused:
        raise ConfigError(f"Unknown mdm_jax model_args {sorted(unused)}; valid: workdir, "
                          "restore, num_time_samples, batch_size, seed, sampler, num_steps, "
                          "use_ema.")
      if evaluator is None:
        if not workdir:
          raise ConfigError("The mdm_jax model needs model_args workdir=DIR (a run or a "
                            "converted checkpoint).")
        bsz = 8 if str(batch_size).startswith("auto") else int(batch_size)
        evaluator = DiffusionLMEvaluator.from_workdir(
            str(workdir), restore=restore, use_ema=_to_bool(use_ema),
            num_time_samples=int(num_time_samples), batch_size=bsz, seed=int(seed),
            sampler=sampler or None, num_steps=int(num_steps) if num_steps else None)
      self.evaluator = evaluator

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config=None):
      """``model_args`` first; lm-eval's own settings (``--batch_size``, device) fill the rest."""
      from lm_eval import utils as lm_utils  # pylint: disable=import-outside-toplevel
      args = lm_utils.simple_parse_args_string(arg_string or "")
      for k, v in (additional_config or {}).items():
        if v is not None:
          args.setdefault(k, v)
      return cls(**args)

    @property
    def last_stderr(self) -> List[float]:
      return self.evaluator.last_stderr

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.evaluator.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.evaluator.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.evaluator.generate_until([tuple(r.args[:2]) for r in requests])

    @property
    def tokenizer_name(self) -> str:
      return type(self.evaluator.tokenizer).__name__

  register_model(MODEL_NAME)(MdmJaxLM)
  _REGISTERED[MODEL_NAME] = MdmJaxLM
  return MdmJaxLM
