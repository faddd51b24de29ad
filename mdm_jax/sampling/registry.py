"""The sampler registry: ``config.sampling.sampler`` selects a function registered here.

Every sampler is ``fn(apply_fn, params, key, **static_kwargs) -> SampleResult`` and is
traceable, so a caller jits it with the keyword arguments closed over.  It registers
together with what it takes and what it promises::

    @SAMPLERS.register("my_sampler", options=MyOptions, takes=("eps",), exact=True,
                       nfe=lambda steps, elements, opts: (1, steps))
    def my_sampler(apply_fn, params, key, *, codec, schedule, batch_size, seq_len,
                   num_steps, my_knob=0.5, eps=1e-5, ...): ...

* ``options``: a frozen dataclass (a ``SamplerOptions`` subclass) whose fields are
  exactly the ``config.sampling`` keys the sampler takes, with their types and
  defaults; ``SamplerOptions.from_config`` turns ``config.sampling`` into one, and a
  value of the wrong type or outside a field's ``choices`` is a ``ConfigError`` naming
  the key.  No options: ``SamplerOptions`` itself.
* ``takes``: the optional arguments a task may supply beyond the common ones
  (``"eps"``: the grid's last time, ``"chunk_point"``: grouped reveals,
  ``"return_trajectory"``: the masking trajectory).
* claims, checked for every registered sampler by ``tests/test_sampler_conformance.py``:
  ``exact`` (a bool, or a function of the options): with a model whose positions are
  independent, temperature 1 and no top-k / top-p, the samples follow the model's law
  exactly at any ``num_steps``; ``nfe(num_steps, num_elements, options) -> (lo, hi)``
  bounds the network calls of one run on a batch with ``num_elements`` generated
  elements per sequence; ``reports_idle``: ``SampleResult.idle_steps`` means something.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from mdm_jax.core.errors import ConfigError
from mdm_jax.core.registry import Registry, definition

# What a task may pass to a sampler beyond the common arguments, when it declares it.
TASK_ARGUMENTS = ("eps", "chunk_point", "return_trajectory")


def choices(default: Any, valid: Sequence[Any]) -> Any:
  """A ``SamplerOptions`` field with a default and the values it may take."""
  return dataclasses.field(default=default, metadata={"choices": tuple(valid)})


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """The ``config.sampling`` keys a sampler takes (none here); subclasses add fields.

  Frozen and hashable: it is part of the key of the compiled sampler.
  """

  @classmethod
  def from_config(cls, sampling_config) -> "SamplerOptions":
    """The options read from ``config.sampling`` (a ConfigDict or a dict); a key that is
    absent keeps its default; a wrong type or value is a ``ConfigError`` naming the key."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
      if f.name not in sampling_config:
        continue
      values[f.name] = _convert(f.name, sampling_config[f.name], hints[f.name],
                                f.metadata.get("choices"))
    return cls(**values)

  def kwargs(self) -> Dict[str, Any]:
    """The options as sampler keyword arguments."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _convert(name: str, value: Any, kind: Any, valid: Optional[Tuple[Any, ...]]) -> Any:
  """``value`` as the declared ``kind`` (bool, int, float, str or Tuple[float, ...])."""
  where = f"config.sampling.{name}={value!r}"
  if typing.get_origin(kind) is tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where} must be a sequence of numbers.")
    inner = typing.get_args(kind)[0]
    return tuple(_convert(name, v, inner, None) for v in value)
  if kind is bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
      raise ConfigError(f"{where} must be True or False.")
    out = bool(value)
  elif kind is int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
      raise ConfigError(f"{where} must be an integer.")
    out = int(value)
  elif kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where} must be a number.")
    out = float(value)
  elif kind is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where} must be a string.")
    out = value
  else:
    raise TypeError(f"SamplerOptions field {name!r}: unsupported type {kind!r}.")
  if valid is not None and out not in valid:
    raise ConfigError(f"{where} is not valid; choose one of {list(valid)}.")
  return out


def _default_nfe(num_steps: int, num_elements: int, options: SamplerOptions) -> Tuple[int, int]:
  del num_elements, options
  return 1, num_steps + 1


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
  """A registered sampler: its function, its options spec and its claims."""
  name: str
  fn: Callable[..., Any]
  options: type = SamplerOptions
  takes: Tuple[str, ...] = ()
  exact: Union[bool, Callable[[SamplerOptions], bool]] = False
  nfe: Callable[[int, int, SamplerOptions], Tuple[int, int]] = _default_nfe
  reports_idle: bool = True

  def bind(self, sampling_config) -> SamplerOptions:
    """``config.sampling`` as this sampler's frozen options."""
    return self.options.from_config(sampling_config)

  def is_exact(self, options: SamplerOptions) -> bool:
    """The ``exact`` claim for these options."""
    return bool(self.exact(options) if callable(self.exact) else self.exact)


class SamplerRegistry(Registry):
  """``Registry`` whose entries also carry a ``SamplerEntry`` (``entry(name)``);
  ``get(name)`` is the sampler function itself."""

  def __init__(self, kind: str, config_key: Optional[str] = None):
    super().__init__(kind, config_key)
    self._entries: Dict[str, SamplerEntry] = {}

  def register(self, name: str, *, options: type = SamplerOptions,  # pylint: disable=arguments-differ
               takes: Sequence[str] = (), exact: Any = False,
               nfe: Callable[[int, int, SamplerOptions], Tuple[int, int]] = _default_nfe,
               reports_idle: bool = True):
    """Decorator: ``@SAMPLERS.register("name", options=..., ...)`` (see the module docstring)."""
    if not (isinstance(options, type) and issubclass(options, SamplerOptions)
            and dataclasses.is_dataclass(options)
            and options.__dataclass_params__.frozen):
      raise TypeError(f"sampler {name!r}: options must be a frozen dataclass subclassing "
                      f"SamplerOptions, got {options!r}.")
    unknown = sorted(set(takes) - set(TASK_ARGUMENTS))
    if unknown:
      raise TypeError(f"sampler {name!r}: takes={unknown} are not task arguments; those are "
                      f"{list(TASK_ARGUMENTS)} (config keys belong in options).")

    def deco(fn):
      entry = SamplerEntry(name=name, fn=fn, options=options, takes=tuple(takes), exact=exact,
                           nfe=nfe, reports_idle=bool(reports_idle))
      self._put(name, fn, (definition(fn), definition(options), tuple(takes),
                           definition(exact), definition(nfe), bool(reports_idle)))
      self._entries[name] = entry
      return fn
    return deco

  def unregister(self, name: str) -> None:
    super().unregister(name)
    self._entries.pop(name, None)

  def entry(self, name: str) -> SamplerEntry:
    """The ``SamplerEntry`` of ``name``; a ``ConfigError`` naming the valid ones otherwise."""
    self.get(name)
    return self._entries[name]

  def find(self, fn: Callable[..., Any]) -> SamplerEntry:
    """The entry whose function is ``fn`` (by identity)."""
    for entry in self._entries.values():
      if entry.fn is fn:
        return entry
    raise ConfigError(f"{getattr(fn, '__qualname__', fn)!r} is not a registered sampler.")


SAMPLERS = SamplerRegistry("sampler", "sampling.sampler")


def get_sampler(name: str):
  """The sampler function registered under ``name`` ("ancestral", "ar", ...)."""
  return SAMPLERS.get(name)


def sampler_entry(name: str) -> SamplerEntry:
  """The registered ``SamplerEntry`` of ``name`` (function, options spec, claims)."""
  return SAMPLERS.entry(name)
