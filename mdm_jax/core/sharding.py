"""Device mesh and logical-axis sharding.

The model names its parameter and activation axes logically (batch, length,
embed, mlp, heads, kv, vocab, cond, layers); ``config.mesh.logical_rules``
maps each name to a mesh axis of the mesh ``config.mesh.shape`` over
(data, fsdp, tensor).  Data parallelism shards the batch over (data, fsdp);
FSDP additionally shards parameters and optimizer state along ``embed`` over
``fsdp``; tensor parallelism shards mlp / heads / vocab over ``tensor``.  The
same code runs on 1 CPU, 8 simulated CPU devices, one GPU and a TPU pod:
only the mesh shape changes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
  """Replaces a single -1 by the remaining device count and validates the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.mesh.shape must have {len(MESH_AXES)} entries for axes "
                     f"{MESH_AXES}, got {shape}.")
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"config.mesh.shape may contain at most one -1, got {shape}.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape entries must be positive or -1, got {shape}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape={shape}: {num_devices} devices are not divisible "
                       f"by the fixed axes' product {known}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh.shape={shape} needs {math.prod(shape)} devices but "
                     f"{num_devices} are available; use -1 for one axis to take the rest.")
  return shape


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh with Auto axis types (rule-based GSPMD).

  ``mesh_config.device_order`` (optional): a permutation of the device indices; the mesh
  is then exactly those devices in that order, reshaped to the mesh shape.
  """
  devices = jax.devices() if devices is None else list(devices)
  if tuple(mesh_config.axes) != MESH_AXES:
    raise ValueError(f"config.mesh.axes must be {MESH_AXES}, got {tuple(mesh_config.axes)}.")
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  order = tuple(int(i) for i in (mesh_config.get("device_order", ()) or ()))
  if order:
    if sorted(order) != list(range(len(devices))):
      raise ValueError(f"config.mesh.device_order={order} must be a permutation of "
                       f"0..{len(devices) - 1} (one entry per device).")
    grid = np.empty(len(devices), dtype=object)
    grid[:] = [devices[i] for i in order]
    return Mesh(grid.reshape(shape), MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except TypeError:  # older signatures without devices=
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_config) -> Tuple[Tuple[str, Any], ...]:
  rules = []
  for item in mesh_config.logical_rules:
    name, axis = item
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    for a in axes:
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"config.mesh.logical_rules maps {name!r} to unknown mesh axis {a!r}; "
                         f"valid axes: {MESH_AXES} or None.")
    rules.append((name, tuple(axis) if isinstance(axis, list) else axis))
  return tuple(rules)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


_REPLICATED_WARNED: set = set()


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "") -> P:
  """Drops mesh axes from dimensions they do not divide (those dims are replicated).

  Each such drop is logged as a warning, once per ``what`` (the array's name): a
  replicated dimension costs memory on every device of that axis (an odd vocabulary
  replicates the output head and its logits over tensor; ``model.vocab_multiple`` pads it).
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, entry in zip(shape, entries):
    if entry is not None and dim % _axis_size(mesh, entry):
      name = what or "an array"
      if name not in _REPLICATED_WARNED:
        _REPLICATED_WARNED.add(name)
        logging.warning("Replicating a dimension of size %d of %s over mesh axes %s: it is "
                        "not divisible by their size %d (an output head or vocabulary table "
                        "shards when padded: model.vocab_multiple).", dim, name, entry,
                        _axis_size(mesh, entry))
      entry = None
    out.append(entry)
  return P(*out)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be flax LogicallyPartitioned boxes.

  Unboxed leaves are replicated.  Dimensions that a mesh axis does not divide
  are replicated instead of failing.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = nn.unbox(abstract_tree)

  def one(path, leaf, spec):
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, fit_spec(spec, getattr(leaf, "shape", ()), mesh,
                                        jax.tree_util.keystr(path)))

  return jax.tree_util.tree_map_with_path(one, unboxed, mesh_specs,
                                          is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch dimension sharded over (data, fsdp); everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_batch_slice(mesh: Mesh, process_index: Optional[int] = None) -> Tuple[int, int]:
  """``(index, count)``: this process loads slice ``index`` of ``count`` equal slices of
  each global batch.

  The batch is sharded over (data, fsdp).  With the usual host-major device order each
  process holds its own block of rows, so this is ``(process_index, process_count)`` and a
  multi-process run matches a 1-process run row for row.  When an axis that replicates the
  batch (tensor) crosses hosts, several processes hold the same rows and load the same
  slice: with tensor parallelism over every host, each process loads the whole batch
  ``(0, 1)``.  A process whose rows are not one block (a pod mesh in ICI order) loads one
  slice all the same; ``jax.make_array_from_process_local_data`` places its rows at its
  devices' positions, so the batch is the same rows in another order.

  Raises:
    ValueError: the processes hold row sets of different sizes, or sets that overlap
      without being equal (no division of the loading fits them).
  """
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  grid = np.asarray(mesh.devices).reshape(shards, -1)      # batch shard x tensor
  rows: Dict[int, set] = {}
  for i, row in enumerate(grid):
    for d in row:
      rows.setdefault(d.process_index, set()).add(i)
  groups = sorted({tuple(sorted(r)) for r in rows.values()})
  sizes = {len(g) for g in groups}
  seen = [i for g in groups for i in g]
  if len(sizes) != 1 or len(seen) != len(set(seen)):
    raise ValueError(
        f"mesh {dict(mesh.shape)}: the processes hold batch rows in sets of different sizes "
        "or overlapping sets; every process must hold as many rows as every other, and two "
        "processes the same rows or none in common. Change mesh.device_order or mesh.shape.")
  me = jax.process_index() if process_index is None else int(process_index)
  return groups.index(tuple(sorted(rows[me]))), len(groups)


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Turns this process's rows of the batch into one global jax.Array."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))
