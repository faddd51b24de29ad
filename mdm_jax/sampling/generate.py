"""Running a sampler: bind its options once, jit once per setting, time compile and run apart.

``run_sampler(apply_fn, params, name, kwargs, ...)`` jits the registered sampler with
its static keyword arguments closed over, compiles it ahead of time so that the wall
time excludes compilation, and returns the ``SampleResult`` with a stats dict: NFE, wall
and compile time, tokens/s, the samples' unigram entropy and, where the sampler reports
them, idle steps and its own extra numbers.  Tasks build the keyword arguments
(``mdm_jax.tasks``), with the ``config.sampling`` options bound to the sampler's frozen
options spec (``bind_options``); this module knows no task.

The jitted samplers and their executables live in one small LRU cache keyed by value:
the sampler's function, the model function (a flax ``Module.apply`` compares by the
module's fields, a bound method by its object), the keyword arguments, the logical-axis
rules, the mesh and the parameters' shardings.  The cache holds what it keys on, so a
key cannot be taken over by a new model while its entry lives, and it is bounded, so an
old model is let go once ``CACHE_SIZE`` newer settings have been run.

Sample i of a run with seed s is drawn from the per-row key fold_in(key(s), i)
(``sampling/common.py``): ``row_offset`` is the global index of a call's first sample,
so ``num_samples`` drawn in batches (``row_offset`` = the samples drawn before) are the
same samples as one big call, on any mesh.  ``precision`` sets the precision of the
draws (``filters.sampling_precision``).
"""

from __future__ import annotations

import collections
import contextlib
import time
import types
from typing import Any, Callable, Dict, Hashable, Optional, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mdm_jax.core import distributed
from mdm_jax.metrics.text import unigram_entropy
from mdm_jax.sampling.common import row_keys
from mdm_jax.sampling.filters import sampling_precision
from mdm_jax.sampling.registry import SAMPLERS, SamplerOptions, get_sampler, sampler_entry

# The config.sampling keys that the built-in samplers' options specs declare (each
# sampler's own list is its ``SAMPLERS.entry(name).options``).
SAMPLER_OPTIONS = (
    "confidence", "block_len", "punt_eps", "punt_max_candidates", "punt_divergence", "punt_confidence",
    "punt_mode", "eb_gamma", "fast_dllm_threshold", "maskgit_select_temp",
    "correction_phases", "correction_caps", "correction_score", "correction_probe_frac",
    "remdm_schedule", "remdm_eta", "remdm_t_on", "remdm_t_off", "remdm_alpha_on")

CACHE_SIZE = 8            # jitted samplers kept (each with its executables)
EXECUTABLES_PER_SAMPLER = 4


class BoundedCache:
  """A least-recently-used dict of at most ``size`` entries."""

  def __init__(self, size: int):
    self.size = int(size)
    self._data: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()

  def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
    """The value of ``key``, made (and the oldest entry dropped if full) when absent."""
    if key in self._data:
      self._data.move_to_end(key)
      return self._data[key]
    value = self._data[key] = make()
    while len(self._data) > self.size:
      self._data.popitem(last=False)
    return value

  def clear(self) -> None:
    self._data.clear()

  def __len__(self) -> int:
    return len(self._data)

  def __contains__(self, key: Hashable) -> bool:
    return key in self._data


class _Held:
  """A key part for an unhashable object: equal only to itself, and it holds the object,
  so the object cannot be collected (and its place reused) while the key lives."""

  def __init__(self, obj: Any):
    self.obj = obj

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _Held) and other.obj is self.obj

  def __hash__(self) -> int:
    return hash(type(self.obj).__qualname__)


def value_key(value: Any) -> Hashable:
  """``value`` as a hashable key part: itself when hashable, tuples and dicts item by item,
  a bound method by its function and its object's key (a flax ``Module.apply`` by the
  module's fields), arrays by shape, dtype and contents, anything else held by identity
  (``_Held``)."""
  if isinstance(value, (list, tuple)):
    return tuple(value_key(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, value_key(v)) for k, v in value.items()))
  if isinstance(value, types.MethodType):       # compares its object by identity: by value here
    return ("method", value.__func__, value_key(value.__self__))
  if isinstance(value, (np.ndarray, jax.Array)):
    arr = np.asarray(value)
    return ("array", arr.shape, str(arr.dtype), arr.tobytes())
  try:
    hash(value)
  except TypeError:
    return _Held(value)
  return value


def bind_options(sampler: Union[str, Callable[..., Any]], sampling_config) -> SamplerOptions:
  """``config.sampling`` as the frozen options spec of ``sampler`` (a name, or a
  registered sampler function); a ``ConfigError`` names a key with a bad value."""
  entry = SAMPLERS.find(sampler) if callable(sampler) else sampler_entry(sampler)
  return entry.bind(sampling_config)


def sampler_options(sampler: Union[str, Callable[..., Any]], sampling_config) -> Dict[str, Any]:
  """The options ``sampler`` takes, read from config.sampling, as keyword arguments."""
  return bind_options(sampler, sampling_config).kwargs()


