"""Running a sampler: jit once per setting, time compile and run apart, report the numbers.

``run_sampler(apply_fn, params, name, kwargs, ...)`` jits the registered sampler with
its static keyword arguments closed over (cached per setting), compiles it ahead of
time so that the wall time excludes compilation, and returns the ``SampleResult`` with
a stats dict: NFE, wall and compile time, tokens/s, the samples' unigram entropy and,
where the sampler reports them, idle steps and its own extra numbers.  Tasks build the
keyword arguments (``mdm_jax.tasks``); this module knows no task.

Sample i of a run with seed s is drawn from the per-row key fold_in(key(s), i)
(``sampling/common.py``): ``row_offset`` is the global index of a call's first sample,
so ``num_samples`` drawn in batches (``row_offset`` = the samples drawn before) are the
same samples as one big call, on any mesh.  ``precision`` sets the precision of the
draws (``filters.sampling_precision``).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import numpy as np

from mdm_jax.core import distributed
from mdm_jax.metrics.text import unigram_entropy
from mdm_jax.sampling.common import row_keys
from mdm_jax.sampling.filters import sampling_precision
from mdm_jax.sampling.registry import get_sampler

# config.sampling keys that are sampler options: each is passed, under its own
# name, to the samplers whose signature has a parameter of that name.
SAMPLER_OPTIONS = (
    "confidence", "block_len", "punt_eps", "punt_max_candidates", "punt_divergence", "punt_confidence",
    "punt_mode", "eb_gamma", "fast_dllm_threshold", "maskgit_select_temp",
    "correction_phases", "correction_caps", "correction_score", "correction_probe_frac",
    "remdm_schedule", "remdm_eta", "remdm_t_on", "remdm_t_off", "remdm_alpha_on")

_JIT_CACHE: Dict[tuple, Any] = {}
_COMPILED: Dict[Any, Any] = {}     # jitted sampler -> its compiled executable


def sampler_options(fn, sampling_config) -> Dict[str, Any]:
  """The SAMPLER_OPTIONS that ``fn`` accepts, read from config.sampling (hashable values)."""
  accepted = inspect.signature(fn).parameters
  out = {}
  for name in SAMPLER_OPTIONS:
    if name in accepted and name in sampling_config:
      val = sampling_config[name]
      out[name] = tuple(val) if isinstance(val, (list, tuple)) else val
  return out


def jitted_sampler(apply_fn: Callable, name: str, kwargs: Dict[str, Any], rules=None,
                   cache_key: Any = None, precision: str = "float32"):
  """A jitted ``(params, key) -> SampleResult`` for the sampler ``name`` and static kwargs.

  ``precision="float64"``: trace and compile it inside ``sampling_precision("float64")``
  (``run_sampler`` does).
  """
  key = (cache_key if cache_key is not None else id(apply_fn), name, rules, precision,
         tuple(sorted((k, v if isinstance(v, (int, float, str, bool, tuple, type(None)))
                       else id(v)) for k, v in kwargs.items())))
  if key in _JIT_CACHE:
    return _JIT_CACHE[key]
  fn = get_sampler(name)

  def run(params, rng):
    with nn.logical_axis_rules(rules or ()), sampling_precision(precision):
      return fn(apply_fn, params, rng, **kwargs)

  _JIT_CACHE[key] = jax.jit(run)
  return _JIT_CACHE[key]


def run_sampler(apply_fn: Callable, params, name: str, kwargs: Dict[str, Any], *, seed: int,
                num_samples: int, seq_len: int, num_steps: int, mesh=None, rules=None,
                cache_key: Any = None, report_idle: bool = True, row_offset: int = 0,
                precision: str = "float32") -> Tuple[Any, Dict[str, Any]]:
  """Samples with the registered sampler ``name``; returns (SampleResult, stats).

  The call's sample b is drawn from fold_in(key(seed), row_offset + b) (the sampler gets
  these per-row keys), whatever num_samples, mesh or process count.
  """
  fn = jitted_sampler(apply_fn, name, kwargs, rules, cache_key, precision)
  rng = row_keys(jax.random.key(int(seed)), int(num_samples), int(row_offset))
  with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    t0 = time.time()
    compiled = _COMPILED.get(fn)
    if compiled is None:   # lower().compile() bypasses jit's cache: keep the executable
      with sampling_precision(precision):
        compiled = _COMPILED[fn] = fn.lower(params, rng).compile()
    compile_s = time.time() - t0
    t0 = time.time()
    res = jax.block_until_ready(compiled(params, rng))
    wall = time.time() - t0
  res = distributed.host_arrays(res)     # samples sharded over processes: gathered
  tokens = np.asarray(res.tokens)
  stats = {"sampler": name, "num_samples": int(num_samples), "seq_len": int(seq_len),
           "num_steps": int(num_steps), "nfe": int(res.nfe), "wall_time_s": wall,
           "compile_time_s": compile_s, "tokens_per_s": num_samples * seq_len / max(wall, 1e-9),
           "sample_entropy": unigram_entropy(tokens)}
  if report_idle and getattr(res, "idle_steps", None) is not None:
    stats["idle_steps"] = int(res.idle_steps)
    stats["idle_fraction"] = int(res.idle_steps) / max(num_steps, 1)
  for key, val in (getattr(res, "aux", None) or {}).items():   # e.g. steps, remasked
    stats[key] = np.asarray(val).item()
  return res, stats
