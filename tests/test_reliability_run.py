"""Reliability faults that need no reference run (split from test_reliability.py so the two
files run on different workers): a non-finite state, an interrupt mid-loop, two runs on one
workdir.  See docs/reliability.md."""

import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp

from mdm_jax.trainers.checkpoint import verify_step_dir
from tests.test_reliability import STEPS, _run, _start_and_wait, _steps


def test_non_finite_state_is_never_committed(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run(workdir, "--config.training.learning_rate=1e6", "--config.training.grad_clip=0",
              "--config.checkpoint.every_steps=1", "--config.training.log_every=50",
              check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "non-finite" in err[0] and "was not saved" in err[0]
  assert "last good checkpoint is step" in err[0]
  # Every committed checkpoint verifies and holds finite numbers only.
  for step in _steps(workdir):
    d = os.path.join(workdir, "checkpoints", str(step))
    assert verify_step_dir(d) is None
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(d, "state"))
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_interrupt_mid_loop_finishes_the_save_in_progress(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start_and_wait(workdir, 8, "--config.checkpoint.every_steps=1",
                         f"--config.training.num_steps={10 * STEPS}")
  proc.send_signal(signal.SIGINT)                   # KeyboardInterrupt inside the loop
  proc.communicate(timeout=300)
  assert proc.returncode != 0
  ckpts = os.path.join(workdir, "checkpoints")
  assert not [n for n in os.listdir(ckpts) if "tmp" in n]
  # Committed steps are intact; one committed while the interrupt landed may lack its
  # checksums ("unverified": restore then proves it), but none is damaged.
  states = [verify_step_dir(os.path.join(ckpts, str(s))) for s in _steps(workdir)]
  assert states and all(v in (None, "unverified") for v in states), states
  assert not os.path.exists(os.path.join(workdir, "mdm_jax.lock"))   # released


def test_second_run_on_a_workdir_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  # The holder saves no checkpoint before it is killed (however fast it runs meanwhile),
  # so the run that takes the lock over trains steps 1..STEPS itself.
  first = _start_and_wait(workdir, 3, f"--config.training.num_steps={10 * STEPS}",
                          f"--config.checkpoint.every_steps={100 * STEPS}")
  second = _run(workdir, check=False)
  assert second.returncode == 2
  assert f"in use by another run: pid {first.pid}" in second.stderr
  first.send_signal(signal.SIGKILL)                 # the holder dies without releasing
  first.communicate()
  assert os.path.exists(os.path.join(workdir, "mdm_jax.lock"))
  third = _run(workdir)
  assert "stale lock" in third.stderr
  assert _steps(workdir)[-1] == STEPS
