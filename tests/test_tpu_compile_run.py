"""The measured mode of mdm_jax/benchmarks/tpu_compile.py (``--run``) on the CPU: fields,
finite positive numbers and the time budget.  Timings are never asserted."""

import json
import math
import os
import subprocess
import sys

import pytest

from mdm_jax.benchmarks import tpu_compile as tc
from mdm_jax.configs.shakespeare_prime import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_FIELDS = ("program", "per_chip_batch", "global_batch", "mesh", "compile_s", "steps",
               "step_ms", "step_ms_min", "tokens_per_step", "tokens_per_s",
               "model_flops_per_device", "model_tflops_per_s_per_device", "mfu",
               "peak_bytes_in_use", "host_max_rss_gib")
SAMPLE_FIELDS = ("program", "sampler", "T", "nfe", "compile_s", "wall_s", "ms_per_nfe",
                 "tokens", "tokens_per_s", "model_flops_per_device", "mfu",
                 "peak_bytes_in_use", "host_max_rss_gib")


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cli_run_on_cpu(tmp_path):
  """``--run`` on the tiny config over the test set-up's 8 CPU devices: train and eval
  steps timed, the sampler at two T, run.json and run.md written, the table on stdout."""
  out = tmp_path / "rep"
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("JAX_PLATFORMS", None)
  p = subprocess.run(
      [sys.executable, "-m", "mdm_jax.benchmarks.tpu_compile", "--config=shakespeare_prime:tiny",
       "--vocab_size=64", "--per_chip_batch=2", "--run", "--steps=2", "--warmup=1",
       "--sample_steps=2,3", "--ceiling_size=64", f"--output_dir={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads((out / "run.json").read_text())
  assert (out / "run.md").read_text().strip() == p.stdout.strip()
  assert not (out / "report.json").exists()
  for key in ("mode", "date", "jax", "platform", "device_kind", "devices", "ceiling", "model",
              "seq_len", "time_budget_s", "elapsed_s", "notes", "rows"):
    assert key in res, key
  assert res["mode"] == "run" and res["platform"] == "cpu" and res["notes"] == []
  assert res["ceiling"]["dtype"] == "bfloat16" and res["ceiling"]["n"] == 64
  assert _positive(res["ceiling"]["tflops"])
  rows = {(r["program"], r.get("T")): r for r in res["rows"]}
  assert set(rows) == {("train", None), ("eval", None), ("sample", 2), ("sample", 3)}
  for (name, t), r in rows.items():
    for key in STEP_FIELDS if name != "sample" else SAMPLE_FIELDS:
      assert key in r, (name, key)
    assert r["per_chip_batch"] == 2 and r["global_batch"] == 2 * res["devices"]
    for key in ("compile_s", "tokens_per_s", "model_flops_per_device", "mfu",
                "host_max_rss_gib"):
      assert _positive(r[key]), (name, key, r[key])
    assert r["peak_bytes_in_use"] is None or r["peak_bytes_in_use"] > 0   # CPU: not reported
    if name == "sample":
      assert r["sampler"] == "ancestral" and 1 <= r["nfe"] <= t + 1   # + the final denoise
      assert _positive(r["wall_s"]) and _positive(r["ms_per_nfe"])
    else:
      assert r["steps"] == 2 and r["tokens_per_step"] == r["global_batch"] * 64
      assert _positive(r["step_ms"]) and 0 < r["step_ms_min"] <= r["step_ms"]
  assert "| train | 2 |" in p.stdout and "| eval | 2 |" in p.stdout
  assert "| ancestral | 2 | 3 |" in p.stdout and "n/a" in p.stdout


def test_spent_time_budget_skips_with_notes():
  """A spent budget runs nothing and names each program (and each T) it skipped."""
  res = tc.run_attached(get_config("tiny"), per_chip_batch=2, vocab=64, sample_steps=(2, 3),
                        ceiling_size=32, time_budget_s=0.0)
  assert res["rows"] == []
  assert len(res["notes"]) == 4
  for what, note in zip(("train", "eval", "sampling at T = 2", "sampling at T = 3"),
                        res["notes"]):
    assert note.startswith(f"{what} skipped: the time budget of 0 s")
  md = tc.run_table(res)
  assert "- train skipped" in md and "| program |" not in md


def test_bad_run_arguments_are_report_errors():
  with pytest.raises(tc.ReportError, match="unknown"):
    tc.run_attached(get_config("tiny"), programs=("train", "decode"))
  with pytest.raises(tc.ReportError, match="at least 1"):
    tc.run_attached(get_config("tiny"), sample_steps=(0,))
