"""Compiled for TPU, not run: one table over configs x TPU slices (``tpu_compile`` per cell).

Each cell compiles the configured programs (the train step by default) of one config for
one slice at one per-chip batch with ``tpu_compile.analyse`` and keeps its per-chip HBM,
whether it fits, the roofline bound and MFU ceiling, and the compile time.  Results are
appended to ``cells.jsonl`` as they come (a long run that stops keeps what it did; a
re-run skips the cells already there), and ``tables.md`` is rewritten after each cell.

  python -m mdm_jax.benchmarks.tpu_tables --configs=owt_mdm,owt_prime:ell=2,owt_1b \\
      --topologies=v5e:1x1,v5e:16x16,v5p:1x1x1,v5p:8x8x4,v6e:1x1,v6e:16x16 \\
      --per_chip_batch=v5e=32,v5p=128,v6e=64 --output_dir=docs/results/assets/tpu_compile

``--per_chip_batch`` gives the sequences per chip per family (or one number for all).
A cell that the compiler refuses is reported with the memory it needed; a cell whose mesh
or batch cannot be built is reported with its one-line reason.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence

from absl import app, flags

from mdm_jax.benchmarks import tpu_compile
from mdm_jax.core.config import load_config
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.flags import flags_parser

GIB = 2 ** 30


def parse_batches(spec: str) -> Dict[str, int]:
  """``"v5e=32,v5p=128"`` -> per-family batches; ``"16"`` -> the same for every family."""
  spec = spec.strip()
  if spec.isdigit():
    return {family: int(spec) for family in tpu_compile.CHIPS}
  out = {}
  for item in filter(None, spec.split(",")):
    family, _, n = item.partition("=")
    if family not in tpu_compile.CHIPS or not n.strip().isdigit():
      raise ValueError(f"--per_chip_batch item {item!r}: expected FAMILY=N with FAMILY one of "
                       f"{sorted(tpu_compile.CHIPS)}.")
    out[family] = int(n)
  return out


def cell(config_name: str, topology: str, per_chip_batch: int, programs: Sequence[str],
         overrides: Sequence[str] = ()) -> Dict[str, Any]:
  """One compiled cell, as a flat record (or its error)."""
  record: Dict[str, Any] = {"config": config_name, "topology": topology,
                            "per_chip_batch": per_chip_batch, "overrides": list(overrides)}
  t0 = time.time()
  try:
    config = load_config(config_name)
    for item in overrides:
      key, _, value = item.partition("=")
      _set(config, key, value)
    res = tpu_compile.analyse(config, topology, per_chip_batch=per_chip_batch,
                              programs=programs)
  except (tpu_compile.ReportError, ConfigError, ValueError) as e:
    record["error"] = str(e).splitlines()[0]
    return record
  record.update({k: res[k] for k in ("chips", "jax", "libtpu", "ell", "seq_len", "date")})
  record["model"] = res["model"]
  record["rows"] = [{k: r.get(k) for k in ("program", "fits", "compile_s", "memory",
                                           "needed_bytes", "available_bytes", "capacity_bytes",
                                           "roofline", "flops_vs_model", "mesh")}
                    for r in res["rows"]]
  record["seconds"] = time.time() - t0
  return record


def _set(config, dotted: str, value: str) -> None:
  """``--override=model.remat=full``: sets a config key from its string form."""
  import ast  # pylint: disable=import-outside-toplevel
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  config.update_from_flattened_dict({dotted: parsed})


def _row(record: Dict[str, Any]) -> List[str]:
  settings = ", ".join(record.get("overrides") or ()) or "as shipped"
  head = [record["config"], settings, record["topology"], str(record.get("chips", "-")),
          str(record["per_chip_batch"])]
  if "error" in record:
    return head + [f"not built: {record['error']}", "-", "-", "-", "-", "-"]
  r = record["rows"][0]
  if r.get("memory") is None:
    need = r.get("needed_bytes") or 0
    avail = r.get("available_bytes") or 0
    return head + [f"needs {need / GIB:.1f} of {avail / GIB:.2f}", "no", "-", "-", "-",
                   f"{r['compile_s']:.0f}"]
  total = r["memory"]["total"] / GIB
  cap = (r.get("capacity_bytes") or 0) / GIB
  rf = r["roofline"]
  tokens = record["per_chip_batch"] * record["seq_len"] / rf["step_s_lower_bound"]
  mfu = f"{100 * rf['mfu_upper_bound']:.0f}%" if rf.get("mfu_upper_bound") else "-"
  return head + [f"{total:.1f} of {cap:.0f}", "yes" if r["fits"] else "no",
                 f"{1e3 * rf['step_s_lower_bound']:.0f} ({rf['bound_by']})", mfu,
                 f"{tokens:,.0f}", f"{r['compile_s']:.0f}"]


def render(records: Sequence[Dict[str, Any]]) -> str:
  """The markdown table of the cells (train step, per chip)."""
  versions = sorted({(r.get("jax"), r.get("libtpu")) for r in records if r.get("jax")})
  lines = [
      "Compiled for TPU, not run: per chip, " + "; ".join(
          f"jax {j}, libtpu {l}" for j, l in versions) + ". Bound and MFU ceiling are "
      "roofline estimates from the chip's published peaks, not measurements.", "",
      "| config | settings | slice | chips | seq/chip | HBM GiB (need of capacity) | fits | "
      "step bound ms | MFU <= | tokens/s/chip <= | compile s |",
      "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
  lines += ["| " + " | ".join(_row(r)) + " |" for r in records]
  return "\n".join(lines) + "\n"


def _define_flags():
  flags.DEFINE_list("configs", ["owt_mdm", "owt_prime:ell=2"], "Configs (NAME[:ARGS]).")
  flags.DEFINE_list("topologies", ["v5p:2x2x1"], "TPU slices.")
  flags.DEFINE_string("per_chip_batch", "8", "FAMILY=N,... or N: sequences per chip.")
  flags.DEFINE_list("programs", ["train"], "Programs per cell (the table shows the first).")
  flags.DEFINE_multi_string("override", [], "KEY=VALUE applied to every config.")
  flags.DEFINE_string("output_dir", "", "Where cells.jsonl and tables.md go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    batches = parse_batches(f.per_chip_batch)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out = f.output_dir
  done: List[Dict[str, Any]] = []
  path = os.path.join(out, "cells.jsonl") if out else ""
  if path and os.path.exists(path):
    done = [json.loads(l) for l in open(path) if l.strip()]
  have = {(r["config"], r["topology"], r["per_chip_batch"], tuple(r.get("overrides", ())))
          for r in done}
  if out:
    os.makedirs(out, exist_ok=True)
  for name in f.configs:
    for topo in f.topologies:
      family = topo.split(":")[0]
      if family not in batches:
        print(f"error: no --per_chip_batch for {family}", file=sys.stderr)
        sys.exit(2)
      key = (name, topo, batches[family], tuple(f.override))
      if key in have:
        continue
      print(f"compiling {name} for {topo} at {batches[family]} per chip ...", flush=True)
      rec = cell(name, topo, batches[family], f.programs, f.override)
      done.append(rec)
      print("  " + " | ".join(_row(rec)), flush=True)
      if out:
        with open(path, "a") as fh:
          fh.write(json.dumps(rec, default=str) + "\n")
        with open(os.path.join(out, "tables.md"), "w") as fh:
          fh.write(render(done))
  print(render(done))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.benchmarks.tpu_tables --configs=A,B --topologies=v5e:1x1,... "
      "[--per_chip_batch=v5e=32,v5p=128] [--output_dir=DIR]"))
