"""Generation from a train state or checkpoint: samples as text + JSON stats."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from mdm_jax import sampling

_JIT_CACHE: Dict[tuple, Any] = {}
_COMPILED: Dict[Any, Any] = {}     # jitted sampler -> its compiled executable

# config.sampling keys that are sampler options: each is passed, under its own
# name, to the samplers whose signature has a parameter of that name.
SAMPLER_OPTIONS = (
    "confidence", "block_len", "punt_eps", "punt_max_candidates", "punt_divergence", "punt_confidence",
    "punt_mode", "eb_gamma", "fast_dllm_threshold", "maskgit_select_temp",
    "correction_phases", "correction_caps", "correction_score", "correction_probe_frac",
    "remdm_schedule", "remdm_eta", "remdm_t_on", "remdm_t_off", "remdm_alpha_on")


def sampler_options(fn, sampling_config) -> Dict[str, Any]:
  """The SAMPLER_OPTIONS that ``fn`` accepts, read from config.sampling (hashable values)."""
  accepted = inspect.signature(fn).parameters
  out = {}
  for name in SAMPLER_OPTIONS:
    if name in accepted and name in sampling_config:
      val = sampling_config[name]
      out[name] = tuple(val) if isinstance(val, (list, tuple)) else val
  return out


def _sampler_fn(task, config, sampler: str, num_samples: int, seq_len: int, num_steps: int,
                rules):
  """A jitted (params, key) -> SampleResult closure for this task and settings."""
  sc = config.sampling
  fn = sampling.get_sampler(sampler)
  options = sampler_options(fn, sc)
  key = (id(task), sampler, num_samples, seq_len, num_steps, float(sc.temperature),
         int(sc.top_k), float(sc.top_p), rules, tuple(sorted(options.items())))
  if key in _JIT_CACHE:
    return _JIT_CACHE[key]
  if task.objective == "ar":
    if sampler != "ar":
      raise ValueError(f"objective='ar' models sample with sampler 'ar', not {sampler!r}: "
                       "set --config.sampling.sampler=ar.")
    kwargs = dict(vocab_size=task.vocab_size, batch_size=num_samples, seq_len=seq_len,
                  bos_id=task.codec.mask_id)
  else:
    if sampler == "ar":
      raise ValueError("sampler 'ar' needs objective='ar'; diffusion models use e.g. "
                       "'ancestral'.")
    kwargs = dict(codec=task.codec, schedule=task.schedule, batch_size=num_samples,
                  seq_len=seq_len, num_steps=num_steps,
                  carry_over=bool(config.prime.carry_over),
                  time_conditioning=task.time_conditioning)
  kwargs.update(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p))
  kwargs.update(options)
  if task.objective != "ar" and "chunk_point" in inspect.signature(fn).parameters:
    kwargs["chunk_point"] = task.loss_cfg.chunk_point   # grouped reveals mirror training

  def run(params, rng):
    with nn.logical_axis_rules(rules or ()):
      return fn(task.apply_fn, params, rng, **kwargs)

  _JIT_CACHE[key] = jax.jit(run)
  return _JIT_CACHE[key]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Mean over samples of the entropy (nats) of each sample's token histogram."""
  ents = []
  for row in np.asarray(tokens):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    ents.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(ents)) if ents else 0.0


def generate(task, params, config, *, seed: Optional[int] = None, num_samples: Optional[int] = None,
             num_steps: Optional[int] = None, sampler: Optional[str] = None, mesh=None,
             rules=None) -> Tuple[Any, Dict[str, float]]:
  """Samples sequences; returns (SampleResult, stats with NFE, wall time, tokens/s, entropy)."""
  if hasattr(task, "generate"):   # tasks with their own samplers (GaussianTask: DDIM/DDPM/EDM)
    return task.generate(params, config, seed=seed, num_samples=num_samples,
                         num_steps=num_steps, sampler=sampler, mesh=mesh, rules=rules)
  sc = config.sampling
  sampler = sampler or ("ar" if task.objective == "ar" else sc.sampler)
  n = int(num_samples or sc.num_samples)
  steps = int(num_steps or sc.num_steps)
  seq_len = int(sc.seq_len or task.seq_len)
  fn = _sampler_fn(task, config, sampler, n, seq_len, steps, rules)
  rng = jax.random.key(int(sc.seed if seed is None else seed))
  ctx = jax.set_mesh(mesh) if mesh is not None else _Null()
  with ctx:
    t0 = time.time()
    compiled = _COMPILED.get(fn)
    if compiled is None:   # lower().compile() bypasses jit's cache: keep the executable
      compiled = _COMPILED[fn] = fn.lower(params, rng).compile()
    compile_s = time.time() - t0
    t0 = time.time()
    res = jax.block_until_ready(compiled(params, rng))
    wall = time.time() - t0
  res = jax.tree.map(_to_host_readable, res)
  tokens = np.asarray(res.tokens)
  stats = {"sampler": sampler, "num_samples": n, "seq_len": seq_len, "num_steps": steps,
           "nfe": int(res.nfe), "wall_time_s": wall, "compile_time_s": compile_s,
           "tokens_per_s": n * seq_len / max(wall, 1e-9),
           "sample_entropy": unigram_entropy(tokens)}
  if hasattr(res, "idle_steps") and sampler != "ar":
    stats["idle_steps"] = int(res.idle_steps)
    stats["idle_fraction"] = int(res.idle_steps) / max(steps, 1)
  for name, val in (getattr(res, "aux", None) or {}).items():   # e.g. steps, remasked
    stats[name] = np.asarray(val).item()
  return res, stats


