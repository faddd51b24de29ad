"""Wheels for a GPU machine with no network that has Python 3.12 and a CUDA jax, flax and
optax but not mdm_jax's data and config packages.

Such a machine (a CUDA image with jax, flax, optax, orbax, chex, absl, numpy, tokenizers,
tiktoken, matplotlib, safetensors, etils, pyarrow and requests) lacks what mdm_jax imports
at its top level for configs (``ml_collections``) and data (``grain``, which needs
``array_record`` and ``portpicker``), what it imports for TFDS datasets
(``tensorflow_datasets`` and its own needs) and the TensorBoard writer (``tensorboardX``).
This script downloads those wheels here, for CPython 3.12 on manylinux x86-64, into an
ignored folder, checks that every requirement of every wheel is either in the folder or
on the machine already (``ON_THE_MACHINE``), that the folder stays under the size that
travels with a run (64 MiB by default), and prints the commands to run there.

  python launch/gpu_wheels.py              # downloads into .whl/, checks, prints the commands
  python launch/gpu_wheels.py --plan       # what it would fetch and the commands; no network
  python launch/gpu_wheels.py --dir=DIR --limit_mib=64

Versions are the ones this project is tested with.  Pure-Python packages published only as
source (``promise``) are built into wheels here.  Standard library only (pip does the work).
"""

from __future__ import annotations

import argparse
import email.parser
import glob
import os
import re
import shlex
import subprocess
import sys
import zipfile
from typing import Dict, Iterable, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (distribution, version, why): what the machine lacks.
WHEELS: Tuple[Tuple[str, str, str], ...] = (
    ("ml-collections", "1.1.0", "configs (every command line)"),
    ("grain", "0.2.18", "data pipeline and checkpointed iterators (imported at the top)"),
    ("array-record", "0.8.6", "grain's and --mode=prepare's record files"),
    ("portpicker", "1.6.0", "grain"),
    ("tensorboardX", "2.6.5", "the TensorBoard writer"),
    ("tensorflow-datasets", "4.9.10", "TFDS datasets (lm1b, images)"),
    ("importlib-resources", "7.1.0", "tensorflow-datasets, etils[epath]"),
    ("dm-tree", "0.1.10", "tensorflow-datasets"),
    ("immutabledict", "4.3.1", "tensorflow-datasets"),
    ("promise", "2.3", "tensorflow-datasets"),
    ("simple-parsing", "0.1.9", "tensorflow-datasets"),
    ("docstring-parser", "0.18.0", "simple-parsing"),
    ("tensorflow-metadata", "1.21.0", "tensorflow-datasets"),
    ("googleapis-common-protos", "1.76.0", "tensorflow-metadata"),
    ("protobuf", "7.36.2", "the protobuf runtime the generated modules above were tested with"),
    ("termcolor", "3.3.0", "tensorflow-datasets"),
    ("toml", "0.10.2", "tensorflow-datasets"),
)
# Published as source only: built here into a py3-none-any wheel.
SOURCE_ONLY = {"promise"}

# Distributions the machine already holds (those the wheels above require).
ON_THE_MACHINE = frozenset((
    "absl-py", "attrs", "cloudpickle", "etils", "fsspec", "numpy", "packaging", "psutil",
    "pyarrow", "pyyaml", "requests", "six", "tqdm", "typing-extensions", "wrapt", "zipp",
))

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
PYTHON = "3.12"
# The environment the wheels' requirement markers are read in (the machine's).
MARKERS = {"python_version": PYTHON, "python_full_version": PYTHON + ".3",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}

BENCH = ("python3 -m mdm_jax.benchmarks.tpu_compile --config=owt_mdm --run --per_chip_batch=16 "
         "--output_dir=$OUT/owt_mdm")


def canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def pip_commands(folder: str, python: str = sys.executable) -> List[List[str]]:
  """The pip calls that fill ``folder``: one download of every binary wheel, one build per
  source-only package."""
  platforms = [a for p in PLATFORMS for a in ("--platform", p)]
  binary = [f"{n}=={v}" for n, v, _ in WHEELS if n not in SOURCE_ONLY]
  cmds = [[python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp", *platforms, "-d", folder,
           *binary]]
  for n, v, _ in WHEELS:
    if n in SOURCE_ONLY:
      cmds.append([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", folder,
                   f"{n}=={v}"])
  return cmds


