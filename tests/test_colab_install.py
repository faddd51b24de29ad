"""launch/colab_install.py keeps a notebook runtime's jax: a real pip install of mdm_jax
into a new virtual environment whose jax (this interpreter's, made visible through a .pth
file as a runtime's preinstalled packages are) must come out unchanged."""

import glob
import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  spec = importlib.util.spec_from_file_location(
      "colab_install", os.path.join(REPO, "launch", "colab_install.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_plan_pins_the_runtime_jax_and_its_plugin():
  ci = _module()
  runtime = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda12-plugin": "0.11.2",
             "jax-cuda12-pjrt": "0.11.2"}
  p = ci.plan("/repo", runtime, python="python")
  assert p["pins"] == runtime and p["warning"] is None
  assert p["cmd"] == ["python", "-m", "pip", "install", "-q", "-e", "/repo"]


def test_an_old_runtime_jax_is_reported_not_replaced(capsys, monkeypatch):
  ci = _module()
  monkeypatch.setattr(ci, "installed_jax", lambda: {"jax": "0.7.2", "jaxlib": "0.7.2",
                                                   "jax-cuda12-plugin": "0.7.2"})
  monkeypatch.setattr(ci.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
  assert ci.run("/repo") == 3
  err = capsys.readouterr().err
  assert "jax 0.7.2" in err and 'pip install -U "jax[cuda12]"' in err and "restart" in err


def test_install_into_a_runtime_keeps_its_jax(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  venv = tmp_path / "runtime"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  site = glob.glob(str(venv / "lib" / "python*" / "site-packages"))[0]
  # The "runtime's" preinstalled packages: this environment's, pip included.
  with open(os.path.join(site, "runtime.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  py = str(venv / "bin" / "python")
  env = dict(os.environ, PIP_NO_BUILD_ISOLATION="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
  env.pop("PYTHONPATH", None)
  proc = subprocess.run([py, os.path.join(REPO, "launch", "colab_install.py"), REPO],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f"Keeping this runtime's jax {jax.__version__}" in proc.stdout
  out = subprocess.run([py, "-c", "import jax, mdm_jax, importlib.metadata as m; "
                        "print(jax.__version__, jax.__file__, m.version('mdm_jax'))"],
                       capture_output=True, text=True, env=env, check=True).stdout.split()
  assert out[0] == jax.__version__ and out[1] == jax.__file__   # the runtime's own jax
  assert glob.glob(os.path.join(site, "*mdm_jax*"))               # mdm_jax went into the venv
