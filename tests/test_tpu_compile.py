"""Compiling for TPU without one (mdm_jax/benchmarks/tpu_compile.py): memory, FLOPs, fit, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

pytest.importorskip("libtpu", reason="libtpu is not installed (launch/setup_env.sh installs it)")

from mdm_jax.benchmarks import tpu_compile as tc  # noqa: E402
from mdm_jax.configs.shakespeare_prime import get_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "E0000")


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("JAX_PLATFORMS", None)        # the automatic platform choice, as a user gets it
  return env


def test_sharded_matmul_matches_its_closed_form():
  """[M,K] rows over 4 chips times a replicated [K,N], bf16: per-chip arguments, output and
  FLOPs are M/4*K + K*N elements, M/4*N elements and 2*(M/4)*K*N."""
  devices, info = tc.tpu_devices("v5p:2x2x1")
  assert (info["chips"], info["devices"], info["devices_per_chip"]) == (4, 4, 1)
  mesh = Mesh(np.asarray(devices), ("x",))
  m, k, n = 4096, 1024, 512
  a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  r = tc.compile_one(jax.jit(jnp.matmul), (a, b), mesh, tc.CHIPS["v5p"], 1)
  assert r["fits"]
  assert r["memory"]["argument"] == 2 * (m // 4 * k + k * n)
  assert r["memory"]["output"] == 2 * (m // 4 * n)
  assert r["cost"]["flops"] == 2 * (m // 4) * k * n
  bound = tc.roofline(r["cost"]["flops"], 0.0, tc.CHIPS["v5p"], model_flops=2 * (m // 4) * k * n)
  assert bound["step_s_lower_bound"] == pytest.approx(2 * (m // 4) * k * n / 459e12)
  assert bound["mfu_upper_bound"] == pytest.approx(1.0)
  assert all(v["ops"] == 0 for v in r["collectives"].values())   # no communication needed


def test_a_config_too_large_for_the_chip_does_not_fit():
  """512 x 1024-token sequences with a 4096-word head on one v5e chip (16 GiB): refused,
  with the compiler's own numbers."""
  c = get_config("tiny")
  c.data.seq_len = 1024
  res = tc.analyse(c, "v5e:1x1", per_chip_batch=512, vocab=4096, programs=("train",),
                   correct_loops=False)
  row = res["rows"][0]
  assert res["chips"] == 1 and not row["fits"]
  assert row["available_bytes"] == pytest.approx(15.75 * 2 ** 30, rel=0.02)
  assert row["needed_bytes"] > row["available_bytes"]
  md = tc.table(res)
  assert f"needs {row['needed_bytes'] / 2 ** 30:.3g}" in md and "| no |" in md


def test_oom_message_parsing():
  msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
         "memory required for HLO temporaries (23.26G) exceeds available HBM (15.75G).")
  need, avail = tc.parse_hbm_oom(msg)
  assert need == pytest.approx(23.26 * 2 ** 30) and avail == pytest.approx(15.75 * 2 ** 30)
  assert tc.parse_hbm_oom("(1.41T) exceeds available HBM (95.74G)")[0] == pytest.approx(
      1.41 * 2 ** 40)
  assert tc.parse_hbm_oom("some other error") is None


@pytest.mark.parametrize("name, words", [
    ("v9:2x2", "unknown TPU family"), ("v5p:2x2", "3 positive dimensions"),
    ("v5p-8", "FAMILY:AxB"), ("", "FAMILY:AxB")])
def test_bad_topology_names(name, words):
  with pytest.raises(tc.ReportError, match=words):
    tc.parse_topology(name)


def test_a_slice_libtpu_rejects_and_a_mesh_that_does_not_fit_are_one_line_errors():
  with pytest.raises(tc.ReportError, match="cannot describe this slice") as e:
    tc.tpu_devices("v5p:3x3x3")
  assert "\n" not in str(e.value)
  devices, _ = tc.tpu_devices("v5p:2x2x1")
  c = get_config("tiny")
  c.mesh.shape = (2, 4, 1)
  with pytest.raises(tc.ReportError, match="needs 8 devices but 4") as e:
    tc.tpu_mesh(c.mesh, devices)
  assert "\n" not in str(e.value)


