"""launch/gpu_wheels.py without the network: the plan, the commands for the machine, and
the folder check (missing, duplicated and unmet wheels, the size limit)."""

import importlib.util
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "gpu_wheels.py")


def _module():
  spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _wheel(folder, name, version, requires=(), size=0):
  """A stand-in wheel: METADATA with ``requires`` and ``size`` bytes of padding."""
  dist = name.replace("-", "_")
  path = os.path.join(folder, f"{dist}-{version}-py3-none-any.whl")
  meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{dist}-{version}.dist-info/METADATA",
               f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    if size:
      z.writestr("pad.bin", os.urandom(size))
  return path


def test_plan_prints_the_downloads_and_the_machine_commands(tmp_path):
  folder = tmp_path / "w"
  p = subprocess.run([sys.executable, SCRIPT, "--plan", f"--dir={folder}"],
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  assert not folder.exists()                                    # nothing written
  out = p.stdout
  for name in ("ml-collections==", "grain==", "array-record==", "tensorflow-datasets==",
               "tensorboardX=="):
    assert name in out, name
  assert "--only-binary=:all: --python-version 3.12 --implementation cp" in out
  assert "--platform manylinux_2_28_x86_64" in out and "pip wheel --quiet --no-deps" in out
  assert ("pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
          "--target /tmp/site") in out and "export PYTHONPATH=/tmp/site" in out
  assert "python3 -m mdm_jax.benchmarks.tpu_compile --config=owt_mdm --run" in out


def test_the_plan_names_each_distribution_once():
  gw = _module()
  names = [gw.canonical(n) for n, _, _ in gw.WHEELS]
  assert len(names) == len(set(names))
  assert gw.SOURCE_ONLY <= set(names)
  assert not set(names) & gw.ON_THE_MACHINE


def test_folder_check(tmp_path, monkeypatch):
  gw = _module()
  monkeypatch.setattr(gw, "WHEELS", (("alpha", "1.0", ""), ("beta-pkg", "2.0", ""),
                                     ("gamma", "3.0", "")))
  folder = str(tmp_path)
  _wheel(folder, "alpha", "1.0", ["beta_pkg>=1", "numpy", "delta; python_version < '3.9'",
                                  "epsilon; extra == 'test'"])
  _wheel(folder, "beta-pkg", "2.0", ["zeta"], size=200_000)
  problems, mib = gw.check(folder, limit_mib=64)
  assert problems == ["gamma: no wheel in " + folder,
                      "beta-pkg requires zeta, neither carried nor on the machine"]
  assert 0.15 < mib < 0.3
  _wheel(folder, "gamma", "3.0")
  _wheel(folder, "gamma", "3.1")
  problems, _ = gw.check(folder, limit_mib=0.1)
  assert any(p.startswith("two versions of gamma") for p in problems)
  assert any("over the 0.1 MiB that travel" in p for p in problems)
  assert not any("no wheel" in p for p in problems)
