"""Faults a run meets on spot machines and shared clusters, produced for real: signals sent
to real training processes, checkpoint files truncated, deleted and overwritten, a full
filesystem, two processes on one workdir.  docs/reliability.md is the table of these
tests: fault, what the program does, steps lost.

Each end-to-end test compares per-step losses with an uninterrupted run of the same
configuration where the fault should cost nothing.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 60, 20
ARGS = ["--config=shakespeare_prime:tiny", f"--config.training.num_steps={STEPS}",
        "--config.training.log_every=1", f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.max_to_keep=5", "--config.checkpoint.keep_best=0",
        "--config.eval.every_steps=0", "--config.sampling.num_steps=4"]
PREEMPTED = 75


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "mdm_jax.main", *ARGS, *extra, f"--workdir={workdir}"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _run(workdir, *extra, check=True):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _losses(workdir, include_superseded=False):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    if "train/loss" in rec and (include_superseded or not rec.get("superseded")):
      out.setdefault(rec["step"], []).append(rec["train/loss"])
  return out


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _start_and_wait(workdir, min_step, *extra):
  proc = subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and any(
        json.loads(l).get("step", 0) >= min_step for l in open(metrics) if l.strip()):
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before the fault: " + proc.stderr.read()[-2000:]
  return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: checkpoints at 20, 40, 60 and the loss of every step."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  _run(workdir)
  ref = _losses(workdir)
  assert sorted(ref) == list(range(1, STEPS + 1))
  return workdir, ref


def _assert_same_losses(got, ref):
  assert sorted(got) == sorted(ref)
  for step, values in got.items():
    for v in values:
      np.testing.assert_allclose(v, ref[step][0], rtol=1e-6, err_msg=f"step {step}")


def test_sigterm_saves_the_current_step_and_loses_nothing(reference, tmp_path):
  _, ref = reference
  workdir = str(tmp_path / "run")
  proc = _start_and_wait(workdir, 5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == PREEMPTED, err[-2000:]
  assert "preempted (SIGTERM)" in err and "re-run the same command to resume" in err
  first = _losses(workdir)
  saved = _steps(workdir)[-1]
  assert saved % EVERY != 0 and saved < STEPS       # saved on the signal, not on schedule
  assert saved >= max(first)                        # zero steps lost
  _run(workdir)
  got = _losses(workdir)
  _assert_same_losses(got, ref)
  assert all(len(v) == 1 for v in got.values())     # nothing was trained twice


def test_damaged_newest_checkpoint_falls_back_and_ends_identical(reference, tmp_path):
  ref_dir, ref = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  newest = os.path.join(workdir, "checkpoints", str(STEPS))
  arrays = sorted(glob.glob(os.path.join(newest, "state", "**", "d", "*"), recursive=True),
                  key=os.path.getsize)
  with open(arrays[-1], "r+b") as f:                # truncate the largest array file
    f.truncate(os.path.getsize(arrays[-1]) // 2)
  proc = _run(workdir)
  assert f"checkpoint {STEPS} is damaged" in proc.stderr
  assert f"resuming from checkpoint {2 * EVERY}" in proc.stderr
  aside = os.path.join(workdir, "checkpoints_damaged", str(STEPS))
  assert os.path.isdir(aside) and os.path.exists(aside + ".reason.txt")
  got = _losses(workdir, include_superseded=True)
  _assert_same_losses(got, ref)                     # replayed steps 41..60 equal the first ones
  current = _losses(workdir)
  assert all(len(v) == 1 for v in current.values()) and sorted(current) == sorted(ref)
  superseded = sorted(s for s, v in got.items() if len(v) == 2)
  assert superseded == list(range(2 * EVERY + 1, STEPS + 1))
  assert _steps(workdir)[-1] == STEPS


def test_resume_with_another_sequence_length_is_refused(reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  proc = _run(workdir, "--config.data.seq_len=32", check=False)
  assert proc.returncode == 2
  assert "data.seq_len: checkpoint=64  current=32" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs needs root")
def test_full_disk_is_one_line_before_anything_is_written(tmp_path):
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    proc = _run(str(mnt / "run"), "--config.checkpoint.every_steps=5", check=False)
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "No space left on" in err[0] and "MiB free, the checkpoint needs ~" in err[0]
    assert proc.stderr.count("Traceback") == 0
    ckpts = mnt / "run" / "checkpoints"
    assert not ckpts.exists() or not [n for n in os.listdir(ckpts) if "tmp" in n]
  finally:
    subprocess.run(["umount", str(mnt)])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs needs root")
def test_full_disk_in_the_background_writer_is_one_line_and_leaves_no_partial_folder(tmp_path):
  """The pre-save check off (checkpoint.check_free_space=False, as on a mount whose free
  space means nothing): the disk fills while Orbax writes in the background; the error
  comes back at a later step as one line, the partial step folder is removed."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    proc = _run(str(mnt / "run"), "--config.checkpoint.every_steps=5",
                "--config.checkpoint.check_free_space=False", check=False)
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "No space left on" in err[0] and "the last save failed: no space left" in err[0]
    assert "it resumes from step 0" in err[0]
    assert proc.stderr.count("Traceback") == 0, proc.stderr[-3000:]
    # The background write failed after step 5 and surfaced before the run ended.
    steps = [int(m) for m in re.findall(r"\] (\d+)/60 \|", proc.stderr)]
    assert steps and 5 < max(steps) < STEPS
    assert os.listdir(mnt / "run" / "checkpoints") == []
  finally:
    subprocess.run(["umount", str(mnt)])