def test_one_chip_and_multi_slice_topologies():
  assert tc.tpu_devices("v5e:1x1")[1]["devices"] == 1
  devices, info = tc.tpu_devices("v5e:2x2", num_slices=2)
  assert (info["chips"], len(devices)) == (8, 8)
  c = get_config("tiny")
  c.mesh.shape = (2, -1, 1)
  mesh = tc.tpu_mesh(c.mesh, devices, num_slices=2)
  assert mesh.devices.shape == (2, 4, 1)
  assert {d.slice_index for d in mesh.devices[0].flat} != {d.slice_index for d in mesh.devices[1].flat}


def test_find_max_batch_bisects(monkeypatch):
  """With a compiler that accepts up to 37 sequences per chip, the search lands on 37."""
  calls = []

  def fake(fn, args, mesh, chip, dpc):
    per_chip = args[1]["tokens"].shape[0] // 4
    calls.append(per_chip)
    ok = per_chip <= 37
    return ({"fits": True, "compile_s": 0.0, "memory": {"total": per_chip * 2.0 ** 30}} if ok
            else {"fits": False, "compile_s": 0.0, "needed_bytes": per_chip * 2.0 ** 30})

  monkeypatch.setattr(tc, "compile_one", fake)
  res = tc.find_max_batch(get_config("tiny"), "v5p:2x2x1", vocab=64, limit=4096)
  assert res["max_per_chip_batch"] == 37 and res["step"] == 1
  assert len(calls) <= 14 and 38 in calls


def test_cli_end_to_end(tmp_path):
  """The command line on a tiny config: table on stdout, JSON and markdown written, no libtpu
  noise on stderr (JAX_PLATFORMS unset)."""
  out = tmp_path / "rep"
  p = subprocess.run(
      [sys.executable, "-m", "mdm_jax.benchmarks.tpu_compile", "--config=shakespeare_prime:tiny",
       "--topology=v5p:2x2x1", "--vocab_size=64", "--per_chip_batch=2", f"--output_dir={out}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "| train | 2 |" in p.stdout and "| eval | 2 |" in p.stdout and "| sample | 2 |" in p.stdout
  assert not any(w in p.stderr for w in NOISE), p.stderr[-2000:]
  res = json.loads((out / "report.json").read_text())
  assert (out / "report.md").read_text().strip() == p.stdout.strip()
  for key in ("topology", "chips", "jax", "libtpu", "peak_tflops_per_chip", "rows"):
    assert key in res
  train = res["rows"][0]
  for key in ("fits", "memory", "capacity_bytes", "cost", "flops_per_device", "flops_vs_model",
              "loop_correction", "roofline", "collectives", "compile_s"):
    assert key in train, key
  assert train["fits"] and train["loop_correction"]["flops"] > 0   # scanned layers corrected
  assert 0.8 < train["flops_vs_model"] < 1.6
  assert train["collectives"]["all-reduce"]["ops"] > 0            # data-parallel gradients
  assert set(train["collectives"]["all-reduce"]["by_axes"]) <= {"data", "data+fsdp"}


def test_cli_bad_topology_is_one_line(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "mdm_jax.benchmarks.tpu_compile", "--config=shakespeare_prime:tiny",
       "--topology=v5p:3x3x3"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: --topology='v5p:3x3x3'"), p.stderr
  assert "Traceback" not in p.stderr


def test_no_tpu_chip_means_no_libtpu_probe():
  """With libtpu installed and JAX_PLATFORMS unset, a CPU host starts JAX without libtpu's
  warnings once host_env.skip_absent_tpu has run (every --config command line runs it)."""
  code = ("from mdm_jax.core import host_env; dropped = host_env.skip_absent_tpu(); "
          "import jax; print(dropped, jax.devices()[0].platform)")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert p.stdout.split()[-1] in ("cpu", "gpu", "tpu")
  assert not any(w in p.stderr for w in NOISE), p.stderr