def _to_host_readable(x):
  """Gathers an array sharded over several processes (a collective: every process calls it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(x, tiled=True)
  return x


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def sample_and_write(task, params, config, tokenizer, workdir: str, step: int, *, mesh=None,
                     rules=None, write: bool = True,
                     known_words: Optional[frozenset] = None,
                     known_bigrams: Optional[frozenset] = None,
                     scorer=None) -> Dict[str, Any]:
  """Generates ``sampling.num_samples`` texts, writes samples/step_N.{txt,json}.

  With ``known_words`` (the corpus's words) the stats include
  ``known_word_rate``: the fraction of sampled words that are corpus words; with
  ``known_bigrams`` also ``known_bigram_rate``, the same for in-line word pairs; with
  a ``scorer`` (``eval_text.Scorer``, an AR run) also ``gen_ppl``, the texts'
  generative perplexity under it, with ``gen_entropy`` and ``gen_nats_per_char``.
  The JSON holds the texts too, so ``--mode=score`` can score them later.
  """
  res, stats = generate(task, params, config, mesh=mesh, rules=rules)
  if getattr(tokenizer, "is_image", False):   # images: a PNG grid (mdm_jax/data/images.py)
    if write:
      out = os.path.join(workdir, "samples")
      os.makedirs(out, exist_ok=True)
      stats.update(tokenizer.write_samples(np.asarray(res.tokens), out, step))
      with open(os.path.join(out, f"step_{step}.json"), "w") as f:
        json.dump(stats, f, indent=2)
      print(f"----- {stats['num_samples']} images at step {step} -> {stats['grid_png']}",
            file=sys.stderr, flush=True)
    return {"texts": [], **stats}
  texts = [tokenizer.decode(np.asarray(row)) for row in np.asarray(res.tokens)]
  if known_words:
    from mdm_jax.data.text import known_word_rate  # pylint: disable=import-outside-toplevel
    stats["known_word_rate"], stats["num_words"] = known_word_rate(texts, known_words)
  if known_bigrams:
    from mdm_jax.data.text import known_bigram_rate  # pylint: disable=import-outside-toplevel
    stats["known_bigram_rate"], stats["num_bigrams"] = known_bigram_rate(texts, known_bigrams)
  if scorer is not None:
    from mdm_jax.eval_text import score_texts  # pylint: disable=import-outside-toplevel
    scored = score_texts(scorer, texts)
    stats.update(gen_ppl=scored["gen_ppl"], gen_nats_per_char=scored["nats_per_char"],
                 gen_entropy=scored["entropy"], scorer=scored["scorer"])
  if write:
    out = os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"step_{step}.txt"), "w") as f:
      for i, t in enumerate(texts):
        f.write(f"===== sample {i} (step {step}, {stats['sampler']}, T={stats['num_steps']}) "
                f"=====\n{t}\n\n")
    with open(os.path.join(out, f"step_{step}.json"), "w") as f:
      json.dump({**stats, "texts": texts}, f, indent=2)
    words = (f", {100 * stats['known_word_rate']:.0f}% corpus words" if "known_word_rate" in stats
             else "")
    if "known_bigram_rate" in stats:
      words += f", {100 * stats['known_bigram_rate']:.0f}% corpus word pairs"
    if "gen_ppl" in stats:
      words += f", gen ppl {stats['gen_ppl']:.1f} (entropy {stats['gen_entropy']:.2f})"
    print(f"\n----- sample 0 at step {step} ({stats['sampler']}, NFE {stats['nfe']}, "
          f"{stats['tokens_per_s']:.0f} tok/s{words}) -----\n{texts[0][:600]}\n-----",
          file=sys.stderr, flush=True)
  return {"texts": texts, **stats}