def _shardings(mesh, params):
  """(in_shardings, out_shardings) for ``(params, key, *replicated) -> outputs``: the
  parameters as they are sharded, everything else replicated over ``mesh``; None where
  there is no mesh or a parameter is not a placed ``jax.Array`` / ``ShapeDtypeStruct``."""
  if mesh is None:
    return None
  leaves, treedef = jax.tree.flatten(params)
  shard = [getattr(x, "sharding", None) for x in leaves]
  if any(s is None for s in shard):
    return None
  return jax.tree.unflatten(treedef, shard), NamedSharding(mesh, PartitionSpec())


def jit_with_shardings(fn: Callable[..., Any], mesh, params, num_replicated: int = 1):
  """``jax.jit(fn)`` for ``fn(params, *args)`` with explicit shardings: ``params`` as
  they are sharded, the ``num_replicated`` other arguments and the outputs replicated
  over ``mesh`` (plain ``jax.jit`` without a mesh)."""
  sh = _shardings(mesh, params)
  if sh is None:
    return jax.jit(fn)
  param_sh, rep = sh
  return jax.jit(fn, in_shardings=(param_sh,) + (rep,) * num_replicated, out_shardings=rep)


def sharding_key(mesh, params) -> Hashable:
  """The part of a cache key that ``jit_with_shardings`` depends on."""
  sh = _shardings(mesh, params)
  if sh is None:
    return None
  leaves, treedef = jax.tree.flatten(sh[0])
  return (mesh, treedef, tuple(leaves))


def abstract_key(*args) -> Hashable:
  """Shapes, dtypes and shardings of ``args``: which executable a jitted function needs."""
  leaves, treedef = jax.tree.flatten(args)
  return (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))),
                          getattr(x, "sharding", None)) for x in leaves))


_SAMPLERS_CACHE = BoundedCache(CACHE_SIZE)


def _entry_key(apply_fn, name, kwargs, rules, cache_key, mesh, params, precision):
  return (name, get_sampler(name), value_key(apply_fn), value_key(cache_key), value_key(rules),
          value_key(kwargs), sharding_key(mesh, params), str(precision))


def jitted_sampler(apply_fn: Callable, name: str, kwargs: Dict[str, Any], rules=None,
                   cache_key: Any = None, *, mesh=None, params=None,
                   precision: str = "float32"):
  """A jitted ``(params, key) -> SampleResult`` for the sampler ``name`` and static kwargs.

  With a ``mesh`` and placed ``params`` (arrays or ``ShapeDtypeStruct``s with shardings)
  its shardings are explicit: parameters as given, key and outputs replicated.
  ``cache_key`` is an extra value for the cache key (the model function's value already
  is one).  ``precision="float64"``: traced and compiled inside
  ``sampling_precision("float64")`` (``run_sampler`` does).
  """
  return _cached(apply_fn, name, kwargs, rules, cache_key, mesh, params, precision)["jit"]


def _cached(apply_fn, name, kwargs, rules, cache_key, mesh, params,
            precision="float32") -> Dict[str, Any]:
  fn = get_sampler(name)

  def make():
    def run(params, rng):
      with nn.logical_axis_rules(rules or ()), sampling_precision(precision):
        return fn(apply_fn, params, rng, **kwargs)
    return {"jit": jit_with_shardings(run, mesh, params),
            "compiled": BoundedCache(EXECUTABLES_PER_SAMPLER)}

  return _SAMPLERS_CACHE.get(_entry_key(apply_fn, name, kwargs, rules, cache_key, mesh, params,
                                        precision),
                             make)


def run_sampler(apply_fn: Callable, params, name: str, kwargs: Dict[str, Any], *, seed: int,
                num_samples: int, seq_len: int, num_steps: int, mesh=None, rules=None,
                cache_key: Any = None, report_idle: bool = True, row_offset: int = 0,
                precision: str = "float32") -> Tuple[Any, Dict[str, Any]]:
  """Samples with the registered sampler ``name``; returns (SampleResult, stats).

  The call's sample b is drawn from fold_in(key(seed), row_offset + b) (the sampler gets
  these per-row keys), whatever num_samples, mesh or process count.
  """
  cached = _cached(apply_fn, name, kwargs, rules, cache_key, mesh, params, precision)
  fn = cached["jit"]
  rng = row_keys(jax.random.key(int(seed)), int(num_samples), int(row_offset))
  with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    t0 = time.time()

    def compile_it():    # lower().compile() bypasses jit's own cache: kept here
      with sampling_precision(precision):
        return fn.lower(params, rng).compile()
    compiled = cached["compiled"].get(abstract_key(params, rng), compile_it)
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
  if (report_idle and sampler_entry(name).reports_idle
      and getattr(res, "idle_steps", None) is not None):
    stats["idle_steps"] = int(res.idle_steps)
    stats["idle_fraction"] = int(res.idle_steps) / max(num_steps, 1)
  for key, val in (getattr(res, "aux", None) or {}).items():   # e.g. steps, remasked
    stats[key] = np.asarray(val).item()
  return res, stats
