"""What `pip install .` ships: every package, the configs as mdm_jax.configs, and a default
job that runs by config name from a directory that is not the source tree."""

import glob
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_pyproject_lists_every_package_folder():
  listed = set(_pyproject()["tool"]["setuptools"]["packages"])
  on_disk = {"mdm_jax.configs"}
  for d, _, files in os.walk(os.path.join(REPO, "mdm_jax")):
    if "__init__.py" in files:
      on_disk.add(os.path.relpath(d, REPO).replace(os.sep, "."))
  assert listed == on_disk


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
  """The wheel `pip install .` would install, unpacked into a folder of its own."""
  out = tmp_path_factory.mktemp("wheel")
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       "-w", str(out), REPO], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  wheels = glob.glob(str(out / "mdm_jax-*.whl"))
  assert len(wheels) == 1, wheels
  target = out / "site"
  with zipfile.ZipFile(wheels[0]) as z:
    z.extractall(target)
    names = set(z.namelist())
  return str(target), names


def test_the_wheel_carries_configs_and_data_builders(installed_wheel):
  _, names = installed_wheel
  for path in ("mdm_jax/configs/base.py", "mdm_jax/configs/shakespeare_prime.py",
               "mdm_jax/cli/main.py", "mdm_jax/data/tfds_builders/__init__.py"):
    assert path in names, path
  assert not any(n.startswith(("tests/", "configs/")) for n in names)
  entry = [n for n in names if n.endswith("entry_points.txt")]
  assert entry


def test_the_wheel_declares_its_licence_and_accelerator_extras(installed_wheel):
  target, names = installed_wheel
  meta_path = [n for n in names if n.endswith(".dist-info/METADATA")]
  assert len(meta_path) == 1
  with open(os.path.join(target, meta_path[0])) as f:
    meta = f.read()
  assert "Apache-2.0" in meta and "License :: OSI Approved :: Apache Software License" in meta
  assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), sorted(names)[-10:]
  extras = {l.split(":", 1)[1].strip() for l in meta.splitlines()
            if l.startswith("Provides-Extra:")}
  assert {"gpu", "tpu", "test", "gcs", "wandb"} <= extras, extras
  assert 'jax[cuda12]' in meta and 'jax[tpu]' in meta


def test_default_job_by_name_from_another_directory(installed_wheel, tmp_path):
  target, _ = installed_wheel
  env = dict(os.environ, PYTHONPATH=target, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  where = subprocess.run([sys.executable, "-c", "import mdm_jax, mdm_jax.configs as c; "
                          "print(mdm_jax.__file__); print(c.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert where.returncode == 0, where.stderr[-2000:]
  assert all(line.startswith(target) for line in where.stdout.split()), where.stdout
  cmd = [sys.executable, "-m", "mdm_jax.main", "--config=shakespeare_prime:tiny",
         "--workdir=run", "--config.training.num_steps=2", "--config.eval.num_batches=1",
         "--config.sampling.num_samples=2"]
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert os.path.exists(tmp_path / "run" / "final_metrics.json")
  assert glob.glob(str(tmp_path / "run" / "samples" / "step_2.txt"))
