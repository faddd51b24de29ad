"""Scaling on paper: collective bytes of the compiled train step, and a projected pod step time.

Compiles the real train step (the same ``make_train_step`` the trainer runs) for the
paper-size text model on a simulated device mesh (``--xla_force_host_platform_device_count``,
so no accelerator is needed), reads the collectives out of the optimised HLO (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute; ops inside scanned loops are
multiplied by the loop's trip count) and turns them into per-device link traffic with
ring-algorithm factors.  Then it projects a step time on a TPU v5p slice from stated
hardware assumptions (``--peak_tflops``, ``--ici_gbps``, ``--mfu``): compute time, comm
time and their sum (no overlap) and max (perfect overlap).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
  python -m mdm_jax.benchmarks.collectives --config=owt_prime \\
      --meshes=8,1,1:1,8,1:1,1,8:2,4,1 --per_device_batch=8 --out=BENCH_DIR/collectives.json

The byte counts are exact for the compiled program on this backend; XLA on TPU may fuse
or schedule collectives differently (e.g. combine small all-reduces), so treat the
projection as the order of magnitude it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mdm_jax.benchmarks.flops import model_flops_per_token
from mdm_jax.core import sharding as shd
from mdm_jax.core.flags import flags_parser
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import make_optimizer, state_shardings
from mdm_jax.trainers.steps import make_train_step

def _define_flags():
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  global _CONFIG, _MESHES, _VOCAB, _PER_DEVICE_BATCH, _SEQ_LEN, _PEAK, _ICI, _MFU, _CHIPS, _OUT
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Model/training config (e.g. "
                                            "owt_prime).", lock_config=False)
  _MESHES = flags.DEFINE_string("meshes", "8,1,1:1,8,1:1,1,8:2,4,1",
                                "Colon-separated (data, fsdp, tensor) mesh shapes.")
  _VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary size (no tokenizer is loaded).")
  _PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 8, "Sequences per device and step.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Sequence length (0 = the config's).")
  _PEAK = flags.DEFINE_float("peak_tflops", 459.0, "Projection: bf16 peak per chip (TPU v5p: 459).")
  _ICI = flags.DEFINE_float("ici_gbps", 4800.0, "Projection: ICI bandwidth per chip in Gbit/s "
                            "(TPU v5p: 4800, all links together).")
  _MFU = flags.DEFINE_float("mfu", 0.5, "Projection: assumed model FLOPs utilisation of compute.")
  _CHIPS = flags.DEFINE_list("project_chips", ["8", "64", "256"], "Projection: slice sizes "
                             "(chips); data-parallel degree scales, per-chip batch fixed.")
  _OUT = flags.DEFINE_string("out", "", "JSON output path (default: print only).")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_COMP_RE = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^)]*\))?.*\{\s*$")
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\(")


def shape_bytes(type_str: str) -> int:
  """Bytes of an HLO result type (array or tuple), e.g. ``(f32[8,4], bf16[2])`` -> 136."""
  total = 0
  for dtype, dims in _SHAPE_RE.findall(type_str):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def _group_size(line: str, num_devices: int) -> int:
  groups = replica_groups(line)
  if groups is not None:
    return max(int(groups.shape[1]), 1)
  m = re.search(r"replica_groups=\{(\{[^}]*\})", line)
  if m:
    return max(len([x for x in m.group(1).strip("{}").split(",") if x.strip()]), 1)
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)      # iota form [groups,size]<=[n]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['a'=8,..] {'a'}
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    axes = re.findall(r"'([^']+)'", m.group(2))
    return int(math.prod(int(sizes.get(a, 1)) for a in axes)) if axes else 1
  return num_devices


def replica_groups(line: str) -> Optional[np.ndarray]:
  """The replica groups of an HLO collective as a [groups, size] array of partition ids.

  Reads the explicit form ``{{0,1},{2,3}}``, the iota form ``[G,S]<=[d0,d1,...]`` with
  an optional transpose ``T(p0,p1,...)``, and the mesh form ``mesh['axis_0'=4,'axis_1'=2],
  device_ids=([2,4]T(1,0)) {'axis_0'}`` (the devices laid out on the compiler's own mesh,
  one group per position of the unnamed axes); None for any other form (or none).
  """
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*(?:,\s*device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\)\s*)?\{([^}]*)\}", line)
  if m:
    named = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in named], [int(n) for _, n in named]
    n = math.prod(sizes)
    if m.group(2):
      dims = [int(x) for x in m.group(2).split(",")]
      if math.prod(dims) != n:
        return None
      ids = np.arange(n, dtype=np.int64).reshape(dims)
      if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
      ids = ids.reshape(sizes)
    else:
      ids = np.arange(n, dtype=np.int64).reshape(sizes)
    over = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4)) if a in names]
    rest = [i for i in range(len(names)) if i not in over]
    size = math.prod(sizes[i] for i in over)
    return ids.transpose(rest + over).reshape(n // max(size, 1), size)
  m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)+)\}", line)
  if m:
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    if groups and all(len(g) == len(groups[0]) for g in groups):
      return np.asarray(groups, dtype=np.int64)
    return None
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    dims = [int(x) for x in m.group(3).split(",")]
    ids = np.arange(math.prod(dims), dtype=np.int64).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2)))
  return None


def group_axes(line: str, mesh_shape: Sequence[int], axis_names: Sequence[str]) -> str:
  """The mesh axes a collective's replica groups run along, e.g. ``"fsdp"`` or
  ``"data+fsdp"``; ``"?"`` where the groups cannot be read or are not a mesh sub-grid.

  Partition ids number the mesh's devices in row-major order, so the axes along which the
  members of a group differ are the axes the collective reduces or gathers over.
  """
  groups = replica_groups(line)
  n = math.prod(mesh_shape)
  if groups is None:
    if "replica_groups={}" in line or "replica_groups" not in line:
      groups = np.arange(n, dtype=np.int64)[None]       # no groups: every device
    else:
      return "?"
  if groups.size != n or groups.max() >= n:
    return "?"
  coords = np.stack(np.unravel_index(groups, tuple(mesh_shape)), axis=-1)  # [G, S, axes]
  varying = [a for i, a in enumerate(axis_names) if np.any(coords[..., i] != coords[:, :1, i])]
  size = math.prod(mesh_shape[axis_names.index(a)] for a in varying)
  if size != groups.shape[1]:
    return "?"
  return "+".join(varying) if varying else "-"


def parse_collectives(hlo: str, num_devices: int, mesh_shape: Optional[Sequence[int]] = None,
                      axis_names: Sequence[str] = shd.MESH_AXES) -> Dict[str, Any]:
  """Collectives of an optimised HLO module, weighted by how often each computation runs.

  A computation's multiplicity is the product of the trip counts of the while loops that
  call it (``known_trip_count`` in the backend config, else the constant the loop
  condition compares against); async ``-start``/``-done`` pairs count once.  With
  ``mesh_shape``, each kind also gets ``by_axes``: ops and bytes per set of mesh axes
  its replica groups span (``group_axes``).
  """
  comps: Dict[str, List[str]] = {}
  cur = None
  for line in hlo.splitlines():
    if line.rstrip().endswith("{") and ("(" in line or line.lstrip().startswith("ENTRY")):
      m = _COMP_RE.match(line)
      if m:
        cur = m.group(1)
        comps[cur] = []
        if line.lstrip().startswith("ENTRY"):
          comps["__entry__"] = [cur]
        continue
    if cur is not None:
      if line.strip() == "}":
        cur = None
      else:
        comps[cur].append(line)
  entry = comps.pop("__entry__", [None])[0]

  def trip_count(line: str, cond: str) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if m:
      return int(m.group(1))
    consts = [int(c) for l in comps.get(cond, []) for c in re.findall(r"constant\((\d+)\)", l)]
    return max(consts) if consts else 1

  mult: Dict[str, int] = {}

  def visit(name: str, factor: int):
    if name not in comps:
      return
    mult[name] = mult.get(name, 0) + factor
    for line in comps[name]:
      if " while(" in line:
        body = re.search(r"body=%?([\w.\-]+)", line)
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        n = trip_count(line, cond.group(1) if cond else "")
        if body:
          visit(body.group(1), factor * n)
      for callee in re.findall(r"(?:calls|to_apply|branch_computations=\{)[=]?%?([\w.\-]+)", line):
        if callee in comps and " while(" not in line and not any(
            f" {k}" in line for k in COLLECTIVES):
          visit(callee, factor)

  if entry:
    visit(entry, 1)
  out: Dict[str, Dict[str, float]] = {k: {"ops": 0, "bytes": 0, "link_bytes": 0.0}
                                      for k in COLLECTIVES}
  for name, lines in comps.items():
    f = mult.get(name, 0)
    if not f:
      continue
    for line in lines:
      m = _OP_RE.match(line)
      if not m:
        continue
      op = m.group(2)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in COLLECTIVES or op.endswith("-done"):
        continue
      nbytes = shape_bytes(m.group(1))
      if op.endswith("-start") and m.group(1).startswith("("):
        nbytes //= 2          # async start returns (operand, result): count the result once
      n = _group_size(line, num_devices)
      out[kind]["ops"] += f
      out[kind]["bytes"] += f * nbytes
      out[kind]["link_bytes"] += f * nbytes * ring_factor(kind, n)
      by_group = out[kind].setdefault("bytes_by_group_size", {})
      by_group[n] = by_group.get(n, 0) + f * nbytes
      if mesh_shape is not None:
        axes = ("permute" if kind == "collective-permute"
                else group_axes(line, mesh_shape, tuple(axis_names)))
        slot = out[kind].setdefault("by_axes", {}).setdefault(axes, {"ops": 0, "bytes": 0})
        slot["ops"] += f
        slot["bytes"] += f * nbytes
  return out


def ring_factor(kind: str, n: int) -> float:
  """Per-device link bytes per result byte of a ring collective over n devices."""
  if n <= 1:
    return 0.0
  return {"all-reduce": 2.0 * (n - 1) / n, "all-gather": (n - 1) / n,
          "reduce-scatter": float(n - 1), "all-to-all": (n - 1) / n,
          "collective-permute": 1.0}[kind]


def link_bytes_at_scale(coll: Dict[str, Any], devices: int, chips: int) -> float:
  """Per-chip link bytes when the slice grows from ``devices`` to ``chips`` at a fixed
  per-chip batch: collectives over every device (data/FSDP axes) span all chips, smaller
  groups (the tensor axis) keep their size.  Reduce-scatter results shrink as 1/n, so its
  traffic (n-1)/n x input stays bounded like the others."""
  total = 0.0
  for kind, v in coll.items():
    for n, b in v.get("bytes_by_group_size", {}).items():
      n = int(n)
      if n == devices and chips != devices:
        if kind == "reduce-scatter":
          b = b * n / chips
        total += b * ring_factor(kind, chips)
      else:
        total += b * ring_factor(kind, n)
  return total


def compile_step(config, mesh_shape: Tuple[int, int, int], vocab: int, per_device_batch: int,
                 seq_len: int):
  import jax  # pylint: disable=import-outside-toplevel
  c = config.copy_and_resolve_references()
  c.mesh.shape = tuple(mesh_shape)
  if seq_len:
    c.data.seq_len = seq_len
  n = int(math.prod(mesh_shape))
  c.training.batch_size = per_device_batch * n
  c.training.num_microbatches = 1
  task = build_task(c, vocab)
  mesh = shd.make_mesh(c.mesh)
  rules = shd.logical_rules(c.mesh)
  tx, _ = make_optimizer(c.training)
  abstract, shardings = state_shardings(task, tx, mesh, rules)
  step = make_train_step(task, tx, c, mesh, rules, shardings)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  batch = {"tokens": jax.ShapeDtypeStruct((c.training.batch_size, int(c.data.seq_len)),
                                          jax.numpy.int32, sharding=shd.batch_sharding(mesh))}
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  return compiled, time.time() - t0, task, c


def project(flops_per_step_per_chip: float, link_bytes: float, peak_tflops: float,
            ici_gbps: float, mfu: float) -> Dict[str, float]:
  compute = flops_per_step_per_chip / (peak_tflops * 1e12 * mfu)
  comm = link_bytes / (ici_gbps * 1e9 / 8)
  return {"compute_s": compute, "comm_s": comm, "step_s_no_overlap": compute + comm,
          "step_s_full_overlap": max(compute, comm)}


def run(config, meshes, vocab, per_device_batch, seq_len, peak, ici, mfu, chips) -> Dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  results = []
  for shape in meshes:
    n = int(math.prod(shape))
    if n > jax.device_count():
      raise ValueError(f"Mesh {shape} needs {n} devices; this process has {jax.device_count()} "
                       "(set XLA_FLAGS=--xla_force_host_platform_device_count=N).")
    compiled, compile_s, task, c = compile_step(config, shape, vocab, per_device_batch, seq_len)
    coll = parse_collectives(compiled.as_text(), n)
    L = int(c.data.seq_len)
    fpt = model_flops_per_token(c.model, vocab, L)
    tokens_per_chip = per_device_batch * L
    link = sum(v["link_bytes"] for v in coll.values())
    row = {"mesh": list(shape), "devices": n, "compile_s": compile_s,
           "tokens_per_device": tokens_per_chip, "flops_per_token": fpt,
           "collectives": coll, "link_bytes_per_device": link,
           "projection_tpu_v5p": {}}
    for k in chips:
      row["projection_tpu_v5p"][str(k)] = project(
          fpt * tokens_per_chip, link_bytes_at_scale(coll, n, int(k)), peak, ici, mfu)
    results.append(row)
    print(f"mesh {shape}: compiled in {compile_s:.1f} s; per-device link traffic "
          f"{link / 2**20:.1f} MiB/step", flush=True)
  return {"config_model": dict(config.model), "vocab_size": vocab,
          "per_device_batch": per_device_batch,
          "assumptions": {"peak_tflops_bf16": peak, "ici_gbit_s": ici, "mfu": mfu,
                          "ring_factors": "all-reduce 2(n-1)/n B, all-gather (n-1)/n B, "
                          "reduce-scatter (n-1) B (B = result), collective-permute B"},
          "results": results}


def table(res: Dict[str, Any]) -> str:
  lines = ["| mesh (data,fsdp,tensor) | all-reduce MiB | all-gather MiB | reduce-scatter MiB | "
           "other MiB | link MiB/device/step | projected v5p step s (no overlap / overlap) |",
           "|---|---:|---:|---:|---:|---:|---|"]
  for r in res["results"]:
    c = r["collectives"]
    other = c["all-to-all"]["bytes"] + c["collective-permute"]["bytes"]
    proj = "; ".join(f"{k} chips {p['step_s_no_overlap']:.3f} / {p['step_s_full_overlap']:.3f}"
                     for k, p in r["projection_tpu_v5p"].items())
    lines.append(
        f"| {tuple(r['mesh'])} | {c['all-reduce']['bytes'] / 2**20:.1f} | "
        f"{c['all-gather']['bytes'] / 2**20:.1f} | {c['reduce-scatter']['bytes'] / 2**20:.1f} | "
        f"{other / 2**20:.1f} | {r['link_bytes_per_device'] / 2**20:.1f} | {proj} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. owt_prime).")
  try:
    meshes = [tuple(int(x) for x in m.split(",")) for m in _MESHES.value.split(":")]
  except ValueError:
    raise app.UsageError(f"--meshes={_MESHES.value!r}: use e.g. 8,1,1:1,8,1")
  if any(len(m) != 3 for m in meshes):
    raise app.UsageError("Each mesh needs three sizes (data, fsdp, tensor).")
  res = run(_CONFIG.value, meshes, _VOCAB.value, _PER_DEVICE_BATCH.value, _SEQ_LEN.value,
            _PEAK.value, _ICI.value, _MFU.value, [int(c) for c in _CHIPS.value])
  print(table(res))
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.benchmarks.collectives --config=NAME [--config.KEY=VALUE ...]"))
