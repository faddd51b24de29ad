"""Registries in a notebook: running the cell that registers a component again replaces
the entry, silently when nothing changed and with a warning when the definition did."""

import warnings

import pytest

from mdm_jax.core.registry import Registry
from mdm_jax.diffusion.schedules import SCHEDULES
from mdm_jax.sampling import SAMPLERS

SCHEDULE_CELL = '''
from mdm_jax.diffusion.schedules import SCHEDULES, linear

class CellSchedule:
  """A stand-in the factory builds (a real cell would subclass Schedule)."""
  power = {power}

@SCHEDULES.register("cell_schedule")
def cell_schedule(config):
  del config
  CellSchedule()
  return linear()
'''

SAMPLER_CELL = '''
import dataclasses
from mdm_jax.sampling import SAMPLERS, SamplerOptions, ancestral_sample

@dataclasses.dataclass(frozen=True)
class CellOptions(SamplerOptions):
  cell_knob: float = {knob}

@SAMPLERS.register("cell_sampler", options=CellOptions, takes=("eps",))
def cell_sampler(apply_fn, params, key, *, cell_knob={knob}, **kw):
  return ancestral_sample(apply_fn, params, key, **kw)
'''


def run_cell(source, cell_number):
  """Runs ``source`` as a notebook does: a fresh code object (its own file name) in the
  notebook's namespace; returns the warnings it gave."""
  namespace = {"__name__": "__main__"}
  code = compile(source, f"<cell {cell_number}>", "exec")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exec(code, namespace)                       # pylint: disable=exec-used
  return namespace, [w for w in caught if "registered again" in str(w.message)]


@pytest.mark.parametrize("registry,name,cell,fn_name,edits", [
    (SCHEDULES, "cell_schedule", SCHEDULE_CELL, "cell_schedule", ({"power": 2}, {"power": 3})),
    (SAMPLERS, "cell_sampler", SAMPLER_CELL, "cell_sampler", ({"knob": 0.5}, {"knob": 0.7})),
])
def test_a_cell_run_twice_replaces_its_entry(registry, name, cell, fn_name, edits):
  same, edited = edits
  try:
    ns1, w1 = run_cell(cell.format(**same), 1)
    assert registry.get(name) is ns1[fn_name] and not w1
    ns2, w2 = run_cell(cell.format(**same), 2)            # the same cell again: silent
    assert registry.get(name) is ns2[fn_name] is not ns1[fn_name]
    assert not w2, [str(w.message) for w in w2]
    ns3, w3 = run_cell(cell.format(**edited), 3)          # an edited cell: replaced, warned
    assert registry.get(name) is ns3[fn_name]
    assert len(w3) == 1 and name in str(w3[0].message)
    if registry is SAMPLERS:                               # the new options spec is used
      assert registry.entry(name).options is ns3["CellOptions"]
      assert registry.entry(name).options().cell_knob == edits[1]["knob"]
  finally:
    registry.unregister(name)
  assert name not in registry


def test_a_different_function_under_a_taken_name_warns():
  reg = Registry("widget")

  @reg.register("w")
  def first(x):
    return x

  with pytest.warns(UserWarning, match="widget 'w' is registered again"):
    @reg.register("w")
    def second(x):           # pylint: disable=unused-variable
      return x + 1

  assert reg.get("w") is not first
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    reg.register("w")(reg.get("w"))                        # the same object: silent
  reg.unregister("w")
  assert reg.names() == []
