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
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Optional, TypeVar

from mdm_jax.core.errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


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

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: ``@REGISTRY.register("name")`` adds the decorated factory."""
    def deco(fn: T) -> T:
      if name in self._table:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._table[name] = fn
      return fn
    return deco

  def unregister(self, name: str) -> None:
    """Removes an entry (for tests that register a temporary one)."""
    self._table.pop(name, None)

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
