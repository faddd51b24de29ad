"""Runs every notebook in colabs/ top to bottom at tiny sizes (MDM_JAX_NOTEBOOK_TINY=1).

Each notebook is executed with nbclient in a fresh temporary working directory by a
'python3' ipykernel of this interpreter (checked inside the kernel); any cell error
fails the test, and the files each notebook promises (samples, PNGs) must exist.

Compiling dominates these tiny CPU runs, so the notebooks run in two concurrent lanes
(01 then 02, which trains the same tiny model and reuses 01's compiled programs from a
shared JAX compilation cache; 03 beside them).  The checks are one test per notebook.
"""

import asyncio
import dataclasses
import glob
import json
import os
import resource
import re
import sys
import time
from typing import Any, Dict, Optional

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient)")
pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (ipykernel)")

from mdm_jax.data.images import read_png  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
CELL_TIMEOUT_S = 300

# Files each notebook writes (relative to its working directory), as globs -> minimum count.
EXPECTED = {
    "01_quickstart.ipynb": {
        "runs/01_quickstart/samples/step_*.txt": 1,
        "runs/01_quickstart/final_metrics.json": 1,
        "runs/01_quickstart/masking/step_*.png": 17,     # T = 16 steps + final noise removal
        "runs/01_quickstart/masking/timeline.png": 1,
    },
    "02_schedules_and_samplers.ipynb": {
        "runs/02_schedules_and_samplers/schedules.json": 1,
        "runs/02_schedules_and_samplers/sampler_rows.json": 1,
    },
    "03_images.ipynb": {
        "runs/03_images/samples/step_*.png": 1,
        "runs/03_images/real_images.png": 1,
        "runs/03_images/pixels_as_digits.png": 1,
        "runs/03_images/masking/state_*.png": 2,
        "runs/03_images/masking/steps.png": 1,
    },
}
LANES = (("01_quickstart.ipynb", "02_schedules_and_samplers.ipynb"), ("03_images.ipynb",))

# Appended to each notebook: the kernel's interpreter and the size it ran at.
_PROBE = """
import json as _json, sys as _sys
print("PROBE " + _json.dumps({"prefix": _sys.prefix, "executable": _sys.executable,
                              "tiny": TINY}))
"""


@dataclasses.dataclass
class Run:
  nb: Any
  workdir: str
  error: Optional[BaseException]
  wall_s: float


def _kernel_env(cache_dir: str) -> Dict[str, str]:
  return {
      "MDM_JAX_NOTEBOOK_TINY": "1",
      "MDM_JAX_REPO": REPO,
      "JAX_PLATFORMS": "cpu",
      # One CPU device, as for a user (not the 8 simulated ones of conftest.py), and
      # settings that only make XLA compile faster on CPU, where compiling dominates these
      # tiny runs: lighter LLVM optimisation and RBG PRNG keys (threefry compiles slower).
      "XLA_FLAGS": "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true",
      "JAX_DEFAULT_PRNG_IMPL": "rbg",
      "JAX_COMPILATION_CACHE_DIR": cache_dir,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
  }


async def _run_all(root: str) -> Dict[str, Run]:
  runs: Dict[str, Run] = {}

  async def one(name):
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    workdir = os.path.join(root, os.path.splitext(name)[0])
    os.makedirs(workdir)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": workdir}})
    t0, error = time.time(), None
    try:
      await client.async_execute()
    except Exception as e:  # pylint: disable=broad-except  (reported by that notebook's test)
      error = e
    runs[name] = Run(nb, workdir, error, time.time() - t0)

  async def lane(names):
    for name in names:
      await one(name)

  await asyncio.gather(*(lane(names) for names in LANES))
  return runs


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """Executes every notebook once (concurrent lanes); {name: Run}."""
  root = str(tmp_path_factory.mktemp("colabs"))
  cache = os.path.join(root, "jax_compile_cache")
  ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  with pytest.MonkeyPatch.context() as mp:
    for k, v in _kernel_env(cache).items():
      mp.setenv(k, v)
    mp.delenv("MPLBACKEND", raising=False)     # ipykernel's inline backend: figures as PNG
    runs = asyncio.run(_run_all(root))
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (ru.ru_utime + ru.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
  print(f"\nnotebooks: {time.time() - t0:.1f} s wall, {cpu:.1f} s kernel CPU; "
        + ", ".join(f"{n} {r.wall_s:.1f} s" for n, r in runs.items()))
  return runs


def test_every_notebook_is_tested():
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, "*.ipynb")))
  assert found == sorted(EXPECTED), f"colabs/ has {found}; add the new ones to EXPECTED."
  assert sorted(n for lane in LANES for n in lane) == sorted(EXPECTED)


def test_notebooks_are_stored_without_outputs():
  for name in EXPECTED:
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{name}: cells {dirty} have outputs; clear them before committing."
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "pip" in first_code.source and "find_repo" in first_code.source, (
        f"{name}: the first code cell must be the install cell.")
    assert sum("MDM_JAX_NOTEBOOK_TINY" in c.source for c in nb.cells
               if c.cell_type == "code") == 1, (
        f"{name}: exactly one parameter cell reads MDM_JAX_NOTEBOOK_TINY.")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, executed):
  run = executed[name]
  if run.error is not None:
    pytest.fail(f"{name}: a cell failed:\n{str(run.error)[-3000:]}")
  nb = run.nb
  # The kernel was this interpreter (the venv's python), and it ran the tiny sizes.
  probe = [o for o in nb.cells[-1].outputs if o.get("name") == "stdout"]
  assert probe, f"{name}: the probe cell printed nothing"
  info = json.loads(probe[0]["text"].split("PROBE ", 1)[1])
  assert os.path.realpath(info["prefix"]) == os.path.realpath(sys.prefix), info
  assert info["tiny"] is True
  # Every cell ran, without an error output.
  for i, c in enumerate(nb.cells):
    if c.cell_type == "code":
      assert c.execution_count is not None, f"{name}: cell {i} did not run"
      assert not [o for o in c.outputs if o.output_type == "error"], f"{name}: cell {i}"
  # The promised files exist, and the PNGs are readable pictures.
  for pattern, n in EXPECTED[name].items():
    hits = glob.glob(os.path.join(run.workdir, pattern))
    assert len(hits) >= n, f"{name}: expected >= {n} files {pattern}, found {len(hits)}"
    for path in hits:
      assert os.path.getsize(path) > 0, path
      if path.endswith(".png"):
        img = read_png(path)
        assert img.ndim == 3 and img.shape[0] > 1 and img.shape[1] > 1, path
  # At least one picture was displayed inline.
  assert any(o.get("data", {}).get("image/png") for c in nb.cells if c.cell_type == "code"
             for o in c.outputs), f"{name}: no picture was displayed"
  # The first code cell names the accelerator, and warns loudly on a CPU.
  first = next(c for c in nb.cells if c.cell_type == "code")
  text = "".join(o.get("text", "") for o in first.outputs if o.get("name") == "stdout")
  assert re.search(r"jax \S+ on \d+ x .*\(cpu\)", text), text[-500:]
  assert "WARNING: NO ACCELERATOR" in text


def test_every_notebook_states_its_run_time():
  for name in EXPECTED:
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    intro = nb.cells[0].source
    assert re.search(r"Run time:.*(measured|not measured)", intro, re.S), name
