"""Name -> factory tables, so a config line selects a component.

A researcher adds a schedule, sampler or loss by writing one function and
decorating it with the matching ``register``; nothing else changes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
  """A named table of factories with helpful errors."""

  def __init__(self, kind: str):
    self.kind = kind
    self._table: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def deco(fn: T) -> T:
      if name in self._table:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._table[name] = fn
      return fn
    return deco

  def get(self, name: str) -> T:
    if name not in self._table:
      raise ValueError(
          f"Unknown {self.kind} {name!r}. Valid names: {sorted(self._table)}. "
          f"Set config.{self.kind}.name (or the matching key) to one of them, "
          f"or register a new one with @{self.kind.upper()}S.register(name).")
    return self._table[name]

  def names(self):
    return sorted(self._table)

  def __contains__(self, name: str) -> bool:
    return name in self._table
