"""Kill -9 a training run after a checkpoint, restart it, and compare every step's loss
with an uninterrupted run: resuming must be exact (state, PRNG key and data position)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/shakespeare_prime.py:tiny", "--config.model.d_model=128",
        "--config.data.seq_len=128", "--config.training.batch_size=16",
        "--config.training.num_steps=24", "--config.training.log_every=1",
        "--config.checkpoint.every_steps=5", "--config.eval.every_steps=0",
        "--config.sampling.num_steps=4"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "mdm_jax.main", *ARGS, *extra, f"--workdir={workdir}"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    if "train/loss" in rec:
      out.setdefault(rec["step"], []).append(rec["train/loss"])
  return out


def test_sigkill_and_resume_is_exact(tmp_path):
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  # The reference saves only at the end: how often a run checkpoints cannot change its losses.
  subprocess.run(_cmd(ref_dir, "--config.checkpoint.every_steps=24"), cwd=ROOT, env=_env(),
                 check=True, capture_output=True, timeout=600)
  ref = _losses(ref_dir)
  assert sorted(ref) == list(range(1, 25))

  proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt10 = os.path.join(run_dir, "checkpoints", "10")
  metrics = os.path.join(run_dir, "metrics.jsonl")

  def past_checkpoint():   # checkpoint 10 is final and steps after it have run
    if not (os.path.isdir(ckpt10) and os.path.exists(metrics)):
      return False
    return any(json.loads(l).get("step", 0) >= 12 for l in open(metrics) if l.strip())
  deadline = time.time() + 300
  while not past_checkpoint() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = _losses(run_dir)
  assert 24 not in first                       # really interrupted
  killed_at = max(first)
  assert killed_at >= 12

  subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=600)
  got = _losses(run_dir)
  assert sorted(got) == list(range(1, 25))
  steps_rerun = [s for s, v in got.items() if len(v) > 1]
  assert steps_rerun                           # steps after the checkpoint ran twice
  for step, values in got.items():
    for v in values:                           # both attempts' values match the reference
      np.testing.assert_allclose(v, ref[step][0], rtol=1e-6, err_msg=f"step {step}")
  print(f"killed after step {killed_at}; re-run steps {steps_rerun[:3]}...; "
        "losses identical at every step")
  print("step | uninterrupted | killed run (each attempt)")
  for step in sorted(ref):
    print(f"{step:4d} | {ref[step][0]:.7f} | " + ", ".join(f"{v:.7f}" for v in got[step]))
