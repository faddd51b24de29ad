"""Name -> factory tables, so a config line selects a component.

A researcher adds a schedule, sampler, network, dataset or task by writing one
function (or class) and decorating it with the matching registry's ``register``;
nothing else changes.  The registries:

=====================  ===========================================  ==========================
registry               where                                         selected by
=====================  ===========================================  ==========================
``SCHEDULES``          ``mdm_jax.diffusion.schedules``               ``config.schedule.name``
``MODELS``             ``mdm_jax.networks``                          ``config.model.name``
``SAMPLERS``           ``mdm_jax.sampling``                          ``config.sampling.sampler``
``DATASETS``           ``mdm_jax.data``                              ``config.data.dataset``
``TASKS``              ``mdm_jax.tasks``                             ``config.objective``
=====================  ===========================================  ==========================

Registering a name again replaces its entry, so a notebook cell that defines and
registers a component can be edited and run again; a ``UserWarning`` says so when the
new definition differs from the old one (another module, name or code), and re-running
an unchanged cell is silent.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, Generic, Optional, TypeVar

from mdm_jax.core.errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


def _same_value(a: Any, b: Any) -> bool:
  """``a == b`` where that is a plain yes or no (False for arrays and failing compares)."""
  try:
    return bool(a == b)
  except Exception:  # pylint: disable=broad-except
    return a is b


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SKIP = ("__dict__", "__weakref__", "__module__", "__qualname__")


def definition(obj: Any, _depth: int = 1) -> Any:
  """A value that is equal for two definitions of ``obj`` from the same source text.

  For a function: its module, qualified name, code (constants and nested code included),
  defaults and, one level deep, the definitions of the functions and classes of its own
  module that it names (so editing a class that a registered factory builds counts as a
  change).  For a class: its name, bases and every attribute it defines.  Anything else:
  its type and ``repr`` (memory addresses left out).  Two runs of one notebook cell give
  equal definitions; an edited cell gives a different one.
  """
  func = getattr(obj, "__func__", obj)             # a bound or class method: its function
  code = getattr(func, "__code__", None)
  if code is not None:
    named = ()
    if _depth > 0:
      glb = getattr(func, "__globals__", {})
      named = tuple(
          (n, definition(glb[n], _depth - 1)) for n in sorted(set(code.co_names))
          if n in glb and (callable(glb[n]) and getattr(glb[n], "__module__", None)
                           == func.__module__ and glb[n] is not func))
    return ("function", func.__module__, func.__qualname__, code,
            _plain(func.__defaults__), _plain(sorted((func.__kwdefaults__ or {}).items())),
            named)
  if isinstance(obj, type):
    attrs = tuple((k, definition(v, _depth)) for k, v in sorted(vars(obj).items())
                  if k not in _SKIP)
    return ("class", obj.__module__, obj.__qualname__,
            tuple(f"{b.__module__}.{b.__qualname__}" for b in obj.__bases__), attrs)
  if isinstance(obj, (staticmethod, classmethod)):
    return (type(obj).__name__, definition(obj.__func__, _depth))
  if isinstance(obj, property):
    return ("property",) + tuple(definition(f, _depth) for f in (obj.fget, obj.fset, obj.fdel)
                                 if f is not None)
  return _plain(obj)


def _plain(value: Any) -> Any:
  """A comparable stand-in for a default or attribute value: the value itself when it
  compares plainly with itself, else its type and address-free ``repr``."""
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  if value is None or isinstance(value, (bool, int, float, str, bytes)):
    return value
  if callable(value) and getattr(value, "__code__", None) is not None:
    return definition(value, 0)
  return (type(value).__qualname__, _ADDRESS.sub("", repr(value)))


class Registry(Generic[T]):
  """A named table of factories with helpful errors.

  Args:
    kind: what is registered ("schedule", "sampler", ...), for messages.
    config_key: the config key that selects an entry (``schedule.name``), for messages.
  """

  def __init__(self, kind: str, config_key: Optional[str] = None):
    self.kind = kind
    self.config_key = config_key or f"{kind}.name"
    self._table: Dict[str, T] = {}
    self._definitions: Dict[str, Any] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: ``@REGISTRY.register("name")`` adds the decorated factory.

    A name registered before is replaced (a notebook cell run again); the replacement
    warns when its definition differs from the old entry's (see ``definition``).
    """
    def deco(fn: T) -> T:
      self._put(name, fn, definition(fn))
      return fn
    return deco

  def _put(self, name: str, fn: T, new_definition: Any) -> None:
    """Stores ``fn`` as ``name``, warning when it replaces a different definition."""
    if name in self._table:
      old = self._definitions.get(name)
      if not (self._table[name] is fn or _same_value(old, new_definition)):
        warnings.warn(
            f"{self.kind} {name!r} is registered again with a different definition "
            f"({_where(self._table[name])} replaced by {_where(fn)}); the new one is used.",
            UserWarning, stacklevel=3)
    self._table[name] = fn
    self._definitions[name] = new_definition

  def unregister(self, name: str) -> None:
    """Removes an entry (for tests that register a temporary one)."""
    self._table.pop(name, None)
    self._definitions.pop(name, None)

  def get(self, name: str) -> T:
    """The factory registered as ``name``; a ``ConfigError`` naming the valid ones otherwise."""
    if name not in self._table:
      raise ConfigError(
          f"config.{self.config_key}={name!r} is not a registered {self.kind}; choose one of "
          f"{sorted(self._table)} (or register a new one with @{self.kind.upper()}S.register"
          "(name)).")
    return self._table[name]

  def names(self):
    return sorted(self._table)

  def items(self):
    return sorted(self._table.items())

  def __contains__(self, name: str) -> bool:
    return name in self._table


def _where(obj: Any) -> str:
  """``module.qualname`` of a registered object, for messages."""
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