def device_commands(folder: str) -> List[str]:
  """What to run on the machine, from the repository's root, with ``folder`` carried."""
  rel = os.path.relpath(folder, ROOT)
  return [
      f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
      f"--target /tmp/site {rel}/*.whl && export PYTHONPATH=/tmp/site || exit",
      "[ -e mdm_jax/configs ] || ln -s ../configs mdm_jax/configs   # the packaged configs",
      BENCH,
  ]


def _marker_holds(marker: str) -> bool:
  """A requirement marker evaluated for the machine (``MARKERS``); unknown forms hold."""
  try:
    from pip._vendor.packaging.markers import Marker  # pylint: disable=import-outside-toplevel
  except ImportError:
    return True
  return Marker(marker).evaluate(MARKERS)


def requirements(wheel: str) -> List[str]:
  """The distributions ``wheel`` requires on the machine (no extras, markers evaluated)."""
  with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
  out = []
  for req in msg.get_all("Requires-Dist") or []:
    spec, _, marker = req.partition(";")
    if marker.strip() and ("extra" in marker or not _marker_holds(marker.strip())):
      continue
    out.append(canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1)))
  return out


def wheel_name(path: str) -> str:
  return canonical(os.path.basename(path).split("-")[0])


def check(folder: str, limit_mib: float) -> Tuple[List[str], float]:
  """Problems with the folder's wheels (missing, duplicated, unmet needs, size) and its size
  in MiB."""
  wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
  problems = []
  have: Dict[str, List[str]] = {}
  for w in wheels:
    have.setdefault(wheel_name(w), []).append(os.path.basename(w))
  for name, files in have.items():
    if len(files) > 1:
      problems.append(f"two versions of {name}: {', '.join(files)} (the install stops on that)")
  wanted = {canonical(n) for n, _, _ in WHEELS}
  for name in sorted(wanted - set(have)):
    problems.append(f"{name}: no wheel in {folder}")
  for extra in sorted(set(have) - wanted):
    problems.append(f"{extra}: a wheel the plan does not name ({', '.join(have[extra])})")
  for w in wheels:
    for need in requirements(w):
      if need not in have and need not in ON_THE_MACHINE:
        problems.append(f"{wheel_name(w)} requires {need}, neither carried nor on the machine")
  mib = sum(os.path.getsize(w) for w in wheels) / 2 ** 20
  if mib > limit_mib:
    problems.append(f"the wheels take {mib:.1f} MiB, over the {limit_mib:g} MiB that travel")
  return problems, mib


def _print_plan(folder: str, cmds: Iterable[Sequence[str]]) -> None:
  print(f"wheels for CPython {PYTHON}, manylinux x86-64, into {folder}:")
  for n, v, why in WHEELS:
    print(f"  {n + '==' + v:<34} {why}"
          + ("  (built here from source)" if n in SOURCE_ONLY else ""))
  print("pip:")
  for c in cmds:
    print("  " + " ".join(shlex.quote(a) for a in c))


def main(argv: Sequence[str] = ()) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dir", default=os.path.join(ROOT, ".whl"),
                 help="where the wheels go (default: .whl/ at the repository root, ignored)")
  p.add_argument("--limit_mib", type=float, default=64.0,
                 help="the most the folder may take (default 64)")
  p.add_argument("--plan", action="store_true",
                 help="print the plan and the commands only: no network, nothing written")
  args = p.parse_args(list(argv))
  folder = os.path.abspath(args.dir)
  cmds = pip_commands(folder)
  _print_plan(folder, cmds)
  if not args.plan:
    os.makedirs(folder, exist_ok=True)
    for c in cmds:
      r = subprocess.run(c, check=False)
      if r.returncode:
        print(f"error: pip failed ({r.returncode}): {' '.join(c[:4])} ...", file=sys.stderr)
        return 1
    problems, mib = check(folder, args.limit_mib)
    print(f"{len(glob.glob(os.path.join(folder, '*.whl')))} wheels, {mib:.1f} MiB "
          f"(limit {args.limit_mib:g} MiB)")
    if problems:
      for pr in problems:
        print(f"error: {pr}", file=sys.stderr)
      return 1
  print("on the machine, from the repository root, with the folder carried:")
  for line in device_commands(folder):
    print("  " + line)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
